"""Read a run's past attempts back from the DB: for resuming it and for showing it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from skyloop.store.artifacts import ArtifactRef
from skyloop.store.models import Artifact, Lineage, StepRunRow
from skyloop.store.runs import ORCHESTRATOR_LOST, utcnow

__all__ = ["Prior", "crash_orphans", "load_prior"]

OK_STATES = ("SUCCEEDED", "CACHED")


@dataclass
class Prior:
    """What earlier attempts of a run left: the outputs of finished units and the attempt counters."""

    outputs: dict[tuple[str, int], dict[str, ArtifactRef]] = field(default_factory=dict)
    attempts: dict[tuple[str, int], int] = field(default_factory=dict)
    spared: dict[tuple[str, int], int] = field(default_factory=dict)
    """Attempts that spent none of the step's retries: cancelled, or lost with the process driving them."""


def load_prior(session: Session, run_id: str) -> Prior:
    """Outputs of every unit whose latest attempt succeeded (or was cached), and attempt counts."""
    prior = Prior()
    latest: dict[tuple[str, int], StepRunRow] = {}
    for row in session.scalars(select(StepRunRow).where(StepRunRow.run_id == run_id)):
        unit = (row.task, row.map_index)
        prior.attempts[unit] = max(prior.attempts.get(unit, 0), row.attempt)
        if row.state == "CANCELLED" or (row.state == "CRASHED" and (row.error or "").startswith(ORCHESTRATOR_LOST)):
            prior.spared[unit] = prior.spared.get(unit, 0) + 1
        if row.state in OK_STATES and (unit not in latest or latest[unit].attempt < row.attempt):
            latest[unit] = row
    ids = {row.id: unit for unit, row in latest.items()}
    if not ids:
        return prior
    rows = session.execute(
        select(Lineage.step_run_id, Lineage.name, Artifact.digest, Artifact.serializer, Artifact.type_name,
               Artifact.size, Artifact.deleted_at, Artifact.data)
        .join(Artifact, Artifact.digest == Lineage.artifact)
        .where(Lineage.step_run_id.in_(list(ids)), Lineage.direction == "out")
    ).all()
    gone: set[tuple[str, int]] = set()
    for step_run_id, name, digest, serializer, type_name, size, deleted_at, data in rows:
        unit = ids[step_run_id]
        if deleted_at is not None:
            gone.add(unit)
        prior.outputs.setdefault(unit, {})[name] = ArtifactRef(digest, serializer, type_name, size, data)
    for unit in ids.values():
        prior.outputs.setdefault(unit, {})
    for unit in gone:  # outputs garbage-collected since: that unit runs again
        del prior.outputs[unit]
    return prior


def crash_orphans(session: Session, run_id: str, reason: str, state: str = "CRASHED") -> int:
    """Mark attempts left RUNNING by a vanished orchestrator as CRASHED (or `state`); returns how many."""
    result = session.execute(
        update(StepRunRow).where(StepRunRow.run_id == run_id, StepRunRow.state.in_(("RUNNING", "PENDING")))
        .values(state=state, ended_at=utcnow(), error=reason)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
