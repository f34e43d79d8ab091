"""The step attempt running in this thread, so that `log_model` inside a step records where it came from.

The execution worker wraps each step call in `step_context(...)`; nothing else sets it. Light on purpose:
worker processes import it, and it must not pull in SQLAlchemy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from skyloop.config import Settings

__all__ = ["StepContext", "current_step", "step_context"]


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


@contextlib.contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    """Make `context` the current step for the duration of the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current_step() -> StepContext | None:
    """The step attempt running here, if any."""
    return _current.get()
