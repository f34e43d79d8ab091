"""Garbage collection of artifacts nobody needs any more."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update

from skyloop.errors import SpecError
from skyloop.store.lineage import collectable_artifacts
from skyloop.store.models import Artifact
from skyloop.store.runs import utcnow
from skyloop.store.workspace import Workspace

__all__ = ["GcReport", "collect_garbage", "parse_age"]

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


def collect_garbage(workspace: Workspace, older_than: timedelta, dry_run: bool = False) -> GcReport:
    """Delete artifacts unused for `older_than` that no pin (registered model) and no live run holds.

    The DB row is marked deleted before the blob goes, so a crash in between leaves an orphan blob
    (harmless, never a row pointing at nothing) and a cache lookup never hands out a deleted artifact.
    """
    cutoff = utcnow() - older_than
    with workspace.db.session() as session:
        victims = [(a.digest, a.size) for a in collectable_artifacts(session, cutoff)]
        if dry_run or not victims:
            return GcReport(len(victims), sum(s for _, s in victims), dry_run, [d for d, _ in victims])
        digests = [d for d, _ in victims]
        for i in range(0, len(digests), 500):
            session.execute(
                update(Artifact)
                .where(Artifact.digest.in_(digests[i:i + 500]), Artifact.deleted_at.is_(None),
                       Artifact.last_used_at < cutoff)
                .values(deleted_at=utcnow(), data=None)
            )
    for digest in digests:
        workspace.store.delete(digest)
    return GcReport(len(victims), sum(s for _, s in victims), False, digests)
