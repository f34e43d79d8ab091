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
