"""pool slots: concurrency pools held in the DB, so that a pool's limit holds across agents

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 06:00:00

Before this revision each orchestrator process applied a pool's limit to the runs it held, so two
agents on one DB could each run a member of a pool of limit 1.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pool_slots",
        sa.Column("pool", sa.String(length=200), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pool", "slot"),
    )
    with op.batch_alter_table("pool_slots", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pool_slots_owner"), ["owner"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pool_slots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pool_slots_owner"))
    op.drop_table("pool_slots")
