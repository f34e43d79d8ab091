"""Aging, so that nothing starves behind a stream of urgent work: which waiting candidates rise a
priority class, and when (pure: time is passed in).

Each time a run launched nothing for `seconds`, its oldest waiting candidate rises one class, up to
the highest class waiting. A run that launches is served, not starved, and one candidate a period is
enough to keep it going. (Lifting every candidate that waited a period, run or no run, put whole
runs into the urgent class after one period, where fair share left the urgent run a fraction of the
machine: in the benchmark's mixed workload the high-priority run often finished last.) A run being
served can still leave one of its candidates waiting for what the urgent work holds (a GPU, while
the run launches CPU work): its oldest candidate also rises once it waited `STARVED_PERIODS` periods
itself, still one candidate a period. "Oldest" is by when a candidate became ready or last rose, so
the candidates of a run waiting long take turns.

Cost: per run, its candidates in a heap by clock and one wake when its oldest one's period may end;
a run being served only moves its wake on, so a busy machine pays per run and period, not per
candidate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

__all__ = ["STARVED_PERIODS", "Aging", "Standing"]

STARVED_PERIODS = 4
"""Periods after which a run's oldest candidate rises even though the run launched other work."""

Standing = Callable[[int, int], "tuple[int, int] | None"]
"""(key, token) -> (its class now, its own class), or None when that candidate is no longer queued."""


class Aging:
    """The clocks of aging: candidates by run, oldest first, and when each run's next period ends."""

    def __init__(self, seconds: float, standing: Standing) -> None:
        self.seconds = seconds
        self._standing = standing
        self._runs: dict[str, list[tuple[float, int, int]]] = {}
        """Run -> heap of (when its clock started: ready or last lifted, token, key) of candidates below the top."""
        self._sweep_at: dict[str, int] = {}
        """Run -> size of its heap past which the candidates no longer queued are dropped from it."""
        self._wakes: list[tuple[float, int, str]] = []
        """Heap of (when a run's period may end, seq, run); those not in `_due` are stale."""
        self._due: dict[str, float] = {}
        self._served: dict[str, float] = {}
        """Run -> when it last launched or had a candidate lifted: its clock."""
        self._capped: list[tuple[str, float, int, int]] = []
        """(run, clock, token, key) of candidates at the top class: they rise on only when a higher one arrives."""
        self._capped_sweep_at = 64
        self._top = 0
        self._seq = 0

    @property
    def on(self) -> bool:
        """Whether candidates age at all (0 or infinite seconds: never)."""
        return 0 < self.seconds < math.inf

    def add(self, run_id: str, ready_at: float, token: int, key: int) -> None:
        """A candidate of `run_id` is waiting since `ready_at`."""
        if not self.on:
            return
        heap = self._runs.setdefault(run_id, [])
        heapq.heappush(heap, (ready_at, token, key))
        if len(heap) > self._sweep_at.get(run_id, 64):  # launched ones deep in the heap, behind an old one
            heap[:] = [item for item in heap if self._standing(item[2], item[1]) is not None]
            heapq.heapify(heap)
            self._sweep_at[run_id] = 2 * len(heap) + 64
        if heap[0][1] == token or run_id not in self._due:  # else the oldest, and so the wake, is as it was
            self._schedule(run_id)

    def served(self, run_id: str, at: float) -> None:
        """The run launched an attempt `at`: its clock starts again (its wake moves on when it comes)."""
        if run_id in self._runs:  # else nothing of it waits (`forget`): nothing to keep
            self._served[run_id] = max(at, self._served.get(run_id, at))

    def forget(self, run_id: str) -> None:
        """The run has nothing waiting: what it pushes next became ready after all of this."""
        self._runs.pop(run_id, None)
        self._sweep_at.pop(run_id, None)
        self._due.pop(run_id, None)
        self._served.pop(run_id, None)

    def lifts(self, now: float, top: int) -> list[tuple[int, int]]:
        """(key, class to rise to) of the candidates whose run's period ended by `now`; `top` is the
        highest class waiting."""
        wakes = self._wakes
        if (not wakes or wakes[0][0] > now) and (not self._capped or top <= self._top):
            self._top = top  # the usual call: no period ended, no higher class arrived
            return []
        standing = self._standing
        if self._capped and top > self._top:  # a higher class arrived: those at the old top rise on
            for run_id, clock, token, key in self._capped:
                if standing(key, token) is not None:
                    heapq.heappush(self._runs.setdefault(run_id, []), (clock, token, key))
                    self._schedule(run_id)
            self._capped.clear()
        self._top = top
        seconds = self.seconds
        lifted: dict[int, int] = {}  # key -> its class after this call (one may rise more than once)
        while wakes and wakes[0][0] <= now:
            due, _, run_id = heapq.heappop(wakes)
            if self._due.get(run_id) != due:
                continue
            del self._due[run_id]
            heap = self._runs.get(run_id)
            place = None
            while heap and (place := standing(heap[0][2], heap[0][1])) is None:
                heapq.heappop(heap)
            if not heap or place is None:
                self._runs.pop(run_id, None)
                continue
            clock, token, key = heap[0]
            klass, own = lifted.get(key, place[0]), place[1]
            since = self._since(run_id, clock)
            if now - since < seconds:  # served meanwhile
                self._wake(run_id, since + seconds)
                continue
            heapq.heappop(heap)
            # Past the top class waiting, rising would only reorder work within it (see the policy).
            rise = min(klass + 1, max(top, own))
            if rise > klass:
                since += seconds
                self._served[run_id] = max(since, self._served.get(run_id, since))
                lifted[key] = rise
            if rise >= top:
                self._capped.append((run_id, since, token, key))
            else:
                heapq.heappush(heap, (since, token, key))
            self._schedule(run_id)
        if len(self._capped) > self._capped_sweep_at:  # with one class for days, they would pile up
            self._capped = [item for item in self._capped if standing(item[3], item[2]) is not None]
            self._capped_sweep_at = 2 * len(self._capped) + 64
        return list(lifted.items())

    def _since(self, run_id: str, clock: float) -> float:
        """Since when the candidate whose own clock is `clock` counts as waiting unserved."""
        served = self._served.get(run_id, clock)
        return clock if served <= clock else min(served, clock + (STARVED_PERIODS - 1) * self.seconds)

    def _schedule(self, run_id: str) -> None:
        """Wake the run when the period of its oldest candidate may end."""
        heap = self._runs.get(run_id)
        if heap:
            self._wake(run_id, self._since(run_id, heap[0][0]) + self.seconds)

    def _wake(self, run_id: str, due: float) -> None:
        if due < self._due.get(run_id, math.inf):
            self._due[run_id] = due
            self._seq += 1
            heapq.heappush(self._wakes, (due, self._seq, run_id))
