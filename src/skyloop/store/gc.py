"""Garbage collection of artifacts nobody needs any more."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update

from skyloop.errors import SpecError
from skyloop.store.lineage import collectable_artifacts
from skyloop.store.models import Artifact
from skyloop.store.runs import utcnow
from skyloop.store.workspace import Workspace

__all__ = ["IN_FLIGHT", "GcReport", "collect_garbage", "parse_age"]

IN_FLIGHT = timedelta(minutes=1)
"""A blob written or reused this recently is never collected: its writer may not have recorded it yet."""

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `15m`, `90s`, `2w`."""
    match = _AGE.match(text)
    if not match:
        raise SpecError(f"age {text!r} must look like 30d, 12h, 15m, 90s or 2w")
    return timedelta(seconds=float(match.group(1)) * _SECONDS[match.group(2)])


@dataclass
class GcReport:
    """What a collection removed (or would remove, in a dry run)."""

    artifacts: int
    bytes: int
    dry_run: bool
    digests: list[str]
    orphans: int = 0
    """Blobs of artifacts deleted before whose removal had not happened (a collection killed midway)."""
    orphan_bytes: int = 0


def collect_garbage(workspace: Workspace, older_than: timedelta, dry_run: bool = False) -> GcReport:
    """Delete artifacts unused for `older_than` that no pin (registered model) and no live run holds.

    The DB row is marked deleted before the blob goes, so a crash in between leaves an orphan blob
    (harmless, never a row pointing at nothing) and a cache lookup never hands out a deleted artifact.
    Only the rows this collection marked lose their blobs, and a blob a writer wrote or reused within
    `older_than` (at least `IN_FLIGHT` ago) stays, its row live again: the writer of a value equal to an
    old artifact's may be about to record it (see `ArtifactStore.delete_unless_used`; on object stores,
    which cannot tell, run collections when no run writes).
    """
    now = utcnow()
    cutoff = now - older_than
    since = min(cutoff, now - IN_FLIGHT).timestamp()
    with workspace.db.session() as session:
        victims = [(a.digest, a.size) for a in collectable_artifacts(session, cutoff)]
        if dry_run:
            return GcReport(len(victims), sum(s for _, s in victims), dry_run, [d for d, _ in victims])
        marked: dict[str, int] = {}
        digests = [d for d, _ in victims]
        for i in range(0, len(digests), 500):
            # Checked again as the rows are marked: one used since the query above keeps its blob.
            marked.update(session.execute(
                update(Artifact)
                .where(Artifact.digest.in_(digests[i:i + 500]), Artifact.deleted_at.is_(None),
                       Artifact.last_used_at < cutoff)
                .values(deleted_at=now, data=None)
                .returning(Artifact.digest, Artifact.size)
            ).tuples().all())
    kept = {digest for digest in marked if not workspace.store.delete_unless_used(digest, since)}
    if kept:
        with workspace.db.session() as session:
            session.execute(update(Artifact).where(Artifact.digest.in_(kept)).values(deleted_at=None))
    gone = [digest for digest in marked if digest not in kept]
    return GcReport(len(gone), sum(marked[d] for d in gone), False, gone, *_remove_orphans(workspace, since))


def _remove_orphans(workspace: Workspace, since: float) -> tuple[int, int]:
    """Remove the old blobs of rows marked deleted: a collection killed (or interrupted) between marking its rows
    and removing their blobs leaves them, and no later one would look at rows already marked.

    A blob with no row at all stays: its writer may be storing a whole model before it records the rows.
    """
    stale = dict(workspace.store.stale_blobs(since))
    digests = list(stale)
    dead: set[str] = set()
    with workspace.db.read() as session:
        for i in range(0, len(digests), 500):
            dead.update(session.scalars(select(Artifact.digest).where(Artifact.digest.in_(digests[i:i + 500]),
                                                                       Artifact.deleted_at.is_not(None))))
    # A writer reviving one of them meanwhile first touches (or writes) its blob: `delete_unless_used` keeps it.
    removed = [d for d in digests if d in dead and workspace.store.delete_unless_used(d, since)]
    return len(removed), sum(stale[d] for d in removed)
