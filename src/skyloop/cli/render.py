"""Tables and JSON for runs, shared by `run` and `runs`."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from skyloop.cli.progress import state_text
from skyloop.execution.run import Run

__all__ = ["run_json", "run_table", "show_run"]


def run_json(run: Run) -> dict[str, Any]:
    """A run as plain data for scripts."""
    return {
        "id": run.id, "pipeline": run.pipeline, "status": run.status, "error": run.error,
        "backend": run.backend, "params": run.params,
        "created_at": run.created_at, "started_at": run.started_at, "ended_at": run.ended_at,
        "steps": {
            name: {"state": info.state.value, "attempts": info.attempts, "units": info.units,
                   "seconds": info.seconds, "estimate_seconds": info.estimate, "actual_seconds": info.actual,
                   "estimate_source": info.estimate_source, "error": info.error}
            for name, info in run.steps.items()
        },
    }


def run_table(run: Run) -> Table:
    """The steps of a run with state, attempts, units and time.

    Names and errors are `Text`, never markup: a step error may hold `[...]` (e.g. `list[float]`).
    """
    table = Table(title=Text(f"run {run.id}  {run.pipeline}  {run.status}"), title_justify="left")
    for column in ("step", "state", "attempts", "units", "time", "est/unit", "actual/unit", "error"):
        table.add_column(column, overflow="fold")
    for name, info in run.steps.items():
        estimate = _secs(info.estimate) + (f" ({info.estimate_source})" if info.estimate_source in ("default", "mixed")
                                           else "")
        table.add_row(Text(name), state_text(info.state.value), str(info.attempts), str(info.units),
                      _secs(info.seconds), estimate, _secs(info.actual), Text((info.error or "")[:200]))
    return table


def show_run(console: Console, run: Run, as_json: bool) -> None:
    """Print a run as a table (and its error), or as JSON for scripts."""
    if as_json:
        print(json.dumps(run_json(run), indent=2, default=str))
        return
    console.print(run_table(run))
    if run.error:
        console.print(Text(run.error, style="red"), highlight=False)


def _secs(value: float | None) -> str:
    return f"{value:.2f}s" if value is not None else ""
