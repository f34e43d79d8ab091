"""An event-driven simulator of runs on one machine: the policy decides, time jumps to the next end.

Nothing sleeps and nothing is launched: a task "runs" from the decision that launches it until its
`duration` has passed on the simulated clock. Policies compared:

- `skyloop`: `ReadyQueue` with upward ranks from the given estimates (true durations when none),
  taken across the runs where they share a limited pool (`pooled_ranks`) in the order through it
  that `plan_pools` finds by simulating the policy on those estimates, as the orchestrator does.
- `fifo`: arrival order, launching every ready task that fits (FIFO with unbounded backfill, so a
  large request never stalls the machine); ignores priority classes.
- `fifo-hol`: strict FIFO: stops at the first task that cannot launch (head-of-line blocking).
- `airflow`: Airflow's `priority_weight` with `weight_rule="downstream"` (1 + the number of tasks
  downstream), highest first, then arrival; also launches every task that fits, in that order.

All three respect capacity and pool limits. A callable policy is a factory of any object with
`push(Candidate)`, `take(free, now) -> list[Candidate]` and `done(key)` (a launched task ended);
candidates carry the key of the task in `[t for run in runs for t in run.tasks]`, its estimate and
its upward rank.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from skyloop.scheduling.amounts import Amounts
from skyloop.scheduling.policy import Candidate, PolicyConfig, ReadyQueue
from skyloop.scheduling.ranks import Group, Member, RankedRun, pool_queues, pooled_ranks, upward_ranks
from skyloop.scheduling.workloads import SimRun, SimTask
from skyloop.spec.resources import Resources

__all__ = ["ListQueue", "Scheduler", "SimResult", "downstream_weights", "lower_bound", "plan_pools", "simulate"]

PLAN_BUDGET = 24
"""Simulations `plan_pools` may run to order a set of runs through their shared pools."""


class Scheduler(Protocol):
    """What the simulator drives: the shape of `ReadyQueue`."""

    def push(self, candidate: Candidate) -> None: ...

    def take(self, free: Resources, now: float = 0.0) -> list[Candidate]: ...

    def done(self, key: int) -> bool: ...


@dataclass(frozen=True)
class SimResult:
    """What happened in one simulation."""

    policy: str
    makespan: float
    """When the last task ended (the clock starts at 0)."""
    finish: dict[str, float]
    """Run id -> when its last task ended."""
    peak: Resources
    """The most of each resource in use at once: never more than the capacity."""
    peak_pools: dict[str, int]
    """The most members of each pool running at once."""
    decisions: int
    """Calls to the policy's `take`."""
    decision_seconds: float
    """Wall time spent inside those calls."""
    spans: dict[tuple[str, str], tuple[float, float]]
    """(run id, task) -> (start, end)."""
    plan_seconds: float = 0.0
    """Wall time spent planning the order through shared pools (`plan_pools`), once, before the first decision."""


class ListQueue:
    """Greedy list scheduling in a fixed order: every candidate that fits launches, in that order.

    Without `backfill`, the first candidate that cannot launch stops the rest (head-of-line blocking).
    """

    def __init__(self, order: Callable[[Candidate], tuple[float, ...]], pools: Mapping[str, int] | None = None,
                 backfill: bool = True) -> None:
        self._order = order
        self._pools = dict(pools or {})
        self._backfill = backfill
        self._items: list[tuple[tuple[float, ...], int, Candidate]] = []
        self._pooled: dict[int, str] = {}
        """Key -> pool of the running members of a pool."""
        self._in_pool: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def push(self, candidate: Candidate) -> None:
        """Add a ready candidate."""
        bisect.insort(self._items, (self._order(candidate), candidate.key, candidate))

    def done(self, key: int) -> bool:
        """A launched candidate ended: its pool slot frees up."""
        pool = self._pooled.pop(key, None)
        if pool is not None:
            self._in_pool[pool] -= 1
        return pool is not None

    def take(self, free: Resources, now: float = 0.0) -> list[Candidate]:
        """Everything that fits, in order."""
        in_pool = self._in_pool
        chosen: list[Candidate] = []
        kept = []
        for n, item in enumerate(self._items):
            cand = item[2]
            limit = self._pools.get(cand.pool) if cand.pool is not None else None
            if cand.resources.fits(free) and (limit is None or in_pool.get(cand.pool or "", 0) < limit):
                chosen.append(cand)
                free = free - cand.resources
                if cand.pool is not None:
                    in_pool[cand.pool] = in_pool.get(cand.pool, 0) + 1
                    self._pooled[cand.key] = cand.pool
            elif self._backfill:
                kept.append(item)
            else:
                kept += self._items[n:]
                break
        self._items = kept
        return chosen


def downstream_weights(run: SimRun) -> dict[str, int]:
    """Airflow's downstream priority weight of every task: 1 plus the number of its descendants."""
    index = {t.name: i for i, t in enumerate(run.tasks)}
    children: dict[str, list[str]] = {t.name: [] for t in run.tasks}
    for t in run.tasks:
        for dep in t.deps:
            children[dep].append(t.name)
    below: dict[str, int] = {}  # bitset of descendants
    for name in reversed(_topological(run)):  # those that wait come first
        bits = 0
        for child in children[name]:
            bits |= (1 << index[child]) | below[child]
        below[name] = bits
    return {name: 1 + bits.bit_count() for name, bits in below.items()}


def _topological(run: SimRun) -> list[str]:
    deps = {t.name: t.deps for t in run.tasks}
    order: list[str] = []
    seen: set[str] = set()
    for name in deps:
        stack = [(name, iter(deps[name]))]
        if name in seen:
            continue
        seen.add(name)
        while stack:
            node, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                order.append(node)
                stack.pop()
            elif nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, iter(deps[nxt])))
    return order


def _check(runs: Sequence[SimRun], capacity: Resources, pools: Mapping[str, int]) -> None:
    ids = [run.run_id for run in runs]
    if len(set(ids)) != len(ids):
        raise ValueError("run ids must be unique")
    for run in runs:
        names = {t.name for t in run.tasks}
        if len(names) != len(run.tasks):
            raise ValueError(f"run {run.run_id}: task names must be unique")
        for t in run.tasks:
            if missing := [d for d in t.deps if d not in names]:
                raise ValueError(f"run {run.run_id}: task {t.name} waits on unknown {missing}")
            if not t.resources.fits(capacity):
                raise ValueError(f"run {run.run_id}: task {t.name} asks for more than the capacity")
            if t.pool is not None and pools.get(t.pool, 1) < 1:
                raise ValueError(f"run {run.run_id}: task {t.name} is in pool {t.pool} of limit 0")
        upward_ranks({t.name: t.deps for t in run.tasks}, {})  # raises on a cycle


def simulate(runs: Sequence[SimRun], capacity: Resources, policy: str | Callable[[], Scheduler] = "skyloop",
             estimates: Mapping[tuple[str, str], float] | None = None, config: PolicyConfig | None = None,
             default_estimate: float = 1.0, orders: Mapping[Group, Sequence[Member]] | None = None,
             plan_budget: int = PLAN_BUDGET) -> SimResult:
    """Run `runs` on a machine of `capacity` under `policy`; each task takes its `duration`.

    `estimates` maps (run id, task) to the seconds the policy believes a task takes (missing ones:
    `default_estimate`); None gives it the true durations. `config` supplies pools, aging and
    fair-share weights (run weights default to each run's `weight`). For `skyloop`, `orders` fixes
    the order of the members of each queued pool group (see `pooled_ranks`); without it, the order
    is planned as the orchestrator does (`plan_pools` on the believed durations, at most
    `plan_budget` simulations; 0: Schrage's rule alone).
    """
    config = replace(config) if config is not None else PolicyConfig()
    config.run_weights = {**{run.run_id: run.weight for run in runs}, **config.run_weights}
    _check(runs, capacity, config.pools)
    tasks: list[tuple[SimRun, SimTask]] = [(run, t) for run in runs for t in run.tasks]
    key_of = {(run.run_id, t.name): i for i, (run, t) in enumerate(tasks)}
    believed = [t.duration if estimates is None else estimates.get((run.run_id, t.name), default_estimate)
                for run, t in tasks]
    rank: list[float] = [0.0] * len(tasks)
    graphs = [_ranked(run, {t.name: believed[key_of[(run.run_id, t.name)]] for t in run.tasks}) for run in runs]
    planning = time.perf_counter()
    if policy == "skyloop" and orders is None and plan_budget > 0:
        seen = tuple(replace(run, tasks=tuple(replace(t, duration=believed[key_of[(run.run_id, t.name)]])
                                              for t in run.tasks)) for run in runs)
        orders = plan_pools(seen, capacity, config, plan_budget)
    plan_seconds = time.perf_counter() - planning
    for run, ranks in zip(runs, pooled_ranks(graphs, config.pools, capacity.cpus, orders), strict=True):
        for name, value in ranks.items():
            rank[key_of[(run.run_id, name)]] = value
    scheduler = _scheduler(policy, runs, config, key_of)

    waiting = [len(t.deps) for _, t in tasks]
    children: list[list[int]] = [[] for _ in tasks]
    for i, (run, t) in enumerate(tasks):
        for dep in t.deps:
            children[key_of[(run.run_id, dep)]].append(i)
    events: list[tuple[float, int, int]] = [(run.submit_at, 1, i) for i, run in enumerate(runs)]
    heapq.heapify(events)  # (time, 0 = a task ends / 1 = a run is submitted, index)
    running: dict[int, Candidate] = {}
    use, peak = Amounts.of(Resources(cpus=0)), Amounts.of(Resources(cpus=0))
    peak_pools: dict[str, int] = {}
    in_pool: dict[str, int] = {}
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    seq = 0
    decisions, spent, now, done = 0, 0.0, 0.0, 0

    def ready(i: int) -> None:
        nonlocal seq
        run, t = tasks[i]
        seq += 1
        scheduler.push(Candidate(key=i, resources=t.resources, priority=run.priority + t.priority, seq=seq,
                                 run_id=run.run_id, rank=rank[i], estimate=believed[i], pool=t.pool, ready_at=now))

    while events:
        now = events[0][0]
        while events and events[0][0] <= now:
            _, kind, i = heapq.heappop(events)
            if kind == 1:
                for t in runs[i].tasks:
                    if not t.deps:
                        ready(key_of[(runs[i].run_id, t.name)])
                continue
            cand = running.pop(i)
            scheduler.done(i)
            use.add(cand.resources, -1)
            if cand.pool is not None:
                in_pool[cand.pool] -= 1
            done += 1
            for child in children[i]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready(child)
        free = capacity - use.resources()
        started = time.perf_counter()  # the policy's decision alone
        launched = scheduler.take(free, now)
        spent += time.perf_counter() - started
        decisions += 1
        for cand in launched:
            run, t = tasks[cand.key]
            running[cand.key] = cand
            use.add(cand.resources)
            peak.raise_to(use)
            if cand.pool is not None:
                in_pool[cand.pool] = in_pool.get(cand.pool, 0) + 1
                peak_pools[cand.pool] = max(peak_pools.get(cand.pool, 0), in_pool[cand.pool])
            spans[(run.run_id, t.name)] = (now, now + t.duration)
            heapq.heappush(events, (now + t.duration, 0, cand.key))
    if done != len(tasks):
        raise RuntimeError(f"{len(tasks) - done} task(s) never ran: the policy left them waiting on a free machine")
    finish: dict[str, float] = {}
    for (run_id, _), (_, end) in spans.items():
        finish[run_id] = max(finish.get(run_id, 0.0), end)
    return SimResult(
        policy=policy if isinstance(policy, str) else getattr(policy, "__name__", "custom"),
        makespan=max(finish.values(), default=0.0), finish=finish, peak=peak.resources(),
        peak_pools=peak_pools, decisions=decisions, decision_seconds=spent, spans=spans, plan_seconds=plan_seconds,
    )


def _ranked(run: SimRun, estimates: Mapping[str, float]) -> RankedRun:
    return RankedRun({t.name: t.deps for t in run.tasks}, estimates,
                     {t.name: t.pool for t in run.tasks if t.pool is not None}, run.submit_at, run.priority,
                     {t.name: t.resources.cpus for t in run.tasks})


def plan_pools(runs: Sequence[SimRun], capacity: Resources, config: PolicyConfig | None = None,
               budget: int = PLAN_BUDGET) -> dict[Group, list[Member]]:
    """The order through each queued pool group (see `pool_queues`) under which skyloop's policy ends
    `runs` soonest, their durations taken as known (give it the estimates).

    Which run a pool of limit 1 should serve first depends on how soon each can feed it while the
    others compete for the same CPUs and GPUs, which the planned release times of `pool_queues` only
    guess at; simulating the candidates settles it. Groups are searched one after the other from
    Schrage's order: every order of a group of up to 4 members, else swaps of neighbours while one
    helps; at most `budget` simulations in all, the shortest makespan kept (the earlier order on a tie).
    """
    config = config if config is not None else PolicyConfig()
    plan = pool_queues([_ranked(run, {t.name: t.duration for t in run.tasks}) for run in runs], config.pools,
                       capacity.cpus)
    if not plan or budget <= 0:
        return plan
    left = budget

    def span(candidate: dict[Group, list[Member]]) -> float:
        nonlocal left
        left -= 1
        return simulate(runs, capacity, "skyloop", None, config, orders=candidate).makespan

    best = span(plan)
    for group in list(plan):
        if len(plan[group]) <= 4:
            for permuted in itertools.permutations(plan[group]):
                if left <= 0:
                    return plan
                order = list(permuted)
                if order != plan[group] and (made := span(candidate := {**plan, group: order})) < best:
                    best, plan = made, candidate
            continue
        climbing = True
        while climbing:  # swap neighbours until none helps, climbing on from each better order
            climbing = False
            for order in _swaps(plan[group]):
                if left <= 0:
                    return plan
                if (made := span(candidate := {**plan, group: order})) < best:
                    best, plan, climbing = made, candidate, True
                    break
    return plan


def _swaps(order: list[Member]) -> Iterator[list[Member]]:
    """`order` with each pair of neighbours swapped in turn."""
    for n in range(len(order) - 1):
        swapped = list(order)
        swapped[n], swapped[n + 1] = swapped[n + 1], swapped[n]
        yield swapped


def _scheduler(policy: str | Callable[[], Scheduler], runs: Sequence[SimRun], config: PolicyConfig,
               key_of: Mapping[tuple[str, str], int]) -> Scheduler:
    if not isinstance(policy, str):
        return policy()
    if policy == "skyloop":
        return ReadyQueue(config)
    if policy in ("fifo", "fifo-hol"):
        return ListQueue(lambda c: (c.seq,), config.pools, backfill=policy == "fifo")
    if policy == "airflow":
        weight = [0] * len(key_of)
        for run in runs:
            for name, w in downstream_weights(run).items():
                weight[key_of[(run.run_id, name)]] = w
        return ListQueue(lambda c: (-weight[c.key], c.seq), config.pools)
    raise ValueError(f"unknown policy {policy!r}: use 'skyloop', 'fifo', 'fifo-hol', 'airflow' or a factory")


def lower_bound(runs: Iterable[SimRun], capacity: Resources, pools: Mapping[str, int] | None = None,
                tight: bool = False) -> float:
    """No schedule ends sooner: max(submit + critical path of a run, work / capacity of each resource).

    Work is duration times request summed over the tasks; a pool counts as a resource of its limit.
    `tight` adds to each resource's bound the time before any task using it can start and after the
    last one can end: for every set of its tasks that cannot start before `h` (or that leave at least
    `t` of their run after them), `h + work / capacity + shortest tail` (or `earliest start + work /
    capacity + t`). Still a valid bound, closer to the optimum where a scarce resource (a GPU, a
    pool) sits in the middle of the runs.
    """
    pools = pools or {}
    bound = 0.0
    users: dict[str, list[tuple[float, float, float]]] = {}  # resource -> (head, tail, work) per task
    limits: dict[str, float] = {"cpus": capacity.cpus, "memory": float(capacity.memory), "gpus": capacity.gpus,
                                **{f"custom:{k}": v for k, v in capacity.custom.items()},
                                **{f"pool:{k}": float(v) for k, v in pools.items()}}
    for run in runs:
        durations = {t.name: t.duration for t in run.tasks}
        tails = upward_ranks({t.name: t.deps for t in run.tasks}, durations)
        bound = max(bound, run.submit_at + max(tails.values(), default=0.0))
        waiting_on: dict[str, list[str]] = {t.name: [] for t in run.tasks}
        for t in run.tasks:
            for dep in t.deps:
                waiting_on[dep].append(t.name)
        heads = upward_ranks(waiting_on, durations)  # the graph reversed: longest path from a source
        for t in run.tasks:
            head = run.submit_at + heads[t.name] - t.duration if tight else 0.0
            tail = tails[t.name] - t.duration if tight else 0.0
            asks = {"cpus": t.resources.cpus, "memory": float(t.resources.memory), "gpus": float(t.resources.gpus),
                    **{f"custom:{k}": v for k, v in t.resources.custom.items()}}
            if t.pool is not None:
                asks[f"pool:{t.pool}"] = 1.0
            for name, amount in asks.items():
                if amount > 0 and limits.get(name, 0.0) > 0:
                    users.setdefault(name, []).append((head, tail, t.duration * amount))
    for name, tasks in users.items():
        bound = max(bound, _resource_bound(tasks, limits[name]))
    return bound


def _resource_bound(tasks: list[tuple[float, float, float]], limit: float) -> float:
    """max over suffixes by earliest start (and by tail) of start + work / limit + tail."""
    best = 0.0
    for by in (0, 1):
        work, other = 0.0, float("inf")
        for task in sorted(tasks, key=lambda x: x[by], reverse=True):
            work += task[2]
            other = min(other, task[1 - by])
            best = max(best, task[by] + work / limit + other)
    return best
