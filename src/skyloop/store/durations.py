"""How long steps took before: the history duration estimates learn from."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from skyloop.store.models import StepRunRow

__all__ = ["StepKey", "duration_history"]

StepKey = tuple[str, str]
"""A step's identity for learning: (`module:function`, code hash). A code change starts afresh."""


def duration_history(session: Session, keys: Iterable[StepKey], window: int = 20
                     ) -> dict[StepKey, list[tuple[float, int | None]]]:
    """The newest `window` successful attempts of each step: `(seconds, input bytes)`, newest first."""
    wanted = list(dict.fromkeys(keys))
    history: dict[StepKey, list[tuple[float, int | None]]] = {key: [] for key in wanted}
    for i in range(0, len(wanted), 200):
        chunk = wanted[i:i + 200]
        newest = func.row_number().over(
            partition_by=(StepRunRow.step_ref, StepRunRow.code_hash), order_by=StepRunRow.ended_at.desc()
        ).label("newest")
        inner = (
            select(StepRunRow.step_ref, StepRunRow.code_hash, StepRunRow.started_at, StepRunRow.ended_at,
                   StepRunRow.input_bytes, newest)
            .where(StepRunRow.state == "SUCCEEDED", StepRunRow.ended_at.is_not(None),
                   tuple_(StepRunRow.step_ref, StepRunRow.code_hash).in_(chunk))
            .subquery()
        )
        rows = session.execute(
            select(inner.c.step_ref, inner.c.code_hash, inner.c.started_at, inner.c.ended_at, inner.c.input_bytes)
            .where(inner.c.newest <= window).order_by(inner.c.ended_at.desc())
        ).all()
        for step_ref, code_hash, started_at, ended_at, input_bytes in rows:
            history[(step_ref, code_hash)].append((_seconds(started_at, ended_at), input_bytes))
    return history


def _seconds(started: datetime | str | None, ended: datetime | str | None) -> float:
    # Rows read through a subquery bypass the ORM column type on SQLite: parse what comes back.
    def parse(value: datetime | str | None) -> datetime | None:
        if value is None or isinstance(value, datetime):
            return value
        return datetime.fromisoformat(value)

    start, end = parse(started), parse(ended)
    if start is None or end is None:
        return 0.0
    if (start.tzinfo is None) != (end.tzinfo is None):
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return max(0.0, (end - start).total_seconds())
