"""Duration estimates and critical-path ranks for a run, learned from the attempts in the DB."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy.orm import Session

from skyloop.execution.runstate import Prepared, RunState
from skyloop.execution.tasks import TaskState
from skyloop.pipelines.step import code_hash
from skyloop.scheduling.estimates import Estimator, Sample
from skyloop.scheduling.ranks import RankedRun, pooled_ranks, upward_ranks
from skyloop.store.durations import duration_history

__all__ = ["estimate_run", "rank_together"]


def estimate_run(session: Session, prepared: Prepared, default_seconds: float
                 ) -> tuple[dict[str, tuple[float, str]], dict[str, float]]:
    """Per task: expected seconds of one attempt (and where that came from), and its upward rank.

    History is keyed by the step's import path and code hash, so editing a step starts it afresh.
    """
    keys = {t.name: (t.step.path, code_hash(prepared.steps[t.name].fn)) for t in prepared.spec.tasks}
    history = duration_history(session, keys.values())
    estimator = Estimator(default_seconds=default_seconds)
    estimates: dict[str, tuple[float, str]] = {}
    for task, key in keys.items():
        # The history comes newest first; the estimator wants oldest first (EWMA weighs the last most).
        found = estimator.estimate([Sample(seconds, size) for seconds, size in reversed(history[key])])
        estimates[task] = (found.seconds, found.source)
    deps = {t.name: t.upstream() for t in prepared.spec.tasks}
    return estimates, upward_ranks(deps, {task: seconds for task, (seconds, _) in estimates.items()})


def rank_together(runs: Sequence[RunState], pools: Mapping[str, int], cpus: float) -> bool:
    """Set the ranks of `runs` taken together where their tasks share a limited pool (`pooled_ranks`).

    Tasks that ended count 0 seconds; a mapped task counts as one member of its pool. Returns whether
    any run has a task in one of `pools` (else nothing was changed).
    """
    if not any(p.spec.pool in pools for run in runs for p in run.tasks.values()):
        return False
    open_states = (TaskState.PENDING, TaskState.RUNNING)
    graphs = [
        RankedRun(deps={name: p.spec.upstream() for name, p in run.tasks.items()},
                  estimates={name: run.estimates.get(name, (0.0, ""))[0] if p.state in open_states else 0.0
                             for name, p in run.tasks.items()},
                  pools={name: p.spec.pool for name, p in run.tasks.items() if p.spec.pool is not None},
                  klass=run.priority, cpus={name: p.spec.resources.cpus for name, p in run.tasks.items()})
        for run in runs
    ]
    for run, ranks in zip(runs, pooled_ranks(graphs, pools, cpus), strict=True):
        run.ranks = ranks
    return True
