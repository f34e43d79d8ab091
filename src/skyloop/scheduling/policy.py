"""Which ready step attempts to launch now, given free resources (pure: no I/O, no clock; time is passed in).

The order, from the first criterion to the last:

1. **Priority class**, higher first. Aging (`aging.py`), so that nothing starves behind a stream of
   urgent work: for every `aging_seconds` in which a run launched nothing, its oldest waiting
   candidate rises one class, up to the highest class waiting (and so does one that waited four
   periods while its run launched other work). Past that, lifting would only reorder work of one
   class, and fair share (next) already serves the starved run first.
2. **Fair share** between runs of one class, as a guarantee rather than a sort key: each run is
   entitled to its weight over the weights of the runs waiting in its class, of its *dominant*
   resource (Dominant Resource Fairness, as in Mesos and YARN: a run holding one of two GPUs holds
   half the machine, whatever its CPUs). A run that has held less than that for `fair_share_seconds`
   is *starved*: its candidates go first whenever it is below its entitlement, until it has held it for
   `fair_share_seconds` in a row (`fairshare`). Otherwise runs
   do not take turns: rank alone orders them, because interleaving runs by share delays every run's
   critical path for the sake of the others (the benchmark measured 5-15% longer makespans that way).
3. **Upward rank**, longest first: the task heading the longest remaining path (of any run of the class).
4. **Arrival** (`seq`), oldest first.

Packing: among candidates of the same standing (same class and run, rank within `fit_window` of the
best one; the first `fit_scan` of them in order) that can launch, the tightest fit wins: the one that
uses the largest fraction of what is free of some resource it asks for (best fit; with CPUs alone,
the largest request that fits). When the first candidate in order does not fit, it gets a reservation
(EASY backfilling, see `backfill`): candidates behind it launch only if they are expected to end before it
could start or fit in what will be spare then (small work fills the gap; all estimates 0: greedy backfill).

Cost: candidates sit in heaps per bucket (class, run, CPU request), bucket heads in a heap kept between
calls; only buckets touched since are placed again. Once the first candidate is settled, a call looks
only at heads whose CPUs fit, passes over those that cannot backfill unpopped, and stops after
`backfill_scan` passes: O((buckets + launched + scan) log n) per call, not O(waiting).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TypeVar

from skyloop.scheduling.aging import Aging
from skyloop.scheduling.amounts import EPS, Amounts, Holdings
from skyloop.scheduling.backfill import Reservation, reserve
from skyloop.scheduling.candidates import BACKFILL_SCAN, PLAIN, Candidate, PolicyConfig, Shape, request_shape
from skyloop.scheduling.fairshare import Patience, entitlements
from skyloop.spec.resources import Resources

__all__ = ["BACKFILL_SCAN", "Candidate", "PolicyConfig", "ReadyQueue", "select"]

_T = TypeVar("_T")

_Bucket = tuple[int, str, float, Shape]
"""(class, run id, CPUs asked for, pool, GPUs and custom resources asked for): the candidates of one heap. The
pool and the coarse resources are part of it, and each bucket knows its smallest memory request, so that a
bucket whose pool is full, or whose GPUs, memory or custom resources are all taken, is passed over whole,
unpopped: a fan-out of hundreds waiting on one pool slot must not use up a call's scan and keep the rest of
the machine idle. (Memory, which varies step by step, is not in the key: it would split runs into many
buckets, and a busy machine's call costs per bucket.)"""
_Item = tuple[float, int, int, int]
"""A heap item: (-rank, seq, stamp, key). Stamps are unique, so comparisons never reach the key."""
_Head = tuple[int, int, float, int, int, _Bucket]
"""Where a bucket's head stands, min() first: (-tier, 0 if its run is starved else 1, -rank, seq, stamp, bucket).
Flat, so that heap comparisons stay cheap; stamps are unique, so they never reach the bucket."""


class _Entry:
    __slots__ = ("bucket", "cand", "stamp", "token")

    def __init__(self, cand: Candidate, bucket: _Bucket, stamp: int, token: int) -> None:
        self.cand, self.bucket, self.stamp, self.token = cand, bucket, stamp, token

    def item(self) -> _Item:
        return (-self.cand.rank, self.cand.seq, self.stamp, self.cand.key)


class ReadyQueue:
    """Ready attempts; `take` says which to launch now (see the module docstring for the order)."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config if config is not None else PolicyConfig()
        self._entries: dict[int, _Entry] = {}
        self._heaps: dict[_Bucket, list[_Item]] = {}
        """Bucket -> heap of its candidates (with stale items of moved or removed ones)."""
        self._heads: dict[_Bucket, _Head] = {}
        """Bucket -> its head's place in the order; right for every bucket not in `_dirty`."""
        self._order: list[_Head] = []
        """Heap of the placed heads, first in order on top; those that are not `_heads`' (by identity) are stale."""
        self._dirty: set[_Bucket] = set()
        self._short: dict[_Bucket, list[tuple[float, int, int]]] = {}
        """Bucket -> heap of (estimate, stamp, key): its shortest candidate, for backfilling a reservation."""
        self._small: dict[_Bucket, list[tuple[int, int, int]]] = {}
        """Bucket -> heap of (memory, stamp, key) of its candidates asking for memory: its smallest request."""
        self._by_run: dict[str, set[_Bucket]] = {}
        self._run_classes: dict[str, Counter[int]] = {}
        """Run -> how many of its queued candidates sit in each (aged) class."""
        self._shares: dict[str, float] | None = None
        """Run -> its weight over the weights of the runs waiting in its class; None when a run's
        class, the runs waiting or the top class changed (`_Turn.share` works it out again)."""
        self._share_weights: dict[str, float] = {}
        """The weights `_shares` was worked out from (they may change between calls)."""
        self._aging = Aging(self.config.aging_seconds, self._standing)
        self._classes: Counter[int] = Counter()
        """How many queued candidates have each base priority: the top one caps aging."""
        self._cpus: Counter[float] = Counter()
        """How many queued candidates ask for each amount of CPU: a call ends once none can fit."""
        self._running: dict[int, tuple[Candidate, float, int]] = {}
        """Key -> (candidate, expected end, stamp) of every attempt running (see `take`, `occupy`, `done`)."""
        self._ends: list[tuple[float, int, int]] = []
        """(expected end, stamp, key) of the running attempts, sorted: the reservation's timeline."""
        self._holdings = Holdings()
        self._in_pool: Counter[str] = Counter()
        """Pool -> how many of its members run (pool limits)."""
        self._patience = Patience()
        """Since when each run has been short of its fair share (see `fairshare`)."""
        self._starved: set[str] = set()
        """Runs whose candidates go first (as the heads in `_heads` say)."""
        self._top: int | None = None
        self._stamp = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, candidate: Candidate) -> None:
        """Add a ready attempt (a queued one with the same key is replaced)."""
        replaced = self._drop(candidate.key)
        if replaced is not None and replaced.cand.run_id != candidate.run_id:
            self._left(replaced.cand.run_id)
        self._stamp += 1
        klass, token = candidate.priority, self._stamp
        if replaced is not None and replaced.cand.run_id == candidate.run_id:
            # The same attempt again (a new rank, say): it keeps the classes aging gave it, and its clock.
            klass, token = klass + max(0, replaced.bucket[0] - replaced.cand.priority), replaced.token
        bucket = (klass, candidate.run_id, candidate.resources.cpus, request_shape(candidate))
        entry = _Entry(candidate, bucket, self._stamp, token)
        self._entries[candidate.key] = entry
        self._insert(entry)
        self._classes[candidate.priority] += 1
        self._cpus[candidate.resources.cpus] += 1
        if token == self._stamp:
            self._aging.add(candidate.run_id, candidate.ready_at, token, candidate.key)

    def remove(self, key: int) -> bool:
        """Drop a queued attempt (launched, cancelled); False if it was not queued."""
        entry = self._drop(key)
        if entry is None:
            return False
        self._left(entry.cand.run_id)
        return True

    def take(self, free: Resources, now: float = 0.0,
             claim: Callable[[Candidate], bool] | None = None) -> list[Candidate]:
        """Remove and return the attempts to launch now, in launch order; they count as running until `done`.

        `free` is what is free now. The running attempts' CPUs count for their runs' fair share, their
        pools for pool limits, their expected ends (start + estimate) for reservations. `now` is on
        the clock of `Candidate.ready_at` and must not go backwards between calls. `claim` is asked for
        each member of a pool about to launch (e.g. to take its slot in a DB shared with other processes):
        one it refuses stays queued as it was, with its class and aging clock, and is not launched.
        """
        if not self._entries:
            return []
        top = max(self._classes)
        self._age(now, top)
        if top != self._top:
            self._top = top
            self._shares = None
            self._dirty.update(self._heads)
        turn = _Turn(self, free, now, claim)
        for bucket in self._dirty:
            self._refresh(bucket)
        self._dirty.clear()
        return turn.launch()

    def occupy(self, candidate: Candidate, started_at: float) -> None:
        """Count an attempt this queue did not launch as running since `started_at` (e.g. one adopted);
        queued under the same key, it leaves the queue."""
        self.remove(candidate.key)
        self._hold(candidate, started_at)

    def _hold(self, candidate: Candidate, started_at: float) -> None:
        """Count a candidate no longer queued as running since `started_at` (in place of a running one of its key)."""
        self.done(candidate.key)
        self._stamp += 1
        self._running[candidate.key] = (candidate, end := started_at + candidate.estimate, self._stamp)
        bisect.insort(self._ends, (end, self._stamp, candidate.key))
        self._holdings.hold(candidate.run_id, candidate.resources)
        self._aging.served(candidate.run_id, started_at)
        if candidate.pool is not None:
            self._in_pool[candidate.pool] += 1

    def done(self, key: int) -> bool:
        """A running attempt ended (or never will): its resources, share and pool slot free up; False if unknown."""
        held = self._running.pop(key, None)
        if held is None:
            return False
        cand, end, stamp = held
        del self._ends[bisect.bisect_left(self._ends, (end, stamp, key))]
        self._holdings.release(cand.run_id, cand.resources)
        if cand.pool is not None:
            _decrement(self._in_pool, cand.pool)
        return True

    @property
    def running(self) -> list[Candidate]:
        """The attempts counted as running, in order of expected end."""
        return [self._running[key][0] for _, _, key in self._ends]

    # -- internals ----------------------------------------------------------------------------------
    def _left(self, run_id: str) -> None:
        """A candidate of `run_id` left the queue: with nothing of it waiting, it is short of nothing
        and its fair-share clock starts afresh when it comes back."""
        if run_id not in self._run_classes:
            self._patience.forget(run_id)
            self._starved.discard(run_id)
            self._aging.forget(run_id)

    def _drop(self, key: int) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            _decrement(self._classes, entry.cand.priority)
            _decrement(self._cpus, entry.cand.resources.cpus)
            self._forget(entry)
        return entry

    def _insert(self, entry: _Entry) -> None:
        bucket = entry.bucket
        self._restore(bucket, entry.item())
        heapq.heappush(self._short.setdefault(bucket, []), (entry.cand.estimate, entry.stamp, entry.cand.key))
        memory = entry.cand.resources.memory
        heapq.heappush(self._small.setdefault(bucket, []), (memory, entry.stamp, entry.cand.key))
        self._dirty.add(bucket)
        counts = self._run_classes.setdefault(bucket[1], Counter())
        counts[bucket[0]] += 1
        if counts[bucket[0]] == 1:
            self._shares = None

    def _forget(self, entry: _Entry) -> None:
        """Account for `entry` leaving its bucket (its heap item goes stale)."""
        klass, run_id = entry.bucket[0], entry.bucket[1]
        self._dirty.add(entry.bucket)
        counts = self._run_classes[run_id]
        _decrement(counts, klass)
        if klass not in counts:
            self._shares = None
        if not counts:
            del self._run_classes[run_id]

    def _restore(self, bucket: _Bucket, item: _Item) -> None:
        heapq.heappush(self._heaps.setdefault(bucket, []), item)
        self._by_run.setdefault(bucket[1], set()).add(bucket)

    def _shortest(self, bucket: _Bucket) -> _Entry | None:
        """The queued candidate of the bucket expected to end soonest."""
        heap, entries = self._short.get(bucket), self._entries
        while heap:
            entry = entries.get(heap[0][2])
            if entry is not None and entry.stamp == heap[0][1]:
                return entry
            heapq.heappop(heap)
        self._short.pop(bucket, None)
        return None

    def _least_memory(self, bucket: _Bucket) -> int:
        """The smallest memory request among the bucket's queued candidates (0 when it has none)."""
        heap, entries = self._small.get(bucket), self._entries
        while heap:
            entry = entries.get(heap[0][2])
            if entry is not None and entry.stamp == heap[0][1]:
                return heap[0][0]
            heapq.heappop(heap)
        return 0

    def _sweep(self) -> None:
        """Forget the shortest-first and smallest-first heaps of buckets that emptied."""
        if len(self._short) > 2 * len(self._heaps) + 16:
            self._short = {b: heap for b, heap in self._short.items() if b in self._heaps}
            self._small = {b: heap for b, heap in self._small.items() if b in self._heaps}

    def _refresh(self, bucket: _Bucket) -> _Head | None:
        """Drop stale items off the bucket's heap and place its head (returned); forget the bucket once empty."""
        heap = self._heaps.get(bucket)
        entries = self._entries
        while heap:
            entry = entries.get(heap[0][3])
            if entry is not None and entry.stamp == heap[0][2]:
                break
            heapq.heappop(heap)
        if not heap:
            self._heaps.pop(bucket, None)
            self._heads.pop(bucket, None)
            buckets = self._by_run.get(bucket[1])
            if buckets is not None:
                buckets.discard(bucket)
                if not buckets:
                    del self._by_run[bucket[1]]
            return None
        top = self._top if self._top is not None else bucket[0]
        rank, seq, stamp, _ = heap[0]
        place = self._heads[bucket] = (-min(bucket[0], top), 0 if bucket[1] in self._starved else 1, rank, seq, stamp,
                                       bucket)
        order = self._order
        heapq.heappush(order, place)
        if len(order) > 2 * len(self._heads) + 64:  # mostly stale: build it again from the placed heads
            order[:] = self._heads.values()
            heapq.heapify(order)
        return place

    def _age(self, now: float, top: int) -> None:
        """Lift the candidates that `Aging` says waited long enough (`top`: the highest class waiting)."""
        for key, klass in self._aging.lifts(now, top):
            entry = self._entries[key]
            self._forget(entry)
            self._stamp += 1
            entry.bucket, entry.stamp = (klass, *entry.bucket[1:]), self._stamp
            self._insert(entry)

    def _standing(self, key: int, token: int) -> tuple[int, int] | None:
        """(class now, own class) of the queued candidate `key` pushed as `token`; None if it left."""
        entry = self._entries.get(key)
        return None if entry is None or entry.token != token else (entry.bucket[0], entry.cand.priority)

    def _group(self, bucket: _Bucket) -> list[_Entry]:
        """Pop the bucket's head and the candidates of the same standing behind it (at most `fit_scan`)."""
        heap, entries = self._heaps[bucket], self._entries
        first = heapq.heappop(heap)
        group = [entries[first[3]]]
        floor = first[0] + abs(first[0]) * self.config.fit_window + EPS  # on -rank
        scan = self.config.fit_scan
        while heap and heap[0][0] <= floor and len(group) < scan:
            item = heapq.heappop(heap)
            entry = entries.get(item[3])
            if entry is not None and entry.stamp == item[2]:
                group.append(entry)
        return group

    def _reserve(self, head: Candidate, avail: Amounts, now: float) -> Reservation | None:
        """When `head` should fit, from the expected ends of what runs; None if it never will."""
        running = self._running
        return reserve(head, avail, ((end, running[key][0].resources) for end, _, key in self._ends), now)


class _Turn:
    """One `take`: what is free, who uses what, who is starved, and the loop that launches."""

    def __init__(self, queue: ReadyQueue, free: Resources, now: float,
                 claim: Callable[[Candidate], bool] | None) -> None:
        self.queue, self.now, self.config, self.claim = queue, now, queue.config, claim
        self.avail = Amounts.of(free)
        self.holdings, self.in_pool = queue._holdings, queue._in_pool  # launches below add to them (`occupy`)
        self.entitled: dict[str, float] = {}
        """Run -> the share of the machine (of its dominant resource) it is entitled to."""
        if self.config.fair_share:
            self.holdings.measure(free)
            self.share()
        else:
            for run_id in list(queue._starved):
                self.mark(run_id, False)

    def share(self) -> None:
        """Each waiting run's entitlement within its class, and whether it has been short of it too long."""
        queue, weights, now = self.queue, self.config.run_weights, self.now
        shares = queue._shares
        if shares is None or weights != queue._share_weights:
            top = queue._top if queue._top is not None else 0
            shares = queue._shares = entitlements(queue._run_classes, weights, top)
            queue._share_weights = dict(weights)
        patience, starved = self.config.fair_share_seconds, queue._starved
        for run_id, share in shares.items():
            entitled = self.entitled[run_id] = share
            at_share = self.holdings.dominant(run_id) + EPS >= entitled
            if queue._patience.starved(run_id, at_share, now, patience) != (run_id in starved):
                self.mark(run_id, run_id not in starved)

    def mark(self, run_id: str, starved: bool) -> set[_Bucket]:
        """Set whether a run is starved; the buckets whose heads must be placed again."""
        queue = self.queue
        if starved == (run_id in queue._starved):
            return set()
        if starved:
            queue._starved.add(run_id)
        else:
            queue._starved.discard(run_id)
        buckets = set(queue._by_run.get(run_id, ()))
        queue._dirty |= buckets
        return buckets

    def launch(self) -> list[Candidate]:
        """Walk the order, launching what fits and keeps the reservation, until the scan bound."""
        queue, config, avail, now, heads = self.queue, self.config, self.avail, self.now, self.queue._heads
        chosen: list[Candidate] = []
        passed: list[tuple[_Bucket, _Item]] = []
        reservation: Reservation | None = None
        reserved = False  # a reservation was tried (one per call, for the first candidate that cannot launch)
        spent: set[_Bucket] = set()  # buckets whose head group could not launch: not looked at again this call
        walk: list[_Head] | None = None  # once the head is settled: the heads still worth a look (a heap)
        least = min(queue._cpus)  # the smallest CPU request queued: once it cannot fit, nothing can
        blocked = 0  # 1 once the first bucket was passed over without popping its candidates
        while heads and len(passed) + blocked < config.backfill_scan and avail.cpus + EPS >= least:
            if not reserved:
                bucket = self.first_bucket()
                if bucket is not None and not self.may_fit(bucket) and not self.tied(bucket):
                    # Its head, like all of its standing, asks for more than is free (a busy machine's usual
                    # call), or waits for a pool slot: it gets the reservation (nothing to hold for a pool slot)
                    # without popping anything, and is looked at no more.
                    heapq.heappush(queue._order, heads[bucket])
                    reserved, blocked = True, 1
                    if self.pool_free(bucket[3][0]):
                        reservation = queue._reserve(queue._entries[queue._heaps[bucket][0][3]].cand, avail, now)
                    continue
            else:
                if walk is None:
                    walk = [place for place in heads.values() if place[5][2] <= avail.cpus + EPS]
                    heapq.heapify(walk)
                bucket = self.next_bucket(walk, spent, reservation)
            if bucket is None:
                break
            group = self.gather(bucket)
            if not reserved:
                head = group[0].cand
                if not avail.fits(head.resources):
                    reserved = True
                    reservation = queue._reserve(head, avail, now)
                elif not self.pool_free(head.pool):
                    reserved = True  # waits for a pool slot, not for resources: nothing to hold for it
            best = self.best_fit(group, reservation)
            touched = {bucket}
            if best is None and reservation is not None and self.all_fit(group):
                # They fit but would delay the reserved head. Rather than walk the bucket in rank order
                # for one short enough, try its shortest candidate and look at the bucket no more this
                # call: a busy machine then costs O(buckets) a call, not O(backfill_scan).
                spent.add(bucket)
                short = queue._shortest(bucket)
                if short is not None and short not in group and self.can_launch(short, reservation):
                    best = short
            if best is not None and best.cand.pool is not None and self.claim is not None \
                    and not self.claim(best.cand):
                best, reserved = None, True  # another process took the slot: it waits as it was, holding nothing
            for entry in group:
                touched.add(entry.bucket)
                if entry is best:
                    continue
                if best is None:
                    passed.append((entry.bucket, entry.item()))
                else:
                    heapq.heappush(queue._heaps[entry.bucket], entry.item())
            if best is not None:
                cand = best.cand
                avail.add(cand.resources, -1)
                if reservation is not None and now + cand.estimate > reservation.shadow + EPS:
                    reservation.spare.add(cand.resources, -1)
                run_id = cand.run_id
                queue.remove(cand.key)
                queue._hold(cand, now)
                chosen.append(cand)
                least = min(queue._cpus, default=math.inf)
                if run_id in queue._starved and \
                        self.holdings.dominant(run_id) + EPS >= self.entitled.get(run_id, 0.0):
                    queue._patience.even(run_id, now, config.fair_share_seconds)  # served first no more, for now
                    touched |= self.mark(run_id, False)
            for other in touched:
                place = queue._refresh(other)
                if walk is not None and place is not None:
                    heapq.heappush(walk, place)
        for bucket, item in passed:
            queue._restore(bucket, item)
        for bucket in {bucket for bucket, _ in passed}:
            queue._refresh(bucket)
        queue._dirty.clear()  # every bucket touched above was placed again
        queue._sweep()
        return chosen

    def first_bucket(self) -> _Bucket | None:
        """Pop the first bucket in order; the caller places its head again (`_refresh`, or pushing it back)."""
        order, heads = self.queue._order, self.queue._heads
        while order:
            place = heapq.heappop(order)
            if heads.get(place[5]) is place:
                return place[5]
        return None

    def next_bucket(self, walk: list[_Head], spent: set[_Bucket], reservation: Reservation | None) -> _Bucket | None:
        """Once the head is settled: pop the first bucket of `walk` worth a look, passing over those already
        looked at, asking for more CPUs than are free, or too big for the reservation's spare part with
        a shortest candidate that ends after its shadow. `walk` is this call's view: `_order` is no longer
        popped, so it keeps every head, those placed again meanwhile included."""
        queue, heads = self.queue, self.queue._heads
        room = self.avail.cpus + EPS
        while walk:
            place = heapq.heappop(walk)
            bucket = place[5]
            if heads.get(bucket) is not place or bucket[2] > room or bucket in spent or not self.may_fit(bucket):
                continue  # stale (placed again or emptied), or hopeless
            if reservation is not None and bucket[2] > reservation.spare.cpus + EPS:
                short = queue._shortest(bucket)
                if short is None or self.now + short.cand.estimate > reservation.shadow + EPS:
                    continue
            return bucket
        return None

    def gather(self, bucket: _Bucket) -> list[_Entry]:
        """The bucket's head, the candidates of the same standing behind it, and the heads of the same
        standing in the run's buckets of other CPU requests that fit (all popped off their heaps)."""
        queue = self.queue
        tied = self.tied(bucket)
        group = queue._group(bucket)
        if tied:
            own = len(group)
            for other in tied[:max(0, self.config.fit_scan - own)]:
                item = heapq.heappop(queue._heaps[other])  # placed heads are live
                group.append(queue._entries[item[3]])
            if len(group) > own and len(group) > 2:
                group[1:] = sorted(group[1:], key=lambda e: (-e.cand.rank, e.cand.seq))
        return group

    def tied(self, bucket: _Bucket) -> list[_Bucket]:
        """The run's other buckets of the class whose heads stand with the bucket's head and ask for CPUs
        that fit, the best-standing first (not in the set's order, which varies with hash seeds)."""
        heads, room = self.queue._heads, self.avail.cpus + EPS
        siblings = self.queue._by_run.get(bucket[1], ())
        if len(siblings) < 2:
            return []
        floor = heads[bucket][2] + abs(heads[bucket][2]) * self.config.fit_window + EPS
        tied = []
        for other in siblings:
            if other[2] <= room and other[0] == bucket[0] and other != bucket:
                place = heads.get(other)
                if place is not None and place[2] <= floor and self.may_fit(other):
                    tied.append(other)
        if len(tied) > 1:
            tied.sort(key=heads.__getitem__)
        return tied

    def best_fit(self, group: list[_Entry], reservation: Reservation | None) -> _Entry | None:
        """The entry of `group` that can launch and fits tightest (the first among equals), if any."""
        avail = self.avail
        best: _Entry | None = None
        best_fit = -1.0
        for entry in group:
            if not self.can_launch(entry, reservation):
                continue
            if len(group) == 1:
                return entry
            tightness = avail.tightness(entry.cand.resources)
            if tightness > best_fit + EPS:
                best, best_fit = entry, tightness
        return best

    def all_fit(self, group: list[_Entry]) -> bool:
        """Whether every entry of `group` could launch but for the reservation."""
        if len(group) == 1:  # the usual case, without a generator
            return self.can_launch(group[0], None)
        return all(self.can_launch(entry, None) for entry in group)

    def can_launch(self, entry: _Entry, reservation: Reservation | None) -> bool:
        """Whether it fits now, has a pool slot and keeps the reservation."""
        cand = entry.cand
        return self.avail.fits(cand.resources) and self.pool_free(cand.pool) and \
            (reservation is None or reservation.allows(cand, self.now))

    def pool_free(self, pool: str | None) -> bool:
        """Whether a member of `pool` (None: of no pool) may start: the pool has a slot free."""
        if pool is None:
            return True
        limit = self.config.pools.get(pool)
        return limit is None or (self.in_pool.get(pool, 0) + self.config.pools_held_elsewhere.get(pool, 0)) < limit

    def may_fit(self, bucket: _Bucket) -> bool:
        """Whether some of the bucket's candidates may fit what is free now and have a pool slot (they share
        all of the request but the memory; the smallest memory request must fit)."""
        shape, avail = bucket[3], self.avail
        if bucket[2] > avail.cpus + EPS or self.queue._least_memory(bucket) > avail.memory:
            return False
        if shape is PLAIN:
            return True
        pool, gpus, custom = shape
        if gpus > avail.gpus or not self.pool_free(pool):
            return False
        return all(amount <= avail.custom.get(name, 0.0) + EPS for name, amount in custom)


def _decrement(counter: Counter[_T], value: _T) -> None:
    left = counter[value] - 1
    if left:
        counter[value] = left
    else:
        del counter[value]


def select(candidates: Iterable[Candidate], free: Resources, config: PolicyConfig | None = None,
           now: float = 0.0, running: Iterable[Candidate] = ()) -> list[Candidate]:
    """The attempts to launch from `candidates` with `free` resources while `running` run, started
    `now` (see `ReadyQueue.take`)."""
    queue = ReadyQueue(config)
    for cand in running:
        queue.occupy(cand, now)
    for cand in candidates:
        queue.push(cand)
    return queue.take(free, now)
