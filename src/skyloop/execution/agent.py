"""`skyloop agent`: a long-running process that claims queued runs from the DB and drives them.

Several agents may share one DB: a run is claimed with a conditional update, so exactly one agent
holds it, and only the holder launches its steps. An agent that dies stops renewing its leases;
another agent adopts its runs and finishes them without re-running finished steps.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from skyloop.config import Settings
from skyloop.errors import Conflict, SkyloopError
from skyloop.execution.api import prepare
from skyloop.execution.backends.base import Backend
from skyloop.execution.orchestrator import Orchestrator
from skyloop.execution.runstate import Observer
from skyloop.spec.pipeline import PipelineSpec
from skyloop.store.runs import claim_run, claimable_runs, get_run, release_run
from skyloop.store.workspace import Workspace

__all__ = ["Agent"]


class Agent:
    """Claims runs (queued for its backend, or orphaned by a dead process) and drives up to `max_runs` at once."""

    def __init__(self, settings: Settings, workspace: Workspace, backend: Backend,
                 observer: Observer | None = None, max_runs: int = 16) -> None:
        self.settings, self.workspace, self.backend = settings, workspace, backend
        self.max_runs = max_runs
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

    def serve(self, stop: threading.Event | None = None, once: bool = False) -> list[str]:
        """Work until `stop` is set (or, with `once`, until nothing is queued or held); returns the runs claimed."""
        stop = stop or threading.Event()
        poll = self.settings.execution.agent_poll_seconds
        orch = self.orchestrator
        next_poll = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_poll:
                    taken = self._claim()
                    next_poll = now + poll
                    if once and not taken and not orch.runs:
                        break
                if orch.runs:
                    orch.turn(max_wait=max(0.0, min(poll, next_poll - time.monotonic())))
                else:
                    stop.wait(max(0.0, next_poll - time.monotonic()))
        except KeyboardInterrupt:
            raise  # stopped by the user (Ctrl-C), like a stop request: the runs are handed back below
        except BaseException as exc:
            orch.abort("FAILED", f"agent stopped: {type(exc).__name__}: {exc}")
            raise
        finally:
            if orch.runs:  # stopped on request: leave the runs for another agent to adopt
                orch.relinquish()
            orch.close()
        return self.claimed
