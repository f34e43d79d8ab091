"""Which ready step attempts to launch now, given free resources (pure: no I/O, no clock; time is passed in).

The order, from the first criterion to the last:

1. **Priority class**, higher first. A candidate rises one class for every `aging_seconds` it has
   waited, up to the highest class waiting, so nothing starves behind a stream of urgent work; past
   that lifting would only reorder work of one class, and fair share (next) already serves the
   starved run first.
2. **Fair share** between runs of one class: the run whose running CPUs (those in `running` plus
   what this call has already chosen) divided by its weight is smallest goes first.
3. **Upward rank**, longest first: the task heading the longest remaining path of its run.
4. **Arrival** (`seq`), oldest first.

Packing: among candidates of the same standing (same class and run, rank within `fit_window` of the
best one, at most `fit_scan` looked at) that can launch, the tightest fit wins: the one that uses the
largest fraction of what is free of some resource it asks for (best fit; with CPUs alone, the
largest request that fits). When the first candidate in order does not fit, it gets a reservation
(EASY backfilling): from the expected ends of the running attempts, the time its resources free up
(the shadow time) and what will be spare then. Candidates behind it launch only if they are
expected to end by the shadow time or fit in the spare part, so small work fills the gap without
delaying it. Without estimates (all 0) this is plain greedy backfill. A call stops after
`backfill_scan` candidates were passed over, so it costs O(running + buckets + (launched + scan) log n),
not O(waiting); a bucket is one (class, run) pair.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from skyloop.spec.resources import Resources

__all__ = ["BACKFILL_SCAN", "Candidate", "PolicyConfig", "ReadyQueue", "select"]

BACKFILL_SCAN = 64
"""How many candidates that cannot launch are looked past, per call, to find ones that can."""

_EPS = 1e-9
_T = TypeVar("_T")


@dataclass(frozen=True)
class Candidate:
    """A ready attempt waiting for resources."""

    key: int
    resources: Resources
    priority: int = 0
    """Priority class: higher first."""
    seq: int = 0
    """Arrival order: earlier first among equals."""
    run_id: str = ""
    rank: float = 0.0
    """Upward rank, seconds: the longest path from this task to the end of its run, its own estimate included."""
    estimate: float = 0.0
    """Expected seconds of this attempt."""
    pool: str | None = None
    """Named concurrency pool (see `PolicyConfig.pools`)."""
    ready_at: float = 0.0
    """When it became ready, seconds on the clock that `take(now=...)` uses."""


@dataclass
class PolicyConfig:
    """Knobs of the policy; `run_weights` and `pools` are read on every call, so they may change."""

    aging_seconds: float = 300.0
    """Each full period a candidate waits lifts it one priority class; 0 or less turns aging off."""
    run_weights: dict[str, float] = field(default_factory=dict)
    """Fair-share weight per run id (default 1.0): a run of weight 2 is served up to twice the CPUs."""
    pools: dict[str, int] = field(default_factory=dict)
    """Concurrency pool -> how many of its members may run at once, across runs; unknown = unlimited."""
    backfill_scan: int = BACKFILL_SCAN
    """Candidates passed over per call before giving up on the rest."""
    fit_window: float = 0.0
    """Ranks within this fraction of the best one count as the same standing for best fit (0: ties only)."""
    fit_scan: int = 8
    """At most this many candidates of the same standing are compared for best fit."""
    fair_share: bool = True
    """Order runs of one class by weighted running CPUs before rank; off, rank alone orders them
    (shorter makespans, and only aging keeps a run from waiting behind another's critical path)."""


class _Entry:
    __slots__ = ("cand", "klass", "stamp", "token")

    def __init__(self, cand: Candidate, klass: int, stamp: int, token: int) -> None:
        self.cand, self.klass, self.stamp, self.token = cand, klass, stamp, token


_Item = tuple[float, int, int, int]
"""A heap item: (-rank, seq, stamp, key). Stamps are unique, so comparisons never reach the key."""


class _Vec:
    """A mutable amount of every resource (the free pool while a call decides)."""

    __slots__ = ("cpus", "custom", "gpus", "memory")

    def __init__(self, cpus: float, memory: int, gpus: int, custom: dict[str, float]) -> None:
        self.cpus, self.memory, self.gpus, self.custom = cpus, memory, gpus, custom

    @classmethod
    def of(cls, res: Resources) -> _Vec:
        return cls(res.cpus, res.memory, res.gpus, dict(res.custom))

    def copy(self) -> _Vec:
        return _Vec(self.cpus, self.memory, self.gpus, dict(self.custom))

    def fits(self, res: Resources) -> bool:
        if res.cpus > self.cpus + _EPS or res.memory > self.memory or res.gpus > self.gpus:
            return False
        return all(amount <= self.custom.get(name, 0.0) + _EPS for name, amount in res.custom.items())

    def add(self, res: Resources, sign: int = 1) -> None:
        self.cpus += sign * res.cpus
        self.memory += sign * res.memory
        self.gpus += sign * res.gpus
        for name, amount in res.custom.items():
            self.custom[name] = self.custom.get(name, 0.0) + sign * amount

    def tightness(self, res: Resources) -> float:
        """The largest fraction of a free resource that `res` would take (1.0: fills it exactly)."""
        best = 0.0
        if res.cpus > 0:
            best = res.cpus / max(self.cpus, _EPS)
        if res.memory > 0:
            best = max(best, res.memory / max(self.memory, 1))
        if res.gpus > 0:
            best = max(best, res.gpus / max(self.gpus, 1))
        for name, amount in res.custom.items():
            if amount > 0:
                best = max(best, amount / max(self.custom.get(name, 0.0), _EPS))
        return best


@dataclass
class _Reservation:
    """What the first blocked candidate is promised (EASY backfilling)."""

    shadow: float
    """When it is expected to fit."""
    spare: _Vec
    """What will be free beyond its request at that time."""

    def allows(self, cand: Candidate, now: float) -> bool:
        """Whether launching `cand` now keeps the promise: it ends by then, or fits in the spare part."""
        return now + cand.estimate <= self.shadow + _EPS or self.spare.fits(cand.resources)


class ReadyQueue:
    """Ready attempts; `take` says which to launch now (see the module docstring for the order)."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config if config is not None else PolicyConfig()
        self._entries: dict[int, _Entry] = {}
        self._buckets: dict[int, dict[str, list[_Item]]] = {}
        """Class -> run -> heap of its candidates (with stale items of moved or removed ones)."""
        self._aging: list[tuple[float, int, int]] = []
        """(when the candidate next rises a class, token, key)."""
        self._classes: Counter[int] = Counter()
        """How many queued candidates have each base priority: the top one caps aging."""
        self._cpus: Counter[float] = Counter()
        """How many queued candidates ask for each amount of CPU: a call ends once none can fit."""
        self._started: dict[int, float] = {}
        """When this queue launched each key, to tell when running attempts are expected to end."""
        self._stamp = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, candidate: Candidate) -> None:
        """Add a ready attempt (a queued one with the same key is replaced)."""
        self.remove(candidate.key)
        self._stamp += 1
        entry = _Entry(candidate, candidate.priority, self._stamp, self._stamp)
        self._entries[candidate.key] = entry
        self._insert(entry)
        self._classes[candidate.priority] += 1
        self._cpus[candidate.resources.cpus] += 1
        aging = self.config.aging_seconds
        if 0 < aging < math.inf:
            heapq.heappush(self._aging, (candidate.ready_at + aging, entry.token, candidate.key))

    def remove(self, key: int) -> bool:
        """Drop a queued attempt; False if it was not queued."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        _decrement(self._classes, entry.cand.priority)
        _decrement(self._cpus, entry.cand.resources.cpus)
        return True

    def take(self, free: Resources, now: float = 0.0, running: Sequence[Candidate] = ()) -> list[Candidate]:
        """Remove and return the attempts to launch now, in launch order.

        `free` is what is free now; `running` the candidates running now (their runs' CPUs count for
        fair share, their pools for pool limits, their expected ends for reservations). `now` is on
        the clock of `Candidate.ready_at` and must not go backwards between calls.
        """
        if not self._entries:
            return []
        self._age(now)
        if len(self._started) > 2 * len(running) + 256:
            self._started = {c.key: self._started[c.key] for c in running if c.key in self._started}
        return _Turn(self, free, now, running).launch()

    # -- internals ----------------------------------------------------------------------------------
    def _insert(self, entry: _Entry) -> None:
        cand = entry.cand
        heap = self._buckets.setdefault(entry.klass, {}).setdefault(cand.run_id, [])
        heapq.heappush(heap, (-cand.rank, cand.seq, entry.stamp, cand.key))

    def _age(self, now: float) -> None:
        aging = self.config.aging_seconds
        heap = self._aging
        if not 0 < aging < math.inf:
            heap.clear()
            return
        top = max(self._classes, default=0)
        while heap and heap[0][0] <= now:
            _, token, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is None or entry.token != token:
                continue
            cand = entry.cand
            periods = max(0, math.floor((now - cand.ready_at) / aging))
            # Past the top class waiting, rising would only reorder work within it (see the module doc);
            # should a higher class arrive later, the next tick lifts this one further.
            klass = min(cand.priority + periods, max(top, cand.priority))
            if klass > entry.klass:
                self._stamp += 1
                entry.klass, entry.stamp = klass, self._stamp
                self._insert(entry)
            heapq.heappush(heap, (max(cand.ready_at + (periods + 1) * aging, math.nextafter(now, math.inf)),
                                  token, key))

    def _group(self, heap: list[_Item]) -> list[_Entry]:
        """Pop the head and the candidates of the same standing behind it (at most `fit_scan`)."""
        entries = self._entries
        first = heapq.heappop(heap)
        group = [entries[first[3]]]
        floor = first[0] + abs(first[0]) * self.config.fit_window + _EPS  # on -rank
        scan = self.config.fit_scan
        while heap and heap[0][0] <= floor and len(group) < scan:
            item = heapq.heappop(heap)
            entry = entries.get(item[3])
            if entry is not None and entry.stamp == item[2]:
                group.append(entry)
        return group

    def _reserve(self, head: Candidate, avail: _Vec, now: float, running: Iterable[Candidate]
                 ) -> _Reservation | None:
        """When `head` should fit, from the expected ends of what runs; None if it never will."""
        ends = sorted(((max(now, self._started.get(c.key, now) + c.estimate), i, c.resources)
                       for i, c in enumerate(running)), key=lambda e: (e[0], e[1]))
        pool = avail.copy()
        for end, _, res in ends:
            pool.add(res)
            if pool.fits(head.resources):
                pool.add(head.resources, -1)
                return _Reservation(end, pool)
        return None


class _Turn:
    """One `take`: what is free, who uses what, and the head of every (class, run) bucket."""

    def __init__(self, queue: ReadyQueue, free: Resources, now: float, running: Sequence[Candidate]) -> None:
        self.queue, self.now, self.running = queue, now, running
        self.config = queue.config
        self.avail = _Vec.of(free)
        self.usage: dict[str, float] = {}
        self.in_pool: dict[str, int] = {}
        for cand in running:
            self.usage[cand.run_id] = self.usage.get(cand.run_id, 0.0) + cand.resources.cpus
            if cand.pool is not None:
                self.in_pool[cand.pool] = self.in_pool.get(cand.pool, 0) + 1
        self.top = max(queue._classes)
        self.heads: dict[tuple[int, str], tuple[int, float, float, int]] = {}
        """(class, run) -> the place of its head in the order: (-tier, share, -rank, seq); min() comes next."""
        self.classes_of: dict[str, list[int]] = {}
        buckets = queue._buckets
        for klass in list(buckets):
            runs = buckets[klass]
            for run_id in list(runs):
                if self.refresh(klass, run_id):
                    self.classes_of.setdefault(run_id, []).append(klass)
                else:
                    del runs[run_id]
            if not runs:
                del buckets[klass]

    def refresh(self, klass: int, run_id: str) -> bool:
        """Drop stale items off the bucket's heap and place its head; False once the bucket is empty."""
        runs = self.queue._buckets.get(klass)
        heap = runs.get(run_id) if runs is not None else None
        entries = self.queue._entries
        while heap:
            entry = entries.get(heap[0][3])
            if entry is not None and entry.stamp == heap[0][2]:
                break
            heapq.heappop(heap)
        if not heap:
            self.heads.pop((klass, run_id), None)
            return False
        share = 0.0
        if self.config.fair_share:
            weight, used = self.config.run_weights.get(run_id, 1.0), self.usage.get(run_id, 0.0)
            share = used / weight if weight > 0 else (math.inf if used > 0 else 0.0)
        self.heads[(klass, run_id)] = (-min(klass, self.top), share, heap[0][0], heap[0][1])
        return True

    def launch(self) -> list[Candidate]:
        """Walk the order, launching what fits and keeps the reservation, until the scan bound."""
        queue, config, avail, heads, now = self.queue, self.config, self.avail, self.heads, self.now
        chosen: list[Candidate] = []
        passed: list[tuple[int, str, _Item]] = []
        reservation: _Reservation | None = None
        reserved = False  # a reservation was tried (one per call, for the first candidate that cannot launch)
        while heads and len(passed) < config.backfill_scan and avail.cpus + _EPS >= min(queue._cpus):
            klass, run_id = min(heads, key=heads.__getitem__)
            heap = queue._buckets[klass][run_id]
            group = queue._group(heap)
            if not reserved:
                head = group[0].cand
                if not avail.fits(head.resources):
                    reserved = True
                    reservation = queue._reserve(head, avail, now, [*self.running, *chosen])
                elif not self.pool_ok(head):
                    reserved = True  # waits for a pool slot, not for resources: nothing to hold for it
            best = self.best_fit(group, reservation)
            for entry in group:
                if entry is not best:
                    item = (-entry.cand.rank, entry.cand.seq, entry.stamp, entry.cand.key)
                    if best is None:
                        passed.append((klass, run_id, item))
                    else:
                        heapq.heappush(heap, item)
            if best is None:
                self.refresh(klass, run_id)
                continue
            cand = best.cand
            avail.add(cand.resources, -1)
            if reservation is not None and now + cand.estimate > reservation.shadow + _EPS:
                reservation.spare.add(cand.resources, -1)
            self.usage[run_id] = self.usage.get(run_id, 0.0) + cand.resources.cpus
            if cand.pool is not None:
                self.in_pool[cand.pool] = self.in_pool.get(cand.pool, 0) + 1
            queue.remove(cand.key)
            queue._started[cand.key] = now
            chosen.append(cand)
            for other in self.classes_of[run_id] if config.fair_share else (klass,):
                self.refresh(other, run_id)  # the run's share grew: every bucket of it moves
        for klass, run_id, item in passed:
            heapq.heappush(queue._buckets.setdefault(klass, {}).setdefault(run_id, []), item)
        return chosen

    def best_fit(self, group: list[_Entry], reservation: _Reservation | None) -> _Entry | None:
        """The entry of `group` that can launch and fits tightest (the first among equals), if any."""
        avail = self.avail
        best: _Entry | None = None
        best_fit = -1.0
        for entry in group:
            res = entry.cand.resources
            if res.cpus > avail.cpus + _EPS or not avail.fits(res) or not self.pool_ok(entry.cand):
                continue
            if reservation is not None and not reservation.allows(entry.cand, self.now):
                continue
            if len(group) == 1:
                return entry
            tightness = avail.tightness(res)
            if tightness > best_fit + _EPS:
                best, best_fit = entry, tightness
        return best

    def pool_ok(self, cand: Candidate) -> bool:
        if cand.pool is None:
            return True
        limit = self.config.pools.get(cand.pool)
        return limit is None or self.in_pool.get(cand.pool, 0) < limit


def _decrement(counter: Counter[_T], value: _T) -> None:
    counter[value] -= 1
    if not counter[value]:
        del counter[value]


def select(candidates: Iterable[Candidate], free: Resources, config: PolicyConfig | None = None,
           now: float = 0.0, running: Sequence[Candidate] = ()) -> list[Candidate]:
    """The attempts to launch from `candidates` with `free` resources (see `ReadyQueue.take`)."""
    queue = ReadyQueue(config)
    for cand in candidates:
        queue.push(cand)
    return queue.take(free, now, running)
