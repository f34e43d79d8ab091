"""The contract between the orchestrator and an execution backend.

A backend launches single step attempts with their resources and reports how each ended. It knows
nothing of DAGs, caching or the metadata DB: the orchestrator decides what to launch and when.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from skyloop.execution.tasks import TaskLaunch, TaskResult
from skyloop.spec.resources import Resources

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """Launches step attempts and reports their ends."""

    name: str

    def start(self) -> None:
        """Get ready to take launches (start workers, connect to a cluster)."""

    def capacity(self) -> Resources:
        """Total resources this backend may hand out at once."""

    # Optional: `admission() -> Resources`, how much the orchestrator may have launched at once when the
    # backend queues launches beyond its capacity itself (default: `capacity()`). Not part of the
    # protocol, so that a backend without it still is one. Likewise `attempts_die_with_driver: bool`,
    # true when the backend's attempts end with the process that submitted them (default: false):
    # the orchestrator then commits RUNNING rows while the launches travel, not before. And
    # `submit_after(launch, upstream_key) -> bool`, to send an attempt that starts once another ended,
    # with its result (see `skyloop.execution.lookahead`), with `dispatch()`, which sends what `submit`
    # and `submit_after` held back (to send a step with those sent ahead of it, in one go). And
    # `launch_limit() -> int`, how many attempts the backend starts at once where that is fewer than its
    # capacity allows (the local backend's workers, whatever the steps ask for): the orchestrator then
    # has at most that many launched, so that the rest wait in its policy's order, not the backend's.

    def submit(self, launch: TaskLaunch) -> None:
        """Start the attempt; its end is reported by a later `wait`."""

    def wait(self, timeout: float) -> list[TaskResult]:
        """Results of attempts that ended, blocking up to `timeout` seconds for at least one."""

    def cancel(self, key: str) -> None:
        """Stop a running attempt; its end (CANCELLED) is reported by `wait`."""

    def shutdown(self) -> None:
        """Stop every worker this backend started."""
