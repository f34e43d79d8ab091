"""`skyloop agent`: a long-running process that claims queued runs from the DB and drives them.

Several agents may share one DB: a run is claimed with a conditional update, so exactly one agent
holds it, and only the holder launches its steps. An agent that dies stops renewing its leases;
another agent adopts its runs and finishes them without re-running finished steps.

The metadata DB may be out of reach for a while (a PostgreSQL server restarting, a SQLite write lock
held past the busy timeout by a paused process): the agent then hands the runs it holds back instead
of failing them (as if stopped with Ctrl-C: their attempts are cancelled, and any agent adopts them,
this one too, without re-running finished steps) and goes on claiming once the DB answers again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from skyloop.config import Settings
from skyloop.errors import Conflict, SkyloopError
from skyloop.execution.api import prepare
from skyloop.execution.backends.base import Backend
from skyloop.execution.orchestrator import Orchestrator
from skyloop.execution.runstate import Observer
from skyloop.spec.pipeline import PipelineSpec
from skyloop.store.runs import claim_run, claimable_runs, get_run, release_run
from skyloop.store.workspace import Workspace

__all__ = ["Agent", "db_unreachable"]


def db_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the metadata DB could not be reached or was busy (an error that passes), rather
    than that it refused what was asked of it."""
    cause = exc.__cause__ if isinstance(exc, SkyloopError) else exc
    return isinstance(cause, (OperationalError, InterfaceError, sqlite3.OperationalError)) or (
        isinstance(cause, DBAPIError) and cause.connection_invalidated)


class Agent:
    """Claims runs (queued for its backend, or orphaned by a dead process) and drives up to `max_runs` at once."""

    def __init__(self, settings: Settings, workspace: Workspace, backend: Backend,
                 observer: Observer | None = None, max_runs: int = 16,
                 say: Callable[[str], None] | None = None) -> None:
        self.settings, self.workspace, self.backend = settings, workspace, backend
        self.observer = observer
        self.max_runs = max_runs
        self.say = say or (lambda message: None)
        """Where to tell what the agent does beyond runs starting and ending (the CLI prints it)."""
        self.orchestrator = Orchestrator(settings, workspace.db, workspace.store, backend, observer)
        self.claimed: list[str] = []

    def _claim(self) -> int:
        orch = self.orchestrator
        room = self.max_runs - len(orch.runs)
        if room <= 0:
            return 0
        with self.workspace.db.read() as session:
            candidates = [c for c in claimable_runs(session, limit=room, backend=self.backend.name)
                          if c not in orch.runs]
        taken = 0
        for run_id in candidates:
            with self.workspace.db.read() as session:
                row = get_run(session, run_id)
                spec_data: dict[str, Any] = row.spec
                params: dict[str, Any] = row.params
            try:
                prepared = prepare(PipelineSpec.model_validate(spec_data), params)
            except SkyloopError as exc:
                self._fail(run_id, f"cannot prepare the run: {exc}")
                continue
            try:
                orch.adopt(run_id, prepared)
            except Conflict:
                continue  # another agent was quicker
            self.claimed.append(run_id)
            taken += 1
        return taken

    def _fail(self, run_id: str, error: str) -> None:
        owner = self.orchestrator.owner
        try:
            with self.workspace.db.session() as session:
                claim_run(session, run_id, owner, self.settings.execution.lease_seconds)
                release_run(session, run_id, owner, "FAILED", error)
        except Conflict:
            pass

    def _hand_back(self, exc: BaseException) -> None:
        """The DB failed under the runs held: cancel their attempts and give them back (at once where the DB
        answers again, else when their leases expire), then start over with a fresh orchestrator."""
        orch = self.orchestrator
        held = list(orch.runs)
        self.say(f"metadata DB unreachable ({exc}); "
                 + (f"handing {len(held)} run(s) back, " if held else "") + "claiming again once it answers")
        with contextlib.suppress(Exception):  # the DB may still be away: the leases then run out
            orch.relinquish()
        orch.close()
        self.orchestrator = Orchestrator(self.settings, self.workspace.db, self.workspace.store, self.backend,
                                         self.observer)

    def serve(self, stop: threading.Event | None = None, once: bool = False) -> list[str]:
        """Work until `stop` is set (or, with `once`, until nothing is queued or held); returns the runs claimed."""
        stop = stop or threading.Event()
        poll = self.settings.execution.agent_poll_seconds
        next_poll = 0.0
        # With `once`, how long to wait for runs handed back: where the DB was still away to disown them, they
        # come back when their leases expire.
        linger = 0.0
        try:
            while not stop.is_set():
                orch = self.orchestrator
                try:
                    now = time.monotonic()
                    if now >= next_poll:
                        taken = self._claim()
                        next_poll = now + poll
                        if once and not taken and not orch.runs and now >= linger:
                            break
                    if orch.runs:
                        orch.turn(max_wait=max(0.0, min(poll, next_poll - time.monotonic())))
                    else:
                        stop.wait(max(0.0, next_poll - time.monotonic()))
                except Exception as exc:
                    if not db_unreachable(exc):
                        raise
                    if self.orchestrator.runs:
                        linger = time.monotonic() + self.settings.execution.lease_seconds + poll
                    self._hand_back(exc)
                    stop.wait(max(poll, 1.0))  # give the DB a moment before asking it again
                    next_poll = 0.0
        except KeyboardInterrupt:
            raise  # stopped by the user (Ctrl-C), like a stop request: the runs are handed back below
        except BaseException as exc:
            self.orchestrator.abort("FAILED", f"agent stopped: {type(exc).__name__}: {exc}")
            raise
        finally:
            orch = self.orchestrator
            if orch.runs:  # stopped on request: leave the runs for another agent to adopt
                orch.relinquish()
            orch.close()
        return self.claimed
