"""`skyloop agent`: a long-running process that claims queued runs from the DB and drives them.

Several agents may share one DB: a run is claimed with a conditional update, so exactly one agent
holds it, and only the holder launches its steps. An agent that dies stops renewing its leases;
another agent adopts its runs and finishes them without re-running finished steps. A run is claimed only
while it is still queued or orphaned (one cancelled or ended meanwhile is not run again), and one the agent
cannot read or import is failed alone, with the attempts a vanished process left RUNNING marked CRASHED.

The metadata DB may be out of reach for a while (a PostgreSQL server restarting, a SQLite write lock
held past the busy timeout by a paused process): the agent then hands the runs it holds back instead
of failing them (as if stopped with Ctrl-C: their attempts are cancelled, and any agent adopts them,
this one too, without re-running finished steps) and goes on claiming once the DB answers again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from skyloop.config import Settings
from skyloop.errors import Conflict, SkyloopError, SpecError
from skyloop.execution.api import prepare
from skyloop.execution.backends.base import Backend
from skyloop.execution.history import crash_orphans
from skyloop.execution.leases import db_unreachable
from skyloop.execution.orchestrator import Orchestrator
from skyloop.execution.runstate import Observer, Prepared
from skyloop.spec.files import format_validation
from skyloop.spec.pipeline import PipelineSpec
from skyloop.store.runs import ORCHESTRATOR_LOST, claim_run, claimable_runs, get_run, release_run
from skyloop.store.workspace import Workspace

__all__ = ["Agent", "db_unreachable"]


def _reason(exc: BaseException) -> str:
    """An error in one line: skyloop's own message, or another exception's type and message."""
    return str(exc) if isinstance(exc, SkyloopError) else f"{type(exc).__name__}: {exc}"


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
        self.refused: set[str] = set()
        """Runs this agent could neither run nor mark FAILED (it does not try them again)."""

    def _claim(self) -> int:
        orch = self.orchestrator
        room = self.max_runs - len(orch.runs)
        if room <= 0:
            return 0
        with self.workspace.db.read() as session:
            candidates = claimable_runs(session, limit=room, backend=self.backend.name,
                                        exclude=self.refused | set(orch.runs))
        taken = 0
        for run_id in candidates:
            # Each run on its own: one this agent cannot read or import (a module that raises on import here, a
            # spec of another skyloop version) fails alone, not the agent and the runs it holds.
            try:
                prepared = self._prepare(run_id)
            except Exception as exc:
                if db_unreachable(exc):
                    raise
                self._fail(run_id, f"cannot prepare the run: {_reason(exc)}")
                continue
            try:
                # Claimed here, after the (maybe slow) imports, on the condition that the run is still queued or
                # orphaned: one cancelled or ended meanwhile is not run again. `adopt` then holds it.
                with self.workspace.db.session() as session:
                    status = claim_run(session, run_id, orch.owner, self.settings.execution.lease_seconds,
                                       self.backend.name, resume=False).status
                if status != "RUNNING":
                    self._ended(run_id, status, "its cancel was requested before this agent took it")
                    continue
                orch.adopt(run_id, prepared)
            except Conflict:
                continue  # another agent was quicker, or the run ended meanwhile
            except Exception as exc:
                if db_unreachable(exc):
                    raise
                self._fail(run_id, f"cannot start the run: {_reason(exc)}")
                continue
            self.claimed.append(run_id)
            taken += 1
        return taken

    def _prepare(self, run_id: str) -> Prepared:
        """Read the run and import what it runs (its steps, checked against its stored spec)."""
        with self.workspace.db.read() as session:
            row = get_run(session, run_id)
            spec_data: dict[str, Any] = row.spec
            params: dict[str, Any] = row.params
        try:
            spec = PipelineSpec.model_validate(spec_data)
        except ValidationError as exc:  # e.g. queued by another skyloop version
            raise SpecError(format_validation(exc, "stored pipeline spec", PipelineSpec)) from exc
        return prepare(spec, params)

    def _fail(self, run_id: str, error: str) -> None:
        """End a run this agent cannot run FAILED, with the attempts a vanished process left RUNNING (CRASHED);
        a run it cannot even mark is left alone (and not offered to this agent again)."""
        owner = self.orchestrator.owner
        try:
            with self.workspace.db.session() as session:
                row = claim_run(session, run_id, owner, self.settings.execution.lease_seconds, resume=False)
                row_status = row.status
                if row_status == "RUNNING":  # else ended CANCELLED on a request its previous holder never read
                    crash_orphans(session, row.id, f"{ORCHESTRATOR_LOST}; the run could not be prepared again")
                    release_run(session, row.id, owner, "FAILED", error)
        except Conflict:
            return  # another agent took it, or it ended meanwhile
        except Exception as exc:
            if db_unreachable(exc):
                raise
            self.refused.add(run_id)
            self.say(f"run {run_id[:12]}: {error}; it could not be marked FAILED either ({_reason(exc)}), "
                     "so this agent leaves it alone")
            return
        self._ended(run_id, "FAILED" if row_status == "RUNNING" else row_status, error)

    def _ended(self, run_id: str, status: str, why: str) -> None:
        """Tell of a run ended without being driven (failed or cancelled as it was claimed)."""
        if self.observer:
            self.observer.run_changed(run_id, status)
        self.say(f"run {run_id[:12]}: {why}")

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
