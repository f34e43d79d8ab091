"""Which ready step attempts to launch now, given free resources (pure: no I/O)."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from skyloop.spec.resources import Resources

__all__ = ["Candidate", "ReadyQueue", "select"]

BACKFILL_SCAN = 64
"""How many candidates that do not fit are looked past to find smaller ones that do."""


@dataclass(frozen=True, order=True)
class Candidate:
    """A ready attempt waiting for resources."""

    sort_key: tuple[int, int] = field(init=False, repr=False)
    key: int = field(compare=False)
    resources: Resources = field(compare=False)
    priority: int = field(default=0, compare=False)
    seq: int = field(default=0, compare=False)
    """Arrival order: earlier first among equals."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sort_key", (-self.priority, self.seq))


class ReadyQueue:
    """Ready attempts in launch order: highest priority first, then oldest.

    `take` launches what fits and backfills with smaller requests behind a large one, scanning at
    most `BACKFILL_SCAN` misses so that a turn costs O(launched + scan) rather than O(waiting).
    """

    def __init__(self) -> None:
        self._heap: list[Candidate] = []
        self._cpus: Counter[float] = Counter()
        """How many queued attempts ask for each amount of CPU: a turn ends once none can fit."""

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, candidate: Candidate) -> None:
        """Add a ready attempt."""
        heapq.heappush(self._heap, candidate)
        self._cpus[candidate.resources.cpus] += 1

    def take(self, free: Resources) -> list[Candidate]:
        """Remove and return the attempts to launch now."""
        chosen: list[Candidate] = []
        skipped: list[Candidate] = []
        while self._heap and len(skipped) < BACKFILL_SCAN:
            if free.cpus + 1e-9 < min(self._cpus):
                break  # not even the smallest CPU request fits
            cand = heapq.heappop(self._heap)
            if cand.resources.fits(free):
                chosen.append(cand)
                free = free - cand.resources
                self._cpus[cand.resources.cpus] -= 1
                if not self._cpus[cand.resources.cpus]:
                    del self._cpus[cand.resources.cpus]
            else:
                skipped.append(cand)
        for cand in skipped:
            heapq.heappush(self._heap, cand)
        return chosen


def select(candidates: Sequence[Candidate], free: Resources) -> list[Candidate]:
    """The attempts to launch from `candidates` with `free` resources (see `ReadyQueue.take`)."""
    queue = ReadyQueue()
    for cand in candidates:
        queue.push(cand)
    return queue.take(free)
