"""What the Ray backend knows of each attempt it gave Ray, and how an attempt that sent no result ended.

An `Attempt` lives from its submission to its end (see `ray.RayBackend`): the Ray object ref it waits on
(its own task's, or a pack's or a chain's), its deadline, why we stopped it, and where it stands in a
chain or behind an attempt it was sent ahead of. `failed` turns what Ray raised for a task into the
attempt's end (a step's own errors never get here: the worker reports them as results).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState

__all__ = ["Attempt", "Chain", "ended", "failed"]


@dataclass(eq=False)
class Attempt:
    """A submitted attempt: its Ray object ref and, once we stopped it, why."""

    launch: TaskLaunch
    ref: Any
    submitted: float
    deadline: float | None
    """Monotonic time by which the attempt must have ended (its timeout)."""
    packed: bool = False
    """Whether `ref` is a pack's (its value is the list of its attempts' outcomes)."""
    stopped: tuple[TaskState, str] | None = None
    """The state and error to report for an attempt we force-cancelled."""
    stopped_at: float = math.inf
    """When we force-cancelled it (wall time): a result that ended later ran on into the cancel."""
    give_up: float | None = None
    """Monotonic time after which a cancelled attempt is reported even if Ray has not confirmed it."""
    chained: bool = False
    """Whether `ref` is a chain's (a streaming generator yielding its attempts' outcomes in order)."""
    upstream: Any = None
    """The ref of the upstream result its task was given (`submit_after`), if any."""
    after: Attempt | None = None
    """The attempt after whose end it starts: the one it was sent ahead of, or the one before it in its chain."""
    ended: float | None = None
    """When it ended (when the attempt after it started)."""
    counted: bool = False
    """Whether `_in_ray` counts it: from when it can start (its `after` ended, or it has none) to its end."""


@dataclass(eq=False)
class Chain:
    """Launches not sent yet, each after the one before it (the first after `after`, if given)."""

    launches: list[TaskLaunch]
    after: Attempt | None = None


def ended(attempt: Attempt, state: TaskState, error: str) -> TaskResult:
    """How the attempt ended when it sent no result. It started (as far as the driver knows) when it was
    submitted, or, sent after another, when that one ended: never, if that one has not."""
    started = attempt.submitted if attempt.after is None else attempt.after.ended
    return TaskResult(key=attempt.launch.key, state=state, error=error, started_at=started, ended_at=time.time())


def failed(errors: Any, attempt: Attempt, exc: Exception) -> TaskResult:
    """Translate what Ray raised for the attempt (`errors` is `ray.exceptions`) into how it ended."""
    if attempt.stopped is not None:
        return ended(attempt, *attempt.stopped)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, errors.RayTaskError):  # `execute` catches step errors: a bug of ours or Ray's
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        result = ended(attempt, TaskState.FAILED, f"{type(cause).__name__}: {cause}")
        result.traceback = str(exc)
        return result
    if isinstance(exc, errors.OutOfMemoryError):
        return ended(attempt, TaskState.OUT_OF_MEMORY, f"Ray's memory monitor killed the worker running the step: "
                                                       f"{detail}")
    if isinstance(exc, errors.TaskCancelledError):
        return ended(attempt, TaskState.CANCELLED, "cancelled in Ray (not by skyloop)")
    if isinstance(exc, errors.WorkerCrashedError):
        reason = "the Ray worker process running the step died (a crash, a signal or os._exit)"
    elif isinstance(exc, errors.NodeDiedError):
        reason = f"the Ray node running the step died: {detail}"
    else:
        reason = f"Ray lost the task: {type(exc).__name__}: {detail}"
    return ended(attempt, TaskState.CRASHED, reason)
