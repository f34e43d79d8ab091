"""Feedback rows: labels and rewards posted for answered inferences, one row per answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from skyloop.errors import Conflict, NotFound
from skyloop.store.models import FeedbackRow

__all__ = ["Feedback", "list_feedback", "record_feedback", "repeated_feedback"]


@dataclass(frozen=True)
class Feedback:
    """One feedback row."""

    model: str
    version: str | None
    inference_id: str
    truth: Any
    reward: float | None
    created_at: datetime


def repeated_feedback(inference_id: str, kinds: Iterable[str]) -> Conflict:
    """The error for feedback that repeats a `kinds` ('truth', 'reward') already recorded for `inference_id`."""
    named = " and one ".join(k for k in ("truth", "reward") if k in set(kinds))
    return Conflict(f"feedback for inference id {inference_id!r} was already recorded; each answer takes one {named}")


def record_feedback(session: Session, model: str, version: str | None, inference_id: str,
                    truth: Any = None, reward: float | None = None, answered: bool = True) -> None:
    """Store a label and/or reward for inference `inference_id` of `model`.

    An answer takes one truth and one reward, together or apart (a reward that arrives later fills in the
    row of the truth, and the reverse): metrics and bandits must count each answer once. Raises `Conflict`,
    storing nothing, when a kind given was already recorded. A unique index on (model, inference_id) keeps
    the rule between processes; the row lock keeps two that fill in the same row from both succeeding.
    `answered=False`: the caller does not know the answer (a server that no longer remembers the id): the
    feedback fills in the row of one that took feedback before, and without that row is `NotFound`.
    """
    given = {k for k, v in (("truth", truth), ("reward", reward)) if v is not None}
    for _ in range(2):
        row = session.scalars(select(FeedbackRow).where(FeedbackRow.model == model,
                                                        FeedbackRow.inference_id == inference_id)
                              .with_for_update()).first()
        if row is not None:
            taken = {k for k, v in (("truth", row.truth), ("reward", row.reward)) if v is not None}
            if given & taken:
                raise repeated_feedback(inference_id, given & taken)
            if truth is not None:
                row.truth = truth
            if reward is not None:
                row.reward = reward
            row.created_at = datetime.now(UTC)  # new feedback: counted as such by `count_feedback`
            return
        if not answered:
            raise NotFound(f"no feedback was recorded for inference id {inference_id!r} of {model!r}")
        try:
            with session.begin_nested():
                session.add(FeedbackRow(model=model, version=version, inference_id=inference_id, truth=truth,
                                        reward=reward, created_at=datetime.now(UTC)))
            return
        except sa_exc.IntegrityError:
            continue  # another process stored this answer's first feedback just now: fill in its row
    raise Conflict(f"feedback for inference id {inference_id!r} is being recorded by another request; send it again")


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
