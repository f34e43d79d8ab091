"""Keeping hold of runs and letting go of them: the heartbeat that renews the leases of the runs an
orchestrator holds; which errors say that the metadata DB is away for a while (the runs are handed back,
see `skyloop.execution.agent`) rather than that one run went wrong (it fails alone, see `Orchestrator`);
and Ctrl-C held off while runs are let go of."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from skyloop.errors import SkyloopError
from skyloop.store.runs import cancel_requested, renew_leases

if TYPE_CHECKING:
    from skyloop.execution.orchestrator import Orchestrator

__all__ = ["Heartbeat", "db_unreachable", "interrupts_held"]


def db_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the metadata DB could not be reached or was busy (an error that passes), rather
    than that it refused what was asked of it."""
    cause = exc.__cause__ if isinstance(exc, SkyloopError) else exc
    return isinstance(cause, (OperationalError, InterfaceError, sqlite3.OperationalError)) or (
        isinstance(cause, DBAPIError) and cause.connection_invalidated)


class Heartbeat(threading.Thread):
    """Renews the leases of every run this orchestrator holds, so nobody adopts a live run."""

    def __init__(self, orch: Orchestrator) -> None:
        super().__init__(name="skyloop-heartbeat", daemon=True)
        self.orch = orch
        self.stopped = threading.Event()
        self.lost: set[str] = set()
        """Runs another process took over (their leases were not ours any more)."""
        self.cancels: set[str] = set()
        """Runs a user asked to cancel (`skyloop runs cancel`), read with each renewal."""

    def run(self) -> None:
        execution = self.orch.settings.execution
        while not self.stopped.wait(execution.heartbeat_seconds):
            held = list(self.orch.runs)
            if not held:
                continue
            try:
                with self.orch.db.session() as session:
                    kept = renew_leases(session, held, self.orch.owner, execution.lease_seconds)
                    cancels = cancel_requested(session, list(kept))
            except Exception:  # a busy DB: try again at the next beat; the lease has slack
                continue
            self.lost.update(set(held) - kept)
            self.cancels.update(cancels)


@contextlib.contextmanager
def interrupts_held() -> Iterator[list[int]]:
    """SIGINT (Ctrl-C) only noted in the list yielded while the body runs: the cleanup after a first Ctrl-C
    must finish, or the runs stay held until their leases end and are then reaped as FAILED. In the main
    thread only (where Python takes signals); elsewhere the list stays empty."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)
