"""Artifacts, lineage edges and pins in the metadata DB, and the queries over them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session

from skyloop.errors import NotFound
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.hotpath import INSERT_EDGE, UPSERT_ARTIFACT
from skyloop.store.models import Artifact, ArtifactPin, Lineage, RunRow, StepRunRow
from skyloop.store.runs import ACTIVE_RUN_STATES, utcnow

__all__ = [
    "CollectedOutput",
    "LineageEdge",
    "artifact_rows",
    "collectable_artifacts",
    "collected_outputs",
    "consumers",
    "deleted_at",
    "pin",
    "producers",
    "record_artifacts",
    "record_edges",
    "resolve_digest",
    "unpin",
]


@dataclass(frozen=True)
class LineageEdge:
    """A step run that produced or consumed an artifact."""

    run_id: str
    step_run_id: str
    task: str
    map_index: int
    name: str
    direction: str
    position: int = -1
    """Index within a gathered (list) input, else -1: a step that read equal values from several units (say
    four 0.0s) has one edge at each position."""


@dataclass(frozen=True)
class CollectedOutput:
    """An output of a run's finished unit whose artifact garbage collection deleted since."""

    task: str
    map_index: int
    name: str
    digest: str
    type_name: str
    size: int
    deleted_at: datetime


def artifact_rows(refs: Iterable[ArtifactRef]) -> list[dict[str, object]]:
    """Rows for `UPSERT_ARTIFACT`, one per digest (PostgreSQL refuses to upsert one row twice)."""
    now = utcnow()
    rows: dict[str, dict[str, object]] = {r.digest: {"digest": r.digest, "serializer": r.serializer,
                                                     "type_name": r.type_name[:300],
                            "size": r.size, "created_at": now, "last_used_at": now,
                                             "data": r.data} for r in refs}
    return list(rows.values())


def record_artifacts(session: Session, refs: Iterable[ArtifactRef]) -> None:
    """Insert artifact rows (or revive and touch existing ones)."""
    rows = artifact_rows(refs)
    if rows:
        session.execute(UPSERT_ARTIFACT, rows)


def record_edges(session: Session, step_run_id: str, direction: str,
                 edges: Iterable[tuple[str, str, int]]) -> None:
    """Lineage edges `(name, digest, position)` between a step run and artifacts."""
    rows = [{"step_run_id": step_run_id, "artifact": digest, "direction": direction, "name": name,
             "position": position} for name, digest, position in edges]
    if rows:
        session.execute(INSERT_EDGE, rows)


def resolve_digest(session: Session, digest: str) -> str:
    """The full digest of an artifact given by its digest or a unique prefix of at least 6 characters (the
    12 that `models show` and `runs show` print)."""
    if session.get(Artifact, digest) is not None:
        return digest
    found = session.scalars(select(Artifact.digest).where(Artifact.digest.startswith(digest.lower(), autoescape=True))
                            .limit(2)).all() if len(digest) >= 6 else []
    if len(found) > 1:
        raise NotFound(f"artifact digest prefix {digest!r} is ambiguous; give more characters")
    if not found:
        more = "" if len(digest) >= 6 else " (a prefix needs 6 characters or more)"
        raise NotFound(f"no artifact {digest}{more}")
    return found[0]


def _edges(session: Session, digest: str, direction: str) -> list[LineageEdge]:
    digest = resolve_digest(session, digest)
    query = (select(StepRunRow.run_id, Lineage.step_run_id, StepRunRow.task, StepRunRow.map_index, Lineage.name,
                    Lineage.position)
             .join(StepRunRow, StepRunRow.id == Lineage.step_run_id)
             .where(Lineage.artifact == digest, Lineage.direction == direction)
             .order_by(StepRunRow.created_at, Lineage.position))
    return [LineageEdge(run_id, step_run_id, task, map_index, name, direction, position)
            for run_id, step_run_id, task, map_index, name, position in session.execute(query)]


def producers(session: Session, digest: str) -> list[LineageEdge]:
    """The step runs that wrote this artifact (several when equal bytes were produced twice)."""
    return _edges(session, digest, "out")


def consumers(session: Session, digest: str) -> list[LineageEdge]:
    """The step runs that read this artifact."""
    return _edges(session, digest, "in")


def deleted_at(session: Session, digest: str) -> datetime | None:
    """When garbage collection deleted the artifact (its digest or a unique prefix); None while it is stored."""
    row = session.get(Artifact, resolve_digest(session, digest))
    return row.deleted_at if row is not None else None


def collected_outputs(session: Session, run_id: str) -> list[CollectedOutput]:
    """The outputs of a run's finished units (the newest succeeded or cached attempt of each, as a resume reads
    them) whose artifacts garbage collection deleted: what `runs show` names as collected, not as never made."""
    latest: dict[tuple[str, int], tuple[int, str]] = {}
    for task, map_index, attempt, step_run_id in session.execute(
            select(StepRunRow.task, StepRunRow.map_index, StepRunRow.attempt, StepRunRow.id)
            .where(StepRunRow.run_id == run_id, StepRunRow.state.in_(("SUCCEEDED", "CACHED")))):
        if (task, map_index) not in latest or latest[(task, map_index)][0] < attempt:
            latest[(task, map_index)] = (attempt, step_run_id)
    units = {step_run_id: unit for unit, (_, step_run_id) in latest.items()}
    found: list[CollectedOutput] = []
    ids = list(units)
    for i in range(0, len(ids), 500):
        rows = session.execute(
            select(Lineage.step_run_id, Lineage.name, Artifact.digest, Artifact.type_name, Artifact.size,
                   Artifact.deleted_at)
            .join(Artifact, Artifact.digest == Lineage.artifact)
            .where(Lineage.step_run_id.in_(ids[i:i + 500]), Lineage.direction == "out",
                   Artifact.deleted_at.is_not(None)))
        found.extend(CollectedOutput(*units[step_run_id], name, digest, type_name, size, when)
                     for step_run_id, name, digest, type_name, size, when in rows)
    return sorted(found, key=lambda c: (c.task, c.map_index, c.name))


def pin(session: Session, digest: str, holder: str) -> None:
    """Keep an artifact from garbage collection on behalf of `holder` (e.g. `model:name/3`)."""
    session.add(ArtifactPin(artifact=digest, holder=holder, created_at=utcnow()))


def unpin(session: Session, digest: str, holder: str) -> None:
    """Drop `holder`'s pin."""
    for row in session.scalars(select(ArtifactPin).where(ArtifactPin.artifact == digest,
                                                         ArtifactPin.holder == holder)):
        session.delete(row)


def collectable_artifacts(session: Session, older_than: datetime) -> Sequence[Artifact]:
    """Artifacts unused since `older_than`, unpinned, and not touched by a run still in flight."""
    pinned = exists().where(ArtifactPin.artifact == Artifact.digest)
    live = exists().where(and_(
        Lineage.artifact == Artifact.digest,
        StepRunRow.id == Lineage.step_run_id,
        RunRow.id == StepRunRow.run_id,
        RunRow.status.in_(ACTIVE_RUN_STATES),
    ))
    query = select(Artifact).where(Artifact.deleted_at.is_(None), Artifact.last_used_at < older_than,
                                   ~pinned, ~live)
    return session.scalars(query).all()
