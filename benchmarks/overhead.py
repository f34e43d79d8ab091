"""Per-step orchestration overhead: 1,000 no-op steps as a chain and as a fan-out.

    .venv/bin/python benchmarks/overhead.py [--steps 1000] [--backends inline,local]

Prints wall time per step for each shape and backend next to a plain loop of the same function
calls in the same process, and the overhead (per-step time minus the plain call). Targets from
issue 2: <= 1 ms per step inline, <= 5 ms per step local. Every run uses a fresh home, so nothing
is cached; writes go to a real SQLite DB and artifact folder, as in production.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from skyloop import Settings, pipeline, run, step
from skyloop.execution.loading import load_file_module

TARGETS = {"inline": 1.0, "local": 5.0}


@step
def noop(x: int) -> int:
    return x


@step
def inc(x: int) -> int:
    return x + 1


@step
def numbers(n: int) -> list[int]:
    return list(range(n))


def chain_of(n: int) -> Any:
    @pipeline(name=f"chain_{n}")
    def chain(x: int = 0):
        for _ in range(n):
            x = inc(x)  # distinct inputs: every step runs (a repeated input would be a cache hit)
        return x

    return chain


def fanout_of(n: int) -> Any:
    @pipeline(name=f"fanout_{n}")
    def fanout():
        return noop.map(numbers(n))

    return fanout


def plain_loop(n: int) -> float:
    started = time.perf_counter()
    x = 0
    for _ in range(n):
        x = inc.fn(x)
    return time.perf_counter() - started


def measure(module: Any, shape: str, backend: str, n: int) -> tuple[float, int]:
    target = module.chain_of(n) if shape == "chain" else module.fanout_of(n)
    with tempfile.TemporaryDirectory(prefix="skyloop-bench-") as home:
        settings = Settings.for_home(Path(home))
        started = time.perf_counter()
        result = run(target, backend=backend, settings=settings)
        elapsed = time.perf_counter() - started
        if not result.succeeded:
            raise SystemExit(f"{shape} on {backend} failed: {result.error}")
        cached = [name for name, info in result.steps.items() if info.state.value == "CACHED"]
        if cached:
            raise SystemExit(f"{shape} on {backend}: {len(cached)} steps were cache hits; the benchmark is broken")
        # The fan-out has one extra step (the list it maps over).
        return elapsed, n + (1 if shape == "fanout" else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--backends", default="inline,local")
    args = parser.parse_args()
    # Load this file as a module so that worker processes import the steps by path.
    module = load_file_module(Path(__file__))
    n = args.steps
    baseline = plain_loop(n) / n
    table = Table(title=f"orchestration overhead, {n} no-op steps (plain call: {baseline * 1e6:.2f} µs/step)")
    for column in ("shape", "backend", "wall s", "ms/step", "overhead ms/step", "x plain call", "target ms",
                   "meets"):
        table.add_column(column, justify="right")
    for backend in args.backends.split(","):
        for shape in ("chain", "fanout"):
            elapsed, steps = measure(module, shape, backend, n)
            per = elapsed / steps
            overhead = per - baseline
            target = TARGETS.get(backend)
            table.add_row(shape, backend, f"{elapsed:.2f}", f"{per * 1e3:.3f}", f"{overhead * 1e3:.3f}",
                          f"{per / baseline:,.0f}", f"{target:g}" if target else "",
                          ("yes" if overhead * 1e3 <= target else "NO") if target else "")
    Console().print(table)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
