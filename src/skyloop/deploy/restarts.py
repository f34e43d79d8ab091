"""When to start a dead predictor's replicas again: at once the first time, then after a growing wait.

A replica host that dies is started again by the controller. One whose start fails (a model file that
went bad, a missing GPU) would fail again at once, so each failure in a row doubles the wait before the
next try (1 s, 2 s, 4 s ... up to a minute), as Kubernetes backs off a pod in CrashLoopBackOff. A start
runs as a task of its own, beside the control loop: the rollout, the loop and other deployments go on
while a model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

__all__ = ["Restarts"]

FIRST_WAIT = 1.0
MAX_WAIT = 60.0


@dataclass
class _Tries:
    failures: int = 0
    """Failed starts in a row."""
    due: float = 0.0
    """Monotonic time of the next try."""
    error: str = ""
    """What the last failed start said."""


class Restarts:
    """The restarts of one deployment's predictors: their tasks and the failures in a row of each."""

    def __init__(self, first_wait: float = FIRST_WAIT, max_wait: float = MAX_WAIT) -> None:
        self.first_wait = first_wait
        self.max_wait = max_wait
        self._tries: dict[str, _Tries] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def due(self, name: str, now: float | None = None) -> bool:
        """Whether a restart of `name` may begin now: none in flight and its wait, if any, over."""
        task = self._tasks.get(name)
        if task is not None and not task.done():
            return False
        tries = self._tries.get(name)
        return tries is None or (time.monotonic() if now is None else now) >= tries.due

    def begin(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` (the restart of `name`) as a task of its own."""
        self._tasks[name] = asyncio.create_task(work, name=f"restart {name}")

    def failures(self, name: str) -> tuple[int, str]:
        """Failed starts of `name` in a row, and what the last one said."""
        tries = self._tries.get(name)
        return (tries.failures, tries.error) if tries else (0, "")

    def failed(self, name: str, error: str) -> float:
        """Count a failed start; returns the seconds until the next try."""
        tries = self._tries.setdefault(name, _Tries())
        tries.failures += 1
        tries.error = error
        wait = min(self.max_wait, self.first_wait * 2.0 ** (tries.failures - 1))
        tries.due = time.monotonic() + wait
        return wait

    def succeeded(self, name: str) -> int:
        """Forget the failures of `name`; returns how many there were."""
        tries = self._tries.pop(name, None)
        return tries.failures if tries else 0

    async def cancel(self) -> None:
        """Cancel every restart in flight and wait until each has ended."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
