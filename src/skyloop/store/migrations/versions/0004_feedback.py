"""feedback: labels and rewards for answered inferences

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=100), nullable=True),
        sa.Column("inference_id", sa.String(length=200), nullable=False),
        sa.Column("truth", sa.JSON(), nullable=True),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("inference_feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_inference_feedback_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_inference_feedback_inference_id"), ["inference_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_inference_feedback_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("inference_feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_inference_feedback_created_at"))
        batch_op.drop_index(batch_op.f("ix_inference_feedback_inference_id"))
        batch_op.drop_index(batch_op.f("ix_inference_feedback_model"))
    op.drop_table("inference_feedback")
