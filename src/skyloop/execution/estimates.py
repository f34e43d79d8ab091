"""Duration estimates and critical-path ranks for a run, learned from the attempts in the DB."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from skyloop.execution.runstate import Prepared, RunState
from skyloop.execution.tasks import TaskState
from skyloop.execution.units import TaskProgress
from skyloop.pipelines.step import code_hash
from skyloop.scheduling.candidates import PolicyConfig
from skyloop.scheduling.estimates import Estimator, Sample
from skyloop.scheduling.ranks import RankedRun, pool_queues, pooled_ranks, upward_ranks
from skyloop.scheduling.simulator import PLAN_BUDGET, plan_pools
from skyloop.scheduling.workloads import SimRun, SimTask
from skyloop.spec.resources import Resources
from skyloop.store.durations import duration_history

__all__ = ["PLAN_TASKS", "RunEstimates", "estimate_run", "rank_together"]

PLAN_TASKS = 5_000
"""Simulated tasks the pool planning of `rank_together` may run through (tasks times simulations): at
55-75 us a simulated task, a plan holds the orchestrator's loop 0.4 s at most (3 ML runs: 117 tasks,
6 simulations, 45 ms)."""


@dataclass
class RunEstimates:
    """What a run's history says: per task the expected seconds of one attempt (and where that came from)
    and its upward rank, and the history of the tasks whose attempts vary in input size (`sized`), for
    estimates of each unit fitted to its own inputs (`Estimator.estimate` with `input_bytes`)."""

    estimates: dict[str, tuple[float, str]]
    ranks: dict[str, float]
    estimator: Estimator
    sized: dict[str, list[Sample]] = field(default_factory=dict)


def estimate_run(session: Session, prepared: Prepared, default_seconds: float) -> RunEstimates:
    """Per task: expected seconds of one attempt, its upward rank, and the samples to scale by input size.

    History is keyed by the step's import path and code hash, so editing a step starts it afresh.
    """
    keys = {t.name: (t.step.path, code_hash(prepared.steps[t.name].fn)) for t in prepared.spec.tasks}
    history = duration_history(session, keys.values())
    estimator = Estimator(default_seconds=default_seconds)
    estimates: dict[str, tuple[float, str]] = {}
    sized: dict[str, list[Sample]] = {}
    for task, key in keys.items():
        # The history comes newest first; the estimator wants oldest first (EWMA weighs the last most).
        samples = [Sample(seconds, size) for seconds, size in reversed(history[key])]
        found = estimator.estimate(samples)
        estimates[task] = (found.seconds, found.source)
        window = samples[-estimator.window:]
        if len({s.input_bytes for s in window if s.input_bytes is not None}) >= estimator.min_sizes:
            sized[task] = samples
    deps = {t.name: t.upstream() for t in prepared.spec.tasks}
    ranks = upward_ranks(deps, {task: seconds for task, (seconds, _) in estimates.items()})
    return RunEstimates(estimates, ranks, estimator, sized)


def rank_together(runs: Sequence[RunState], config: PolicyConfig, capacity: Resources,
                  plan_tasks: int = PLAN_TASKS) -> bool:
    """Set the ranks of `runs` taken together where their tasks share a limited pool (`pooled_ranks`),
    with the order through each queued pool that simulating the policy on the estimates finds best
    (`plan_pools`).

    Only tasks still to run or running count (those that ended are past every queue); a mapped task
    counts as its units once it has them, except in a limited pool: there it stays one member, as long
    as its units still to run take going through the pool (see `_pooled_seconds`). The
    planning runs at most `plan_tasks` simulated tasks in all (fewer simulations for larger runs;
    none past it: Schrage's rule alone, as where a step asks for more than the capacity). Returns
    whether any run has a task in one of the pools (else nothing was changed).
    """
    pools = config.pools
    if not any(p.spec.pool in pools for run in runs for p in run.tasks.values()):
        return False
    open_states = (TaskState.PENDING, TaskState.RUNNING)
    graphs = [
        RankedRun(deps={name: p.spec.upstream() for name, p in run.tasks.items()},
                  estimates={name: _pooled_seconds(p, run.estimates.get(name, (0.0, ""))[0], pools)
                             if p.state in open_states else 0.0 for name, p in run.tasks.items()},
                  pools={name: p.spec.pool for name, p in run.tasks.items()
                         if p.spec.pool is not None and p.state in open_states},
                  klass=run.priority, cpus={name: p.spec.resources.cpus for name, p in run.tasks.items()})
        for run in runs
    ]
    orders = None
    if pool_queues(graphs, pools, capacity.cpus):
        sims = [_simulated(run, open_states, pools) for run in runs]
        size = sum(len(run.tasks) for run in sims)
        try:
            orders = plan_pools(sims, capacity, config, min(PLAN_BUDGET, plan_tasks // max(1, size)))
        except ValueError:  # the simulator refuses a step beyond the capacity: its run fails on activation
            orders = None
    for run, ranks in zip(runs, pooled_ranks(graphs, pools, capacity.cpus, orders), strict=True):
        run.ranks = ranks
    return True


def _pooled_seconds(progress: TaskProgress, seconds: float, pools: Mapping[str, int]) -> float:
    """How long a task of `seconds` an attempt holds its pool, where that has a limit: a mapped task's units
    still to run go through it `limit` at a time (as one member, it was planned as one unit: the pool
    looked free N times sooner than it would be)."""
    limit = pools.get(progress.spec.pool) if progress.spec.pool is not None else None
    if limit is None or not progress.spec.map_over:
        return seconds
    left = max(1, progress.size - len(progress.unit_outputs))
    return left * seconds / max(1, min(limit, left))


def _simulated(run: RunState, open_states: tuple[TaskState, ...], pools: Mapping[str, int]) -> SimRun:
    """The tasks of `run` still to run (or running) as the simulator takes them, each its estimate long."""
    names: dict[str, list[str]] = {}  # task -> its simulated tasks (a mapped one's units)
    for name, p in run.tasks.items():
        if p.state in open_states:
            units = p.size if p.spec.map_over and p.spec.pool is None else 1  # a pool member stays one
            names[name] = [f"{name}[{i}]" for i in range(units)] if units > 1 else [name]
    tasks = []
    for name, sims in names.items():
        p = run.tasks[name]
        deps = tuple(sim for up in p.spec.upstream() for sim in names.get(up, ()))
        seconds = _pooled_seconds(p, run.estimates.get(name, (0.0, ""))[0], pools)
        tasks += [SimTask(sim, deps, p.spec.resources, seconds, pool=p.spec.pool) for sim in sims]
    return SimRun(run.run_id, tuple(tasks), run.priority, run.weight)
