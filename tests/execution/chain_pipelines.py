"""Chains of steps for the lookahead tests (loaded by file path, also by Ray workers).

Every step appends its name to `trace` when it runs, so a test sees what ran, how often and in
which order, across processes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from skyloop import Resources, pipeline, step, unmapped


def _ran(trace: str, name: str) -> int:
    with open(trace, "a") as fh:
        fh.write(name + "\n")
    return Path(trace).read_text().splitlines().count(name)


@step(cache=False)
def origin(x: int, trace: str) -> int:
    _ran(trace, "origin")
    return x


@step
def add_one(x: int, trace: str) -> int:
    _ran(trace, f"add_one({x})")
    return x + 1


@step(retries=1, retry_delay=0)
def fails_first(x: int, trace: str) -> int:
    if _ran(trace, "fails_first") == 1:
        raise RuntimeError("first attempt fails")
    return x * 10


@step(retries=1, retry_delay=0)
def flaky(x: int, name: str, trace: str) -> int:
    if _ran(trace, name) == 1:
        raise RuntimeError(f"first attempt of {name} fails")
    return x * 10


@step
def pair(a: int, b: int) -> int:
    return a * 1000 + b


@step
def always_fails(x: int, trace: str) -> int:
    _ran(trace, "always_fails")
    raise RuntimeError("no luck")


@step(retries=1, retry_delay=0)
def dies_first(x: int, trace: str) -> int:
    if _ran(trace, "dies_first") == 1:
        os._exit(3)  # the worker process dies, and its chain's task with it
    return x * 100


@step(retries=1, retry_delay=0)
def killed_first(x: int, trace: str) -> int:
    if _ran(trace, "killed_first") == 1:
        print("about to be killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would end its worker
    return x * 100


@step
def slow(x: int, seconds: float, trace: str) -> int:
    _ran(trace, "slow")
    time.sleep(seconds)
    return x


@step(timeout=1.0)
def timed(x: int, seconds: float, trace: str) -> int:
    _ran(trace, "timed")
    time.sleep(seconds)
    return x + 2


@pipeline
def counting(x: int = 0, trace: str = "trace"):
    for _ in range(6):
        x = add_one(x, trace)
    return x


@pipeline
def cached_tail(x: int = 5, trace: str = "trace"):
    return add_one(add_one(origin(x, trace), trace), trace)


@pipeline
def retried_middle(x: int = 1, trace: str = "trace"):
    return add_one(fails_first(add_one(x, trace), trace), trace)


@pipeline
def failed_middle(x: int = 1, trace: str = "trace"):
    return add_one(add_one(always_fails(add_one(x, trace), trace), trace), trace)


@pipeline
def crashed_middle(x: int = 1, trace: str = "trace"):
    return add_one(dies_first(add_one(x, trace), trace), trace)


@pipeline
def killed_after_slow(x: int = 1, seconds: float = 0.5, trace: str = "trace"):
    return add_one(killed_first(slow(x, seconds, trace), trace), trace)


@pipeline
def killed_alone_after_slow(x: int = 1, seconds: float = 0.5, trace: str = "trace"):
    # Asking for other resources than its upstream, it is sent ahead as a Ray task of its own, not in a chain.
    killed = killed_first.with_options(resources=Resources(cpus=0.5))
    return add_one(killed(slow(x, seconds, trace), trace), trace)


@pipeline
def timed_after_slow(x: int = 1, slow_seconds: float = 1.5, timed_seconds: float = 0.1, trace: str = "trace"):
    return timed(slow(x, slow_seconds, trace), timed_seconds, trace)


@pipeline
def two_retried(x: int = 1, trace: str = "trace"):
    start = add_one(x, trace)
    return pair(flaky(start, "left", trace), flaky(start, "right", trace))


@step
def nap(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x + 1


@step
def spread(x: int) -> list[int]:
    return list(range(x, x + 4))


@pipeline
def chain_beside_map(seconds: float = 0.25):
    start = nap(0, seconds)
    x = start
    for _ in range(12):
        x = nap(x, seconds)
    return x, nap.map(spread(start), unmapped(seconds))
