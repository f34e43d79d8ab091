"""Which ready step attempts to launch now, given free resources (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from skyloop.spec.resources import Resources

__all__ = ["Candidate", "select"]


@dataclass(frozen=True)
class Candidate:
    """A ready attempt waiting for resources."""

    key: str
    resources: Resources
    priority: int = 0
    seq: int = 0
    """Arrival order: earlier first among equals."""


def select(candidates: Sequence[Candidate], free: Resources) -> list[Candidate]:
    """Highest priority first, then oldest; skip what does not fit and backfill with what does."""
    chosen: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: (-c.priority, c.seq)):
        if cand.resources.fits(free):
            chosen.append(cand)
            free = free - cand.resources
    return chosen
