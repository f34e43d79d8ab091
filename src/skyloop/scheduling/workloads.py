"""Synthetic workloads for the simulator: seeded, plain data, shaped like what skyloop runs.

Four families, each a `Scenario` of several runs submitted close together on one machine
(`WORKSTATION`: 16 CPUs, 64 GiB, 2 GPUs, 2 seats of a licensed tool, a `gpu-train` pool of 1):

- `layered`: three random layered DAGs (4-8 layers of 2-10 tasks, each task waiting on 1-3 tasks
  of the layer above and sometimes on an older one). Durations are log-normal around 40 s with a
  heavy tail (sigma 1, 2 s to 30 min); requests of 1/2/4/8 CPUs (45/30/17/8%), 1-4 GiB per CPU,
  8% ask for a GPU, 5% for a license seat. Heterogeneous.
- `fork-join`: four runs of three map stages (split -> 8-32 shards -> join). Every task asks for
  1 CPU and 2 GiB; a shard takes 3 s plus its size at 10 MB/s, sizes log-normal around 200 MB, so
  durations vary but requests do not. Shards of a stage are one step (they share history) and
  carry their input size. Homogeneous.
- `ml`: three ML pipelines: prepare -> {embed on a GPU (5-15 min), 32 HPO trials of 2 CPUs
  (log-normal around 40-120 s), validate data} -> select best trial -> train (GPU, 8 CPUs, pool
  `gpu-train`) -> evaluate -> report. The critical path runs through embed and train, not through
  the wide HPO fan-out. Heterogeneous.
- `mixed`: five runs of the shapes above submitted over 5 minutes: a high-priority retrain (class 1),
  a second ML pipeline, two layered DAGs (one of weight 2) and a fork-join. Heterogeneous.

`SimTask.duration` is the expected duration; `realize` draws what one execution actually takes:
log-normal noise of sigma `SimTask.noise` (10-30%) and, for 2% of tasks, a straggler 2-4x slower.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from skyloop.spec.resources import Resources

__all__ = [
    "FAMILIES", "WORKSTATION", "WORKSTATION_POOLS", "Scenario", "SimRun", "SimTask",
    "fork_join", "layered_dag", "ml_pipeline", "realize",
]

GiB = 2**30
MB = 10**6
WORKSTATION = Resources(cpus=16, memory=64 * GiB, gpus=2, custom={"license": 2})
"""The machine every family runs on."""
WORKSTATION_POOLS = {"gpu-train": 1}
"""Concurrency pools of that machine."""


@dataclass(frozen=True)
class SimTask:
    """One task of a simulated run: what it waits for, asks for and takes."""

    name: str
    deps: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    duration: float = 1.0
    """Seconds: the expected duration, or the actual one once `realize`d."""
    priority: int = 0
    pool: str | None = None
    step: str = ""
    """Identity for learning durations (siblings of a fan-out share it); empty means the name."""
    input_bytes: int | None = None
    noise: float = 0.2
    """Sigma of the log-normal factor between runs."""

    def sample(self, rng: random.Random, straggler_rate: float = 0.02) -> float:
        """What one execution takes: the duration times noise, now and then a straggler."""
        seconds = self.duration * math.exp(rng.gauss(0.0, self.noise))
        if rng.random() < straggler_rate:
            seconds *= rng.uniform(2.0, 4.0)
        return seconds


@dataclass(frozen=True)
class SimRun:
    """A run of simulated tasks, submitted at `submit_at` seconds."""

    run_id: str
    tasks: tuple[SimTask, ...]
    priority: int = 0
    weight: float = 1.0
    submit_at: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """Runs that share one machine."""

    name: str
    runs: tuple[SimRun, ...]
    capacity: Resources = WORKSTATION
    pools: dict[str, int] = field(default_factory=lambda: dict(WORKSTATION_POOLS))
    heterogeneous: bool = True
    """Whether tasks differ in what they ask for (not only in how long they take)."""


def realize(runs: Sequence[SimRun], seed: int, straggler_rate: float = 0.02) -> tuple[SimRun, ...]:
    """The same runs with the durations of one execution drawn around the expected ones."""
    rng = random.Random(seed)
    return tuple(
        replace(run, tasks=tuple(replace(t, duration=t.sample(rng, straggler_rate)) for t in run.tasks))
        for run in runs
    )


def _lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    return min(high, max(low, rng.lognormvariate(math.log(median), sigma)))


def layered_dag(rng: random.Random, run_id: str, priority: int = 0, weight: float = 1.0,
                submit_at: float = 0.0) -> SimRun:
    """A random layered DAG with heterogeneous durations and requests."""
    layers: list[list[str]] = []
    tasks: list[SimTask] = []
    for depth in range(rng.randint(4, 8)):
        layer = [f"l{depth}t{i}" for i in range(rng.randint(2, 10))]
        for name in layer:
            deps: list[str] = []
            if layers:
                deps = rng.sample(layers[-1], rng.randint(1, min(3, len(layers[-1]))))
                if len(layers) > 1 and rng.random() < 0.2:
                    deps.append(rng.choice(rng.choice(layers[:-1])))
            cpus = rng.choices([1, 2, 4, 8], weights=[45, 30, 17, 8])[0]
            custom = {"license": 1.0} if rng.random() < 0.05 else {}
            resources = Resources(cpus=cpus, memory=int(cpus * rng.uniform(1, 4) * GiB),
                                  gpus=1 if rng.random() < 0.08 else 0, custom=custom)
            tasks.append(SimTask(name, tuple(dict.fromkeys(deps)), resources, _lognormal(rng, 40, 1.0, 2, 1800),
                                 noise=rng.uniform(0.1, 0.3)))
        layers.append(layer)
    return SimRun(run_id, tuple(tasks), priority, weight, submit_at)


def fork_join(rng: random.Random, run_id: str, priority: int = 0, weight: float = 1.0,
              submit_at: float = 0.0, stages: int = 3) -> SimRun:
    """Map stages over shards of varying size, joined between stages; every task asks for 1 CPU."""
    small = Resources(cpus=1, memory=2 * GiB)
    tasks = [SimTask("split", (), small, rng.uniform(5, 30), noise=0.1)]
    before = "split"
    for stage in range(stages):
        shards = []
        for i in range(rng.randint(8, 32)):
            size = int(_lognormal(rng, 200 * MB, 0.8, 10 * MB, 2000 * MB))
            name = f"s{stage}-map{i}"
            tasks.append(SimTask(name, (before,), small, 3.0 + size / (10 * MB), step=f"s{stage}-map",
                                 input_bytes=size, noise=0.1))
            shards.append(name)
        before = f"s{stage}-join"
        tasks.append(SimTask(before, tuple(shards), small, rng.uniform(10, 30), noise=0.1))
    return SimRun(run_id, tuple(tasks), priority, weight, submit_at)


def ml_pipeline(rng: random.Random, run_id: str, priority: int = 0, weight: float = 1.0,
                submit_at: float = 0.0, trials: int = 32) -> SimRun:
    """prepare -> {embed (GPU), HPO fan-out, validate} -> select -> train (GPU, pool) -> evaluate -> report."""
    trial_median = rng.uniform(40, 120)
    hpo = [f"hpo{i}" for i in range(trials)]
    tasks = [
        SimTask("prepare", (), Resources(cpus=4, memory=16 * GiB), rng.uniform(60, 240)),
        SimTask("embed", ("prepare",), Resources(cpus=4, memory=24 * GiB, gpus=1), rng.uniform(300, 900)),
        SimTask("validate", ("prepare",), Resources(cpus=1, memory=2 * GiB), rng.uniform(30, 90)),
        *(SimTask(name, ("prepare",), Resources(cpus=2, memory=4 * GiB), _lognormal(rng, trial_median, 0.5, 5, 3600),
                  step="hpo", noise=0.3) for name in hpo),
        SimTask("select", tuple(hpo), Resources(cpus=1, memory=GiB), rng.uniform(5, 15)),
        SimTask("train", ("select", "embed"), Resources(cpus=8, memory=32 * GiB, gpus=1), rng.uniform(300, 1200),
                pool="gpu-train"),
        SimTask("evaluate", ("train", "validate"), Resources(cpus=2, memory=8 * GiB), rng.uniform(60, 180)),
        SimTask("report", ("evaluate",), Resources(cpus=1, memory=GiB), rng.uniform(5, 15)),
    ]
    return SimRun(run_id, tuple(tasks), priority, weight, submit_at)


def _layered(seed: int) -> Scenario:
    rng = random.Random(seed)
    runs = tuple(layered_dag(rng, f"dag{i}", submit_at=rng.uniform(0, 60)) for i in range(3))
    return Scenario("layered", runs)


def _fork_join(seed: int) -> Scenario:
    rng = random.Random(seed)
    runs = tuple(fork_join(rng, f"fj{i}", submit_at=rng.uniform(0, 60)) for i in range(4))
    return Scenario("fork-join", runs, heterogeneous=False)


def _ml(seed: int) -> Scenario:
    rng = random.Random(seed)
    runs = tuple(ml_pipeline(rng, f"ml{i}", submit_at=rng.uniform(0, 120)) for i in range(3))
    return Scenario("ml", runs)


def _mixed(seed: int) -> Scenario:
    rng = random.Random(seed)
    runs = (
        ml_pipeline(rng, "retrain", priority=1, submit_at=rng.uniform(0, 300)),
        ml_pipeline(rng, "experiment", submit_at=rng.uniform(0, 300)),
        layered_dag(rng, "etl", submit_at=rng.uniform(0, 300)),
        layered_dag(rng, "features", weight=2.0, submit_at=rng.uniform(0, 300)),
        fork_join(rng, "backfill", submit_at=rng.uniform(0, 300)),
    )
    return Scenario("mixed", runs)


FAMILIES: dict[str, Callable[[int], Scenario]] = {
    "layered": _layered, "fork-join": _fork_join, "ml": _ml, "mixed": _mixed,
}
"""Workload family -> scenario for a seed."""
