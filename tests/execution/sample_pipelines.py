"""Pipelines the orchestrator tests run on real backends (loaded by file path, also by workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from skyloop import Resources, pipeline, step, unmapped, when


def _bump(marker: str) -> int:
    """Count executions across processes with one file per call (append is atomic enough here)."""
    with open(marker, "a") as fh:
        fh.write("x")
    return Path(marker).stat().st_size


@step
def source(n: int) -> list[int]:
    return list(range(n))


@step
def left(xs: list[int]) -> int:
    return sum(xs)


@step
def right(xs: list[int]) -> int:
    return max(xs)


@step
def join(a: int, b: int) -> int:
    return a * 1000 + b


@step(resources=Resources(cpus=1, memory="32Mi"))
def work(x: int, pause: float) -> int:
    time.sleep(pause)
    return x * x


@step
def collect(values: list[int], joined: int) -> int:
    return sum(values) + joined


@pipeline
def diamond_fanout(n: int = 20, pause: float = 0.05):
    xs = source(n)
    joined = join(left(xs), right(xs))
    squares = work.map(xs, unmapped(pause))
    return collect(squares, joined)


class Parts(NamedTuple):
    small: int
    big: int


@step
def parts(n: int) -> Parts:
    return Parts(n, n * 10)


@step
def describe(value: int) -> str:
    return f"value={value}"


@pipeline
def gated(n: int = 3, threshold: int = 20):
    p = parts(n)
    with when(p.big >= threshold):
        described = describe(p.small)
    return described


@step(retries=2, retry_delay=0.1)
def flaky(marker: str) -> int:
    count = _bump(marker)
    if count < 2:
        raise RuntimeError(f"transient failure on attempt {count}")
    return count


@step(retries=1)
def crashes_once(marker: str) -> str:
    if _bump(marker) == 1:
        os._exit(13)
    return "survived"


@step(timeout=1)
def too_slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@step
def boom(x: int) -> int:
    raise ValueError(f"bad value {x}")


@step
def after_boom(x: int) -> int:
    return x


@pipeline
def retrying(marker: str, crash_marker: str):
    return {"flaky": flaky(marker), "crash": crashes_once(crash_marker)}


@pipeline
def timing_out(seconds: float = 30.0):
    return too_slow(seconds)


@pipeline
def partly_failing(n: int = 3):
    xs = source(n)
    bad = boom(left(xs))
    after_boom(bad)
    return right(xs)


@step(resources=Resources(cpus=64))
def greedy(x: int) -> int:
    return x


@pipeline
def too_big(x: int = 1):
    return greedy(x)


@step
def slow_mark(marker: str, seconds: float, value: int) -> int:
    """Count the call; the first call of a marker also leaves its pid and sleeps (it is the one killed)."""
    if _bump(marker) == 1 and seconds:
        Path(marker + ".pid").write_text(str(os.getpid()))
        time.sleep(seconds)
    return value + 1


@pipeline
def resumable(marker_a: str, marker_b: str, marker_c: str, seconds: float = 2.0):
    a = slow_mark(marker_a, 0.0, 1)
    b = slow_mark(marker_b, seconds, a)
    return slow_mark(marker_c, 0.0, b)
