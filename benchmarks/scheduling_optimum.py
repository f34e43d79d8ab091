"""How close to the lower bound any schedule gets: the policy against an offline optimizer (CP-SAT).

    pip install 'skyloop[bench]'   # OR-tools
    .venv/bin/python benchmarks/scheduling_optimum.py [--families ml] [--seeds 10] [--seconds 90]

`benchmarks/scheduling.py` divides makespans by a lower bound that no schedule may reach. This script
asks how far the reachable optimum is: for each seed it draws the same execution as that benchmark
(`realize(runs, seed * 1000)`), gives Google OR-tools' CP-SAT solver every true duration (an offline,
clairvoyant scheduler: no online policy can know them), and has it minimize the makespan under the
same constraints (dependencies, submit times, CPUs, memory, GPUs, custom resources, pools) for
`--seconds`. It prints, over the bound, the best schedule CP-SAT found, the bound it proved (no
schedule is shorter), and skyloop's policy told the true durations and with estimates learned from 3
earlier executions. Durations are rounded up to whole seconds and memory to MiB, so CP-SAT's
schedules are feasible ones. The solver runs on every core, and what it finds in the time varies
with the machine's speed: the best found is an upper bound on the optimum, not the optimum.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from skyloop.scheduling import FAMILIES, PolicyConfig, Scenario, SimRun, lower_bound, realize, simulate

sys.path.insert(0, str(Path(__file__).parent))
from scheduling import learned_estimates

MiB = 2**20


def optimum(runs: tuple[SimRun, ...], scenario: Scenario, seconds: float) -> tuple[float, float]:
    """(best makespan found, proven lower bound) by CP-SAT for `runs` on the scenario's machine."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    horizon = math.ceil(max(r.submit_at for r in runs) + sum(t.duration for r in runs for t in r.tasks)) + 1
    capacity = scenario.capacity
    limits = {"cpus": math.floor(capacity.cpus), "memory": capacity.memory // MiB, "gpus": capacity.gpus,
              **{f"custom:{k}": math.floor(v) for k, v in capacity.custom.items()},
              **{f"pool:{k}": v for k, v in scenario.pools.items()}}
    users: dict[str, tuple[list[cp_model.IntervalVar], list[int]]] = {name: ([], []) for name in limits}
    ends = []
    for run in runs:
        starts, finish = {}, {}
        for t in run.tasks:
            start = model.new_int_var(math.ceil(run.submit_at), horizon, f"{run.run_id}/{t.name}")
            end = model.new_int_var(0, horizon, "")
            interval = model.new_interval_var(start, math.ceil(t.duration), end, "")
            starts[t.name], finish[t.name] = start, end
            ends.append(end)
            asks = {"cpus": math.ceil(t.resources.cpus), "memory": math.ceil(t.resources.memory / MiB),
                    "gpus": t.resources.gpus, **{f"custom:{k}": math.ceil(v) for k, v in t.resources.custom.items()}}
            if t.pool is not None:
                asks[f"pool:{t.pool}"] = 1
            for name, amount in asks.items():
                if amount > 0 and name in users:
                    users[name][0].append(interval)
                    users[name][1].append(amount)
        for t in run.tasks:
            for dep in t.deps:
                model.add(starts[t.name] >= finish[dep])
    for name, (intervals, demands) in users.items():
        if intervals:
            model.add_cumulative(intervals, demands, limits[name])
    makespan = model.new_int_var(0, horizon, "makespan")
    model.add_max_equality(makespan, ends)
    model.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT found no schedule in {seconds} s ({solver.status_name(status)})")
    return solver.objective_value, solver.best_objective_bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="ml")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=90.0, help="CP-SAT's time per seed")
    args = parser.parse_args()
    try:
        import ortools  # noqa: F401
    except ImportError:
        sys.exit("this benchmark needs OR-tools: pip install 'skyloop[bench]'")
    console = Console()
    table = Table(title=f"makespan / lower bound (CP-SAT: {args.seconds:g} s per seed, true durations)")
    for name in ("family", "seed", "CP-SAT found", "CP-SAT proved", "policy true", "policy learn3"):
        table.add_column(name, justify="left" if name == "family" else "right")
    for family in args.families.split(","):
        rows = []
        for seed in range(1, args.seeds + 1):
            scenario = FAMILIES[family](seed)
            measured = realize(scenario.runs, seed * 1000)
            bound = lower_bound(measured, scenario.capacity, scenario.pools)
            config = PolicyConfig(pools=dict(scenario.pools))
            estimates = learned_estimates([realize(scenario.runs, seed * 1000 + i) for i in range(1, 4)])
            true = simulate(measured, scenario.capacity, "skyloop", None, config).makespan
            learned = simulate(measured, scenario.capacity, "skyloop", estimates, config).makespan
            found, proved = optimum(measured, scenario, args.seconds)
            row = (found / bound, proved / bound, true / bound, learned / bound)
            rows.append(row)
            table.add_row(family, str(seed), *(f"{x:.3f}" for x in row))
            console.print(f"{family} seed {seed}: " + ", ".join(f"{x:.3f}" for x in row), highlight=False)
        table.add_row(family, "mean", *(f"{statistics.fmean(r[i] for r in rows):.3f}" for i in range(4)),
                      style="bold", end_section=True)
    console.print(table)


if __name__ == "__main__":
    main()
