"""Aging, so that nothing starves behind a stream of urgent work: which waiting candidates rise a
priority class, and when (pure: time is passed in).

Each time a run launched nothing for `seconds`, its oldest waiting candidate rises one class, up to
the highest class waiting. A run that launches is served, not starved, and one candidate a period is
enough to keep it going. (Lifting every candidate that waited a period, run or no run, put whole
runs into the urgent class after one period, where fair share left the urgent run a fraction of the
machine: in the benchmark's mixed workload the high-priority run often finished last.)

Cost: one heap entry per run, not per candidate, is looked at when its period ends; a run being
served only moves its own entry on. So a busy machine pays per run and period, not per candidate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

__all__ = ["Aging", "Standing"]

Standing = Callable[[int, int], "tuple[int, int] | None"]
"""(key, token) -> (its class now, its own class), or None when that candidate is no longer queued."""


class Aging:
    """The clocks of aging: candidates by run, oldest first, and when each run's next period ends."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._runs: dict[str, list[tuple[float, int, int]]] = {}
        """Run -> heap of (when its clock started: ready or last lifted, token, key) of candidates below the top."""
        self._wakes: list[tuple[float, int, str]] = []
        """Heap of (when a run's period may end, seq, run); those not in `_due` are stale."""
        self._due: dict[str, float] = {}
        self._served: dict[str, float] = {}
        """Run -> when it last launched or had a candidate lifted: its clock."""
        self._capped: list[tuple[str, float, int, int]] = []
        """(run, clock, token, key) of candidates at the top class: they rise on only when a higher one arrives."""
        self._top = 0
        self._seq = 0
        self._sweep_at = 64
        """Length of `_capped` past which its candidates no longer queued are dropped."""

    @property
    def on(self) -> bool:
        """Whether candidates age at all (0 or infinite seconds: never)."""
        return 0 < self.seconds < math.inf

    def add(self, run_id: str, ready_at: float, token: int, key: int) -> None:
        """A candidate of `run_id` is waiting since `ready_at`."""
        if self.on:
            heapq.heappush(self._runs.setdefault(run_id, []), (ready_at, token, key))
            self._wake(run_id, max(ready_at, self._served.get(run_id, ready_at)) + self.seconds)

    def served(self, run_id: str, at: float) -> None:
        """The run launched an attempt `at`: its clock starts again (its wake moves on when it comes)."""
        self._served[run_id] = max(at, self._served.get(run_id, at))

    def forget(self, run_id: str) -> None:
        """The run has nothing waiting: what it pushes next became ready after all of this."""
        self._runs.pop(run_id, None)
        self._due.pop(run_id, None)
        self._served.pop(run_id, None)

    def lifts(self, now: float, top: int, standing: Standing) -> list[tuple[int, int]]:
        """(key, class to rise to) of the candidates whose run's period ended by `now`; `top` is the
        highest class waiting."""
        if not self.on:
            self._runs.clear()
            self._wakes.clear()
            self._due.clear()
            self._capped.clear()
            return []
        if self._capped and top > self._top:  # a higher class arrived: those at the old top rise on
            for run_id, clock, token, key in self._capped:
                if standing(key, token) is not None:
                    heapq.heappush(self._runs.setdefault(run_id, []), (clock, token, key))
                    self._schedule(run_id)
            self._capped.clear()
        self._top = top
        seconds, wakes, out = self.seconds, self._wakes, []
        while wakes and wakes[0][0] <= now:
            due, _, run_id = heapq.heappop(wakes)
            if self._due.get(run_id) != due:
                continue
            del self._due[run_id]
            heap = self._runs.get(run_id)
            while heap and standing(heap[0][2], heap[0][1]) is None:
                heapq.heappop(heap)
            if not heap:
                self._runs.pop(run_id, None)
                continue
            clock, token, key = heap[0]
            klass, own = standing(key, token) or (0, 0)
            since = max(clock, self._served.get(run_id, clock))
            if now - since < seconds:  # served meanwhile
                self._wake(run_id, since + seconds)
                continue
            heapq.heappop(heap)
            # Past the top class waiting, rising would only reorder work within it (see the policy).
            rise = min(klass + 1, max(top, own))
            if rise > klass:
                since += seconds
                self._served[run_id] = max(since, self._served.get(run_id, since))
                out.append((key, rise))
            if rise >= top:
                self._capped.append((run_id, since, token, key))
            else:
                heapq.heappush(heap, (since, token, key))
            self._schedule(run_id)
        if len(self._capped) > self._sweep_at:  # with one class for days, they would pile up
            self._capped = [item for item in self._capped if standing(item[3], item[2]) is not None]
            self._sweep_at = 2 * len(self._capped) + 64
        return out

    def _schedule(self, run_id: str) -> None:
        """Wake the run when the period of its oldest candidate may end."""
        heap = self._runs.get(run_id)
        if heap:
            clock = heap[0][0]
            self._wake(run_id, max(clock, self._served.get(run_id, clock)) + self.seconds)

    def _wake(self, run_id: str, due: float) -> None:
        if due < self._due.get(run_id, math.inf):
            self._due[run_id] = due
            self._seq += 1
            heapq.heappush(self._wakes, (due, self._seq, run_id))
