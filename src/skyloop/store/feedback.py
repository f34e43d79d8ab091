"""Feedback rows: labels and rewards posted for answered inferences."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from skyloop.store.models import FeedbackRow

__all__ = ["Feedback", "list_feedback", "record_feedback"]


@dataclass(frozen=True)
class Feedback:
    """One feedback row."""

    model: str
    version: str | None
    inference_id: str
    truth: Any
    reward: float | None
    created_at: datetime


def record_feedback(session: Session, model: str, version: str | None, inference_id: str,
                    truth: Any = None, reward: float | None = None) -> None:
    """Store a label or reward for inference `inference_id` of `model`."""
    session.add(FeedbackRow(model=model, version=version, inference_id=inference_id, truth=truth, reward=reward,
                            created_at=datetime.now(UTC)))


def list_feedback(session: Session, model: str, since: datetime | None = None,
                  limit: int | None = None) -> list[Feedback]:
    """Feedback for `model`, oldest first (only rows created at or after `since` when given)."""
    query = select(FeedbackRow).where(FeedbackRow.model == model)
    if since is not None:
        query = query.where(FeedbackRow.created_at >= since)
    query = query.order_by(FeedbackRow.id)
    if limit is not None:
        query = query.limit(limit)
    return [Feedback(r.model, r.version, r.inference_id, r.truth, r.reward, r.created_at)
            for r in session.scalars(query)]
