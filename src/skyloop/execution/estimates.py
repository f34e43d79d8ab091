"""Duration estimates and critical-path ranks for a run, learned from the attempts in the DB."""

from __future__ import annotations

from sqlalchemy.orm import Session

from skyloop.execution.runstate import Prepared
from skyloop.pipelines.step import code_hash
from skyloop.scheduling.estimates import Estimator, Sample
from skyloop.scheduling.ranks import upward_ranks
from skyloop.store.durations import duration_history

__all__ = ["estimate_run"]


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
