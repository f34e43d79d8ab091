"""Scheduling without I/O: which ready steps to launch, how long steps take, and a simulator to prove it.

- `policy`: `ReadyQueue` orders ready attempts by priority class (with aging), fair share between
  runs, upward rank (critical path first) and arrival, packs them best-fit with EASY backfilling,
  and honours concurrency pools across runs. It decides on `candidates` (a `Candidate` per ready
  attempt, and the `PolicyConfig`), keeping free resources as `amounts`; `backfill` holds the
  reservation of the first candidate that cannot launch.
- `ranks`: upward ranks (longest remaining path) from per-task estimates; across runs, lengthened by
  the queue each shared concurrency pool will have (`pooled_ranks`), in the order through the pool
  that simulating the policy finds best (`plan_pools`).
- `estimates`: expected durations learned from a step's history (median or EWMA, scaled by input size).
- `workloads` and `simulator`: seeded synthetic runs and an event-driven simulator with FIFO and
  Airflow-style baselines and a makespan lower bound (`benchmarks/scheduling.py` uses them).
"""

from __future__ import annotations

from skyloop.scheduling.estimates import Estimate, Estimator, Sample
from skyloop.scheduling.policy import BACKFILL_SCAN, Candidate, PolicyConfig, ReadyQueue, select
from skyloop.scheduling.ranks import RankedRun, pooled_ranks, upward_ranks
from skyloop.scheduling.simulator import (
    PLAN_BUDGET,
    ListQueue,
    Scheduler,
    SimResult,
    downstream_weights,
    lower_bound,
    plan_pools,
    simulate,
)
from skyloop.scheduling.workloads import (
    FAMILIES,
    WORKSTATION,
    WORKSTATION_POOLS,
    Scenario,
    SimRun,
    SimTask,
    fork_join,
    layered_dag,
    ml_pipeline,
    realize,
)

__all__ = [
    "BACKFILL_SCAN", "FAMILIES", "PLAN_BUDGET", "WORKSTATION", "WORKSTATION_POOLS",
    "Candidate", "Estimate", "Estimator", "ListQueue", "PolicyConfig", "RankedRun", "ReadyQueue", "Sample",
    "Scenario",
    "Scheduler", "SimResult", "SimRun", "SimTask",
    "downstream_weights", "fork_join", "layered_dag", "lower_bound", "ml_pipeline", "plan_pools", "pooled_ranks",
    "realize", "select", "simulate", "upward_ranks",
]
