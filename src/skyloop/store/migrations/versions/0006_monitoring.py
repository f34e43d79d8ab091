"""monitoring: payload log segments and drift reports

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payload_segments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=200), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dataset_drift", sa.Boolean(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("payload_segments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_payload_segments_deployment"), ["deployment"], unique=False)
        batch_op.create_index(batch_op.f("ix_payload_segments_last_at"), ["last_at"], unique=False)
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drift_reports_deployment"), ["deployment"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("drift_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drift_reports_deployment"))
    with op.batch_alter_table("payload_segments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payload_segments_last_at"))
        batch_op.drop_index(batch_op.f("ix_payload_segments_deployment"))
    op.drop_table("drift_reports")
    op.drop_table("payload_segments")
