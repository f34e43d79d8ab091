"""Upward ranks: how long the rest of a run takes from each task on, if nothing ever waits.

`pooled_ranks` ranks the tasks of several runs at once where they share concurrency pools: a pool of
limit 1 shared by three runs is a bottleneck that per-run ranks cannot see (each run ranks its pool
task as if the pool were free, so the runs feed it in no useful order and it idles at the start).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Group", "Member", "RankedRun", "pool_queues", "pooled_ranks", "upward_ranks"]

K = TypeVar("K", bound=Hashable)


def upward_ranks(deps: Mapping[K, Iterable[K]], estimates: Mapping[K, float]) -> dict[K, float]:
    """The upward rank of every task: its estimate plus the largest rank among the tasks that wait on it.

    `deps` maps each task to the tasks it waits for. A task named only as a dependency counts too;
    a task without an estimate counts as 0 seconds. The rank is the length of the longest path from
    the task to the end of the run (HEFT's upward rank), so the task with the largest rank heads the
    critical path. Linear in tasks plus edges; raises `ValueError` on a cycle.
    """
    parents: dict[K, list[K]] = {}
    waiting: dict[K, int] = {}
    for task, ups in deps.items():
        unique = list(dict.fromkeys(ups))
        parents[task] = unique
        waiting.setdefault(task, 0)
        for up in unique:
            waiting[up] = waiting.get(up, 0) + 1
            parents.setdefault(up, [])
    # Walk from the sinks up: a task is ranked once every task waiting on it is.
    longest_below = dict.fromkeys(waiting, 0.0)
    ranks: dict[K, float] = {}
    stack = [task for task, n in waiting.items() if n == 0]
    while stack:
        task = stack.pop()
        rank = ranks[task] = float(estimates.get(task, 0.0)) + longest_below[task]
        for up in parents[task]:
            if rank > longest_below[up]:
                longest_below[up] = rank
            waiting[up] -= 1
            if waiting[up] == 0:
                stack.append(up)
    if len(ranks) != len(waiting):
        stuck = sorted(str(task) for task in waiting if task not in ranks)
        raise ValueError(f"the dependencies have a cycle: {stuck[:5]} are on it or feed it")
    return ranks


@dataclass(frozen=True)
class RankedRun:
    """What `pooled_ranks` needs of one run."""

    deps: Mapping[str, Iterable[str]]
    """Task -> the tasks it waits for."""
    estimates: Mapping[str, float]
    """Task -> expected seconds (missing: 0)."""
    pools: Mapping[str, str] = field(default_factory=dict)
    """Task -> the concurrency pool it belongs to, for the tasks in one."""
    release: float = 0.0
    """When the run's first tasks can start, on a clock shared by all runs (its submission)."""
    klass: int = 0
    """Priority class: only runs of one class queue behind each other in a pool plan."""
    cpus: Mapping[str, float] = field(default_factory=dict)
    """Task -> CPUs it asks for (missing: 0): its ancestors' CPU-seconds delay a pool member too."""


Member = tuple[int, str]
"""A member of a pool: (index of its run, task)."""
Group = tuple[str, int]
"""The members of a pool that queue behind each other: (pool, priority class)."""


def pooled_ranks(runs: Sequence[RankedRun], limits: Mapping[str, int], cpus: float = 0.0,
                 orders: Mapping[Group, Sequence[Member]] | None = None) -> list[dict[str, float]]:
    """Upward ranks of every run's tasks, lengthened by the queue in front of each shared pool.

    Per run, a task's rank is its longest path to the end of the run. A pool of limit `L` whose
    members outnumber `L` serialises them, so this plans the order they go through the pool (see
    `pool_queues`; `orders` gives it instead, per group, as `plan_pools` finds by simulation) and
    lays them on `L` lanes, each member on the lane that frees first. Consecutive members of a lane
    become an edge, as if the later one waited for the earlier, and ranks are taken over the runs
    joined by those edges. A member early in the plan then carries the pool work queued behind it,
    so the tasks that feed it go first and the pool starts as soon as it can; a member the plan puts
    last keeps its own rank, and so does all work of a pool that never queues (the rank only grows
    where the queue is tight).

    Pools missing from `limits` are unlimited. Returns one `{task: rank}` per run, in order; the
    plain per-run ranks where the joined graph has a cycle (it cannot with positive estimates).
    """
    plain = [upward_ranks(run.deps, run.estimates) for run in runs]
    edges: list[tuple[Member, Member]] = []
    for group, members in _queued(runs, limits, cpus, plain).items():
        given = (orders or {}).get(group)
        if given is None or sorted(given) != sorted((run, task) for *_, run, task in members):
            given = _plan(members, limits[group[0]])  # none given, or not these members: Schrage's
        edges += _lanes(members, max(1, limits[group[0]]), given)
    if not edges:
        return plain
    deps: dict[Member, list[Member]] = {
        (i, task): [(i, up) for up in run.deps.get(task, ())] for i, run in enumerate(runs) for task in plain[i]
    }
    for before, after in edges:
        deps[after].append(before)
    estimates = {(i, task): float(runs[i].estimates.get(task, 0.0)) for i in range(len(runs)) for task in plain[i]}
    try:
        joined = upward_ranks(deps, estimates)
    except ValueError:
        return plain
    out: list[dict[str, float]] = [{} for _ in runs]
    for (i, task), rank in joined.items():
        out[i][task] = rank
    return out


def pool_queues(runs: Sequence[RankedRun], limits: Mapping[str, int], cpus: float = 0.0) -> dict[Group, list[Member]]:
    """The groups of pool members that queue (more members than the pool's limit), each in the order
    `pooled_ranks` plans by default: list scheduling on the pool's lanes, where each member is
    released at its earliest start (its run's release plus its longest path from a source, or plus
    its ancestors' CPU-seconds over `cpus` where that is later) and, among those released, the one
    with the longest tail after it goes first (Schrage's rule)."""
    plain = [upward_ranks(run.deps, run.estimates) for run in runs]
    return {group: _plan(members, limits[group[0]]) for group, members in _queued(runs, limits, cpus, plain).items()}


_Timed = tuple[float, float, float, int, str]
"""A pool member as planned: (earliest start, tail after it, own estimate, run, task)."""


def _queued(runs: Sequence[RankedRun], limits: Mapping[str, int], cpus: float, plain: Sequence[Mapping[str, float]]
            ) -> dict[Group, list[_Timed]]:
    """The members of every group that outnumber their pool's limit."""
    members: dict[Group, list[_Timed]] = {}
    for i, run in enumerate(runs):
        if not run.pools:
            continue
        waiting_on: dict[str, list[str]] = {task: [] for task in plain[i]}
        for task, ups in run.deps.items():
            for up in ups:
                waiting_on[up].append(task)
        heads = upward_ranks(waiting_on, run.estimates)  # the graph reversed: longest path from a source
        for task, pool in run.pools.items():
            if pool in limits and task in plain[i]:
                own = float(run.estimates.get(task, 0.0))
                start = run.release + max(heads[task] - own, _work_before(run, task) / cpus if cpus > 0 else 0.0)
                members.setdefault((pool, run.klass), []).append((start, plain[i][task] - own, own, i, task))
    return {group: tasks for group, tasks in members.items() if len(tasks) > max(1, limits[group[0]])}


def _plan(tasks: list[_Timed], limit: int) -> list[Member]:
    """Schrage's rule on `limit` lanes: the order in which the members go through the pool."""
    pending = sorted(tasks)
    released: list[tuple[float, float, float, int, str]] = []  # (-tail, start, own, run, task)
    lanes = [(0.0, n) for n in range(max(1, limit))]  # (free at, lane)
    order: list[Member] = []
    nxt = 0
    while nxt < len(pending) or released:
        free_at, lane = heapq.heappop(lanes)
        if not released and pending[nxt][0] > free_at:
            free_at = pending[nxt][0]
        while nxt < len(pending) and pending[nxt][0] <= free_at:
            start, tail, own, run, task = pending[nxt]
            heapq.heappush(released, (-tail, start, own, run, task))
            nxt += 1
        _, start, own, run, task = heapq.heappop(released)
        order.append((run, task))
        heapq.heappush(lanes, (max(free_at, start) + own, lane))
    return order


def _lanes(tasks: list[_Timed], limit: int, order: Sequence[Member]) -> list[tuple[Member, Member]]:
    """Lay the members on `limit` lanes in `order`, each on the lane that frees first; consecutive ones on a lane."""
    timed = {(run, task): (start, own) for start, _, own, run, task in tasks}
    lanes = [(0.0, n) for n in range(limit)]  # (free at, lane)
    last: dict[int, Member] = {}
    edges: list[tuple[Member, Member]] = []
    for member in order:
        free_at, lane = heapq.heappop(lanes)
        if lane in last:
            edges.append((last[lane], member))
        last[lane] = member
        start, own = timed[member]
        heapq.heappush(lanes, (max(free_at, start) + own, lane))
    return edges


def _work_before(run: RankedRun, task: str) -> float:
    """CPU-seconds of the tasks `task` waits for, directly or not."""
    seen: set[str] = set()
    stack = list(run.deps.get(task, ()))
    work = 0.0
    while stack:
        up = stack.pop()
        if up in seen:
            continue
        seen.add(up)
        work += float(run.estimates.get(up, 0.0)) * float(run.cpus.get(up, 0.0))
        stack.extend(run.deps.get(up, ()))
    return work
