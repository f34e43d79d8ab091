"""feedback once: one row per answer (model, inference_id), so that each answer takes one truth and one reward

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 05:20:00

Answers labelled more than once before this revision are merged into their first row: it keeps the
first truth and the first reward given (what the new rule would have accepted) and the newest time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_feedback = sa.table(
    "inference_feedback",
    sa.column("id", sa.Integer()), sa.column("model", sa.String()), sa.column("inference_id", sa.String()),
    sa.column("truth", sa.JSON()), sa.column("reward", sa.Float()), sa.column("created_at", sa.DateTime()),
)


def _merge_repeats(bind: sa.Connection) -> None:
    t = _feedback.c
    repeated = bind.execute(sa.select(t.model, t.inference_id).group_by(t.model, t.inference_id)
                            .having(sa.func.count() > 1)).all()
    for model, inference_id in repeated:
        rows = bind.execute(sa.select(t.id, t.truth, t.reward, t.created_at)
                            .where(t.model == model, t.inference_id == inference_id).order_by(t.id)).all()
        truth = next((r.truth for r in rows if r.truth is not None), None)
        reward = next((r.reward for r in rows if r.reward is not None), None)
        bind.execute(sa.update(_feedback).where(t.id == rows[0].id)
                     .values(truth=truth, reward=reward, created_at=rows[-1].created_at))
        bind.execute(sa.delete(_feedback).where(t.id.in_([r.id for r in rows[1:]])))


def upgrade() -> None:
    _merge_repeats(op.get_bind())
    with op.batch_alter_table("inference_feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_inference_feedback_model_inference_id"), ["model", "inference_id"],
                              unique=True)


def downgrade() -> None:
    with op.batch_alter_table("inference_feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_inference_feedback_model_inference_id"))
