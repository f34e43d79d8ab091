"""Per-step overhead of skyloop's `ray` backend next to raw Ray tasks, in the same process and Ray.

    .venv/bin/python benchmarks/ray_overhead.py [--steps 200] [--cpus N] [--repeat 3]

For a chain and a fan-out of no-op steps, prints ms per step for raw Ray (a `@ray.remote` no-op: a
chain of `x = ray.get(inc.remote(x))`, and a fan-out of `.remote()` calls then one `ray.get`) and for
`skyloop.run(..., backend="ray")`, and the ratios. Target from issue 4: a per-step overhead <= 1.5x
raw Ray, judged ("meets") on the cost per step less what a run costs whatever its length (a fresh
home's DB, the run's rows: the "fixed" line), which a per-step figure must not depend on: spread
over 200 steps it adds 0.2 ms to each, over 2,000 steps a tenth of that. The whole run's ratio is
printed too. Both use one CPU per task. Every skyloop run uses a fresh home, so nothing is cached;
each figure is the best of `--repeat` runs after a warm-up.

More columns say where the time goes: raw Ray with at most `--cpus` tasks in flight (what the
orchestrator did before it admitted `RayBackend.queue_factor` times the capacity to Ray's queue),
and the same pipeline on the `inline` backend (the orchestrator's own cost per step: its DB rows,
scheduling and artifact bookkeeping, with no backend at all), and the `ray` figure less what a run
costs whatever its length (a one-step run's time: compiling, the run's rows, loading the result),
spread over the other steps. A chain's steps are sent ahead of the step they wait on and run as a
chain in one Ray task (see `skyloop.execution.lookahead`), so neither Ray's round trip nor the
orchestrator's work per step lies between two of them, while the raw chain pays a round trip per
step (`ray.get` of each task before the next). The fan-out's no-op units, once a few have ended,
travel in packs of several per Ray task (see `skyloop.execution.backends.ray`); raw Ray sends one
task each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from skyloop import Settings, run
from skyloop.execution.loading import load_file_module

TARGET_RATIO = 1.5
RAW: dict[Any, Any] = {}
"""The steps' plain functions as Ray remote functions (made once, so that Ray exports them once)."""


# The steps and pipelines are `overhead.py`'s, loaded by path so that Ray workers import them alike.
SHARED = load_file_module(Path(__file__).with_name("overhead.py"))
noop, inc = SHARED.noop, SHARED.inc


def best(repeat: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(repeat))


def raw_ray(ray: Any, shape: str, n: int, window: int | None = None) -> float:
    raw_noop, raw_inc = RAW[noop.fn], RAW[inc.fn]
    started = time.perf_counter()
    if shape == "chain":
        x = 0
        for _ in range(n):
            x = ray.get(raw_inc.remote(x))
    elif window is None:
        ray.get([raw_noop.remote(i) for i in range(n)])
    else:  # as the orchestrator drives it: a new task each time one ends, at most `window` running
        running: list[Any] = []
        for i in range(n):
            if len(running) >= window:
                ready, running = ray.wait(running, num_returns=1)
                ray.get(ready)
            running.append(raw_noop.remote(i))
        ray.get(running)
    return time.perf_counter() - started


def on_skyloop(shape: str, n: int, backend: str = "ray") -> float:
    target = SHARED.chain_of(n) if shape == "chain" else SHARED.fanout_of(n)
    with tempfile.TemporaryDirectory(prefix="skyloop-raybench-") as home:
        started = time.perf_counter()
        result = run(target, backend=backend, settings=Settings.for_home(Path(home)))
        elapsed = time.perf_counter() - started
    if not result.succeeded:
        raise SystemExit(f"{shape} on {backend} failed: {result.error}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # Loopback only, no usage report; both must be set before Ray is imported and started.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    RAW.update({fn: ray.remote(fn) for fn in (noop.fn, inc.fn)})
    try:
        n = args.steps
        raw_ray(ray, "fanout", 4 * args.cpus)  # warm-up: start the workers, export the functions
        on_skyloop("fanout", 4 * args.cpus)
        table = Table(title=f"ray backend overhead, {n} no-op steps, {args.cpus} CPUs (best of {args.repeat})")
        for column in ("shape", "raw Ray ms/step", f"raw Ray <={args.cpus} running", "skyloop inline ms/step",
                       "skyloop ray ms/step", "ray less fixed ms/step", "ratio ray/raw", "less fixed / raw", "target",
                       "meets"):
            table.add_column(column, justify="right")
        # What a run costs whatever its length (compiling, the run row, loading the result): a one-step run.
        fixed = best(args.repeat, lambda: on_skyloop("chain", 1))
        for shape in ("chain", "fanout"):
            steps = n + (1 if shape == "fanout" else 0)  # the fan-out has the list step too
            raw = best(args.repeat, lambda: raw_ray(ray, shape, n)) / n  # noqa: B023 (called at once)
            windowed = best(args.repeat, lambda: raw_ray(ray, shape, n, args.cpus)) / n  # noqa: B023
            inline = best(args.repeat, lambda: on_skyloop(shape, n, "inline")) / steps  # noqa: B023
            whole = best(args.repeat, lambda: on_skyloop(shape, n))  # noqa: B023
            ours, marginal = whole / steps, (whole - fixed) / (steps - 1)
            ratio = ours / raw
            table.add_row(shape, f"{raw * 1e3:.3f}", f"{windowed * 1e3:.3f}" if shape == "fanout" else "",
                          f"{inline * 1e3:.3f}", f"{ours * 1e3:.3f}", f"{marginal * 1e3:.3f}", f"{ratio:.2f}x",
                          f"{marginal / raw:.2f}x", f"{TARGET_RATIO:g}x",
                          "yes" if marginal / raw <= TARGET_RATIO else "NO")
        console = Console(width=max(Console().width, 130))
        console.print(table)
        console.print(f"fixed: a one-step run on ray takes {fixed * 1e3:.0f} ms in all, much of it creating the "
                      "fresh home's DB (a home used before skips that)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
