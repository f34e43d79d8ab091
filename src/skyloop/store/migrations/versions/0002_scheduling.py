"""scheduling: duration estimates per attempt, input sizes, run weights

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("step_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("estimate_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("estimate_source", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("input_bytes", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_step_runs_history", ["step_ref", "code_hash", "state"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("weight")
    with op.batch_alter_table("step_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_step_runs_history")
        batch_op.drop_column("input_bytes")
        batch_op.drop_column("estimate_source")
        batch_op.drop_column("estimate_seconds")
