"""EASY backfilling: what the first candidate that cannot launch is promised, so that work behind it
launches only where it does not delay it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from skyloop.scheduling.amounts import EPS, Amounts
from skyloop.scheduling.candidates import Candidate
from skyloop.spec.resources import Resources

__all__ = ["Reservation", "reserve"]


@dataclass
class Reservation:
    """What the first blocked candidate is promised."""

    shadow: float
    """When it is expected to fit."""
    spare: Amounts
    """What will be free beyond its request at that time."""

    def allows(self, cand: Candidate, now: float) -> bool:
        """Whether launching `cand` now keeps the promise: it ends by then, or fits in the spare part."""
        return now + cand.estimate <= self.shadow + EPS or self.spare.fits(cand.resources)


def reserve(head: Candidate, avail: Amounts, ends: Iterable[tuple[float, Resources]], now: float) -> Reservation | None:
    """When `head` should fit, given what is free now and the running attempts' (expected end, resources)
    by expected end; None if it never will.

    Attempts past their expected end may end any moment: they count from now, the longest overdue
    first, and only as many as the head needs, so the spare part stays a cautious one.
    """
    pool = avail.copy()
    for end, resources in ends:
        pool.add(resources)
        if pool.fits(head.resources):
            pool.add(head.resources, -1)
            return Reservation(max(now, end), pool)
    return None
