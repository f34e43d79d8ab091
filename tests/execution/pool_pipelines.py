"""Two runs that share a pool of one trainer (loaded by file path; agents import them by path too).

`fast` reaches the trainer after a short feed, `slow` after a long one: fed first, `fast` starts the
trainer early and `slow`'s feed runs while it trains. Per-run ranks alone would feed `slow` first
(its own path is longer) and leave the trainer idle meanwhile.
"""

from __future__ import annotations

import time

from skyloop import Resources, pipeline, step


@step(cache=False, resources=Resources(cpus=1))
def feed_fast() -> int:
    time.sleep(0.3)
    return 1


@step(cache=False, resources=Resources(cpus=1))
def feed_slow() -> int:
    time.sleep(1.0)
    return 2


@step(cache=False, resources=Resources(cpus=0), pool="trainer")
def train(x: int) -> int:
    time.sleep(1.5)
    return x


@step(cache=False, resources=Resources(cpus=0))
def post(x: int) -> int:
    return x


@pipeline
def fast():
    return post(train(feed_fast()))


@pipeline
def slow():
    return post(train(feed_slow()))


# Three runs for the planned pool order (see test_scheduling_e2e): `hog` (high priority) holds 2 of 4
# CPUs throughout; `fanned` feeds the trainer from 8 one-CPU chunks (2.4 CPU-seconds: 0.6 s on the
# whole machine, 1.2 s on the 2 CPUs it gets), `gpu_fed` from one 0.9 s GPU step. Schrage's rule on
# the pool plans `fanned` first (0.6 < 0.9); simulating the runs shows `gpu_fed` reaches it first.
@step(cache=False, resources=Resources(cpus=2))
def hog() -> int:
    time.sleep(5.0)
    return 0


@step(cache=False, resources=Resources(cpus=1))
def chunk(i: int) -> int:
    time.sleep(0.3)
    return i


@step(cache=False, resources=Resources(cpus=1, gpus=1))
def embed() -> int:
    time.sleep(0.9)
    return 0


@step(cache=False, resources=Resources(cpus=0), pool="trainer")
def fit(a: int, b: int = 0, c: int = 0, d: int = 0, e: int = 0, f: int = 0, g: int = 0, h: int = 0) -> int:
    time.sleep(1.5)
    return a + b + c + d + e + f + g + h


@pipeline
def hogging():
    return hog()


@pipeline
def fanned():
    return fit(*[chunk(i) for i in range(8)])


@pipeline
def gpu_fed():
    return fit(embed())
