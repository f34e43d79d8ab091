"""The step attempt running here, so that `log_model` inside a step records where it came from.

The execution worker wraps each step call in `step_context(...)`; nothing else sets it. Light on purpose:
worker processes import it, and it must not pull in SQLAlchemy.

A thread the step starts (a `ThreadPoolExecutor` fitting models in parallel) does not inherit the
context variable, so the steps running in this process are also kept in a process-wide list, which such a
thread falls back to. Only when it is unambiguous: a `local` or Ray worker process runs one step at a
time, and so does the `inline` backend (each attempt runs in the orchestrator's scheduler thread, to its
end, before the next is submitted). Two steps at once in one process means two inline runs in two threads
of one program: a thread of neither step's own then gets no context rather than perhaps the other step's
(`running_steps` tells `log_model` to say so).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from skyloop.config import Settings

__all__ = ["StepContext", "current_step", "running_steps", "step_context"]


@dataclass(frozen=True)
class StepContext:
    """Which step attempt is running, what it read, and which stores it works against."""

    step_run_id: str
    run_id: str | None = None
    task: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    """Input name -> artifact digest (gathered inputs as `name[0]`, `name[1]`, ...)."""
    settings: Settings | None = None
    """The settings of the run (its DB and artifact store); None: the environment's."""


_current: ContextVar[StepContext | None] = ContextVar("skyloop_step_context", default=None)
_running: list[StepContext] = []
"""Every step context entered in this process and not yet left, in any thread."""
_running_lock = threading.Lock()


@contextlib.contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    """Make `context` the current step for the duration of the block (in threads it starts too, see above)."""
    token = _current.set(context)
    with _running_lock:
        _running.append(context)
    try:
        yield context
    finally:
        with _running_lock:
            for i, entered in enumerate(_running):
                if entered is context:
                    del _running[i]
                    break
        _current.reset(token)


def current_step() -> StepContext | None:
    """The step attempt running in this thread, else the only one running in this process, if any."""
    context = _current.get()
    if context is not None:
        return context
    with _running_lock:
        return _running[0] if len(_running) == 1 else None


def running_steps() -> int:
    """How many step contexts are entered in this process, in all threads."""
    with _running_lock:
        return len(_running)
