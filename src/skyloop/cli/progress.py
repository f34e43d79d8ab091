"""A live Rich view of a run: one row per step with its state, units done and time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from skyloop.execution.tasks import TaskState

__all__ = ["STATE_STYLE", "LiveProgress", "state_text"]

STATE_STYLE = {
    "PENDING": "dim", "RUNNING": "cyan", "SUCCEEDED": "green", "CACHED": "blue", "SKIPPED": "dim",
    "FAILED": "bold red", "TIMED_OUT": "red", "CRASHED": "red", "OUT_OF_MEMORY": "red",
    "CANCELLED": "yellow", "UPSTREAM_FAILED": "yellow",
}


def state_text(state: str) -> Text:
    """A state word in its colour."""
    return Text(state, style=STATE_STYLE.get(state, ""))


@dataclass
class _Row:
    state: TaskState = TaskState.PENDING
    done: int = 0
    total: int = 1
    started: float | None = None
    ended: float | None = None


@dataclass
class LiveProgress:
    """Observer that redraws a table of steps as the run moves (a plain log when not a terminal)."""

    console: Console
    tasks: list[str]
    rows: dict[str, _Row] = field(default_factory=dict)
    run_id: str = ""
    status: str = "PENDING"
    _live: Live | None = None

    def __post_init__(self) -> None:
        self.rows = {t: _Row() for t in self.tasks}

    def __enter__(self) -> LiveProgress:
        if self.console.is_terminal:
            # Rendered lazily at the refresh rate, so a 1,000-way fan-out costs nothing per unit.
            self._live = Live(console=self.console, refresh_per_second=8, get_renderable=self._table)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)

    def _table(self) -> Table:
        table = Table(title=f"run {self.run_id[:12]}  {self.status}", title_justify="left")
        for column in ("step", "state", "done", "time"):
            table.add_column(column)
        now = time.monotonic()
        for name, row in self.rows.items():
            seconds = ((row.ended or now) - row.started) if row.started else None
            table.add_row(name, state_text(row.state.value), f"{row.done}/{row.total}",
                          f"{seconds:.1f}s" if seconds is not None else "")
        return table

    def task_changed(self, task: str, state: TaskState, done: int, total: int) -> None:
        row = self.rows.setdefault(task, _Row())
        if row.started is None:
            row.started = time.monotonic()
        row.state, row.done, row.total = state, done, total
        if state.done:
            row.ended = time.monotonic()
            if self._live is None:
                self.console.print(f"  {task}: ", state_text(state.value), f" ({done}/{total})", sep="")

    def run_changed(self, run_id: str, status: str) -> None:
        self.run_id, self.status = run_id, status
