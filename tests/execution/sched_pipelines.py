"""Pipelines for the scheduling tests (loaded by file path; agents import them by path too)."""

from __future__ import annotations

import time

from skyloop import Resources, pipeline, step, unmapped


@step(cache=False)
def items(n: int) -> list[int]:
    return list(range(n))


@step(cache=False, resources=Resources(cpus=1, memory="100Mi"))
def small(x: int, pause: float) -> int:
    time.sleep(pause)
    return x


@step(cache=False, resources=Resources(cpus=0.5, memory="300Mi"))
def half(x: int, pause: float) -> int:
    time.sleep(pause)
    return x


@step(cache=False, resources=Resources(cpus=2, memory="50Mi"))
def wide(x: int, pause: float) -> int:
    time.sleep(pause)
    return x


@step(cache=False)
def gather(a: list[int], b: list[int], c: list[int]) -> int:
    return sum(a) + sum(b) + sum(c)


@pipeline
def mixed(n: int = 6, pause: float = 0.2):
    xs = items(n)
    return gather(small.map(xs, unmapped(pause)), half.map(xs, unmapped(pause)), wide.map(xs, unmapped(pause)))


@step(cache=False)
def tick(x: int, pause: float) -> int:
    time.sleep(pause)
    return x


@pipeline
def fan(n: int = 4, pause: float = 0.3):
    return tick.map(items(n), unmapped(pause))


@step(cache=False)
def quick(x: int, pause: float) -> int:
    time.sleep(pause)
    return x


@step(cache=False)
def slow(xs: list[int], seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@step(cache=False)
def finish(parts: list[int], long: float) -> float:
    return sum(parts) + long


@pipeline
def critical(n: int = 6, pause: float = 0.3, seconds: float = 2.0):
    """The widest branch (many quick steps) is declared first; the critical path is the one slow step."""
    xs = items(n)
    parts = quick.map(xs, unmapped(pause))
    long = slow(xs, seconds)
    return finish(parts, long)
