"""A live Rich view of a run: one row per step with its state, units done and time."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
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

FRAME_LINES = 7
"""Lines of the live table that are not steps: title, borders, header, the summary of hidden steps, and one spare
(Rich cuts a live view taller than the terminal, and the cut rows were the running ones of a long pipeline)."""
_ALWAYS = frozenset({TaskState.RUNNING, TaskState.FAILED, TaskState.TIMED_OUT, TaskState.CRASHED,
                     TaskState.OUT_OF_MEMORY})
"""States whose rows the live table keeps in view when not every step fits."""


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
    """Observer that redraws a table of steps as the run moves (a plain log when not a terminal).

    With `draw=False` it shows nothing and only records the run's id and status (for `run --json`).
    """

    console: Console
    tasks: list[str]
    draw: bool = True
    rows: dict[str, _Row] = field(default_factory=dict)
    run_id: str = ""
    status: str = "PENDING"
    _live: Live | None = None

    def __post_init__(self) -> None:
        self.rows = {t: _Row() for t in self.tasks}

    def __enter__(self) -> LiveProgress:
        if self.draw and self.console.is_terminal:
            # Rendered lazily at the refresh rate, so a 1,000-way fan-out costs nothing per unit.
            self._live = Live(console=self.console, refresh_per_second=8, get_renderable=self._view)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)

    @property
    def _logging(self) -> bool:
        """Whether progress goes out as log lines (stdout is not a terminal: CI, a pipe, a file)."""
        return self.draw and self._live is None

    def _view(self) -> RenderableType:
        table = Table(title=f"run {self.run_id[:12]}  {self.status}", title_justify="left")
        table.add_column("step", no_wrap=True)  # one line a row, so that the rows counted are the lines drawn
        for column in ("state", "done", "time"):
            table.add_column(column, no_wrap=True)
        now = time.monotonic()
        shown, hidden = self._fitting(self.console.height - FRAME_LINES)
        for name in shown:
            row = self.rows[name]
            seconds = ((row.ended or now) - row.started) if row.started else None
            table.add_row(name, state_text(row.state.value), f"{row.done}/{row.total}",
                          f"{seconds:.1f}s" if seconds is not None else "")
        if not hidden:
            return table
        more = sum(hidden.values())
        # Under the table, not as its caption: one line however narrow the table (a caption wrapped to its width).
        summary = Text(f"… {more} more step{'s' if more > 1 else ''}: ", no_wrap=True, overflow="ellipsis")
        for i, (state, count) in enumerate(hidden.items()):
            summary.append_text(Text.assemble(", " if i else "", f"{count} ", state_text(state)))
        return Group(table, summary)

    def _fitting(self, room: int) -> tuple[list[str], dict[str, int]]:
        """The steps to draw in `room` rows, in pipeline order, and how many others there are by state.

        Running and failed steps stay in view; finished ones (those that ended first, first) make way, then the
        last pending ones: a terminal shows what is going on and what comes next.
        """
        names = list(self.rows)
        if len(names) <= room:
            return names, {}
        finished = sorted((n for n in names if self.rows[n].state.done and self.rows[n].state not in _ALWAYS),
                          key=lambda n: self.rows[n].ended or 0.0)
        pending = [n for n in reversed(names) if self.rows[n].state == TaskState.PENDING]
        kept = [n for n in reversed(names) if self.rows[n].state in _ALWAYS]
        hide = set((finished + pending + kept)[:len(names) - max(room, 1)])
        counts = Counter(self.rows[n].state.value for n in names if n in hide)
        order = list(STATE_STYLE)
        return [n for n in names if n not in hide], dict(sorted(counts.items(), key=lambda kv: order.index(kv[0])))

    def task_changed(self, task: str, state: TaskState, done: int, total: int) -> None:
        row = self.rows.setdefault(task, _Row())
        before = row.state
        if row.started is None:
            row.started = time.monotonic()
        row.state, row.done, row.total = state, done, total
        if state.done:
            row.ended = time.monotonic()
        if self._logging and (state.done or (state == TaskState.RUNNING and before != TaskState.RUNNING)):
            self.console.print(f"  {task}: ", state_text(state.value), f" ({done}/{total})", sep="")

    def run_changed(self, run_id: str, status: str) -> None:
        self.run_id, self.status = run_id, status
        if self._logging and status == "RUNNING":  # its id at once: for `skyloop runs cancel` from another shell
            self.console.print(f"run {run_id}: RUNNING", highlight=False)
