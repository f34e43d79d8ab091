"""Batched metadata writes of the run loop: one transaction per loop turn, committed before launching.

A turn that launches nothing may leave its writes (attempts that ended, cache hits) for a later
turn, at most `Orchestrator`'s flush interval: nothing waits on them but readers in other processes.

Writes are fenced by ownership: each transaction first checks, under the write lock, which of its runs
the orchestrator still holds, and drops the writes of the others (`lost`). A process that was paused
past its lease while another adopted its run (SIGSTOP, a long GC, a suspended laptop) must not record
ends or launches there: the adopter re-runs what was in flight, and two writers would collide.

The recorder keeps one connection for its writes: checking one out of the pool and building an ORM
session for each turn cost more than the writes themselves (about 0.5 ms of a 1.2 ms flush).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from skyloop.execution.tasks import InputValue, TaskResult, input_edges
from skyloop.store import lineage
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.db import Database, translate_errors
from skyloop.store.hotpath import (
    INSERT_EDGE,
    INSERT_STEP_RUN,
    UPDATE_STEP_RUN,
    UPSERT_ARTIFACT,
    execute_many,
    held_runs,
)
from skyloop.store.runs import add_event, utcnow

__all__ = ["Recorder", "input_edges"]


def _ts(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds is not None else None


@dataclass
class Recorder:
    """Collects the writes of one loop turn (for every run the orchestrator holds) and applies them in
    one transaction."""

    db: Database
    owner: str | None = None
    """Who must hold a run for its writes to land (None: no check, for a process that owns no runs)."""
    lease_seconds: float = 30.0
    """The lease a flush renews on the runs it writes for (see `held_runs`)."""
    lost: set[str] = field(default_factory=set)
    """Runs whose writes a flush dropped because `owner` no longer held them (the caller lets them go)."""
    _runs: dict[str, str] = field(default_factory=dict)
    """Step run id -> run id, of every attempt written since the last flush."""
    _inserts: list[dict[str, Any]] = field(default_factory=list)
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _artifacts: dict[str, ArtifactRef] = field(default_factory=dict)
    _edges: list[tuple[str, str, list[tuple[str, str, int]]]] = field(default_factory=list)
    _events: list[tuple[str, str, str, str | None, dict[str, Any]]] = field(default_factory=list)
    _since: float | None = None
    """Monotonic time of the oldest write not flushed yet."""
    _at_risk: float = 0.0
    """Seconds that the attempts whose ends are not flushed yet ran (what a crash would run again)."""
    _conn: Connection | None = None
    """The connection the writes go through, opened at the first flush (and again after an error)."""

    def _mark(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def waiting_since(self) -> float | None:
        """Monotonic time of the oldest write not flushed yet; None when nothing waits."""
        return self._since

    @property
    def work_at_risk(self) -> float:
        """Seconds of step work whose ends are not flushed yet: what a crash now would make run again."""
        return self._at_risk

    def attempt(self, *, run_id: str, step_run_id: str, task: str, map_index: int, attempt: int, state: str,
                step_ref: str,
                resources: dict[str, Any], code_hash: str | None = None, cache_key: str | None = None,
                inputs: dict[str, InputValue] | None = None, log_path: str | None = None,
                error: str | None = None, cached_from: str | None = None,
                outputs: dict[str, ArtifactRef] | None = None, estimate: tuple[float, str] | None = None,
                input_bytes: int | None = None) -> None:
        """A new attempt row (RUNNING before launch, or already ended: CACHED, SKIPPED, ...)."""
        self._mark()
        self._runs[step_run_id] = run_id
        now = utcnow()
        ended = state not in ("RUNNING", "PENDING")
        self._inserts.append({
            "id": step_run_id, "run_id": run_id, "task": task, "map_index": map_index, "attempt": attempt,
            "state": state, "step_ref": step_ref, "code_hash": code_hash, "cache_key": cache_key,
            "resources": resources, "created_at": now, "started_at": now, "ended_at": now if ended else None,
            "error": error, "traceback": None, "log_path": log_path, "worker": None, "max_rss": None,
            "cached_from": cached_from, "estimate_seconds": estimate[0] if estimate else None,
            "estimate_source": estimate[1] if estimate else None, "input_bytes": input_bytes,
        })
        if inputs:
            self._edges.append((step_run_id, "in", input_edges(inputs)))
        if outputs:
            # A cache hit's outputs: their rows are written again, which also takes back a deletion that a
            # garbage collection marked after the lookup (the lookup touched their blobs, so it kept those).
            self._artifacts.update((ref.digest, ref) for ref in outputs.values())
            self._edges.append((step_run_id, "out", [(n, r.digest, -1) for n, r in outputs.items()]))

    def finished(self, result: TaskResult, run_id: str, cache_key: str | None = None) -> None:
        """An attempt's end as the backend reported it; one that names the code it ran (`code_hash`) takes
        it and `cache_key` in place of what its row was written with."""
        self._mark()
        self._runs[result.key] = run_id
        self._at_risk += result.seconds or 0.0
        self._updates.append({
            "id": result.key, "state": result.state.value, "ended_at": _ts(result.ended_at) or utcnow(),
            "started_at": _ts(result.started_at),
            "error": result.error, "traceback": result.traceback, "worker": result.worker,
            "max_rss": result.max_rss, "cached_from": result.cached_from,
            "code_hash": result.code_hash, "cache_key": cache_key if result.code_hash is not None else None,
        })
        for ref in result.outputs.values():
            self._artifacts[ref.digest] = ref
        if result.outputs:
            self._edges.append((result.key, "out", [(n, r.digest, -1) for n, r in result.outputs.items()]))

    def event(self, run_id: str, kind: str, message: str = "", step_run_id: str | None = None,
              **data: Any) -> None:
        """A run event to record with this turn."""
        self._mark()
        self._events.append((run_id, kind, message, step_run_id, data))

    @property
    def pending(self) -> bool:
        """Whether anything waits to be written."""
        return bool(self._inserts or self._updates or self._edges or self._events)

    def flush(self) -> None:
        """Write everything collected, in one transaction (artifact rows before the edges to them)."""
        if not self.pending:
            self._since, self._at_risk = None, 0.0
            return
        if self._conn is None:
            with translate_errors("connecting to the metadata DB"):
                self._conn = self.db.engine.connect()
        conn = self._conn
        try:
            with translate_errors("writing metadata"), conn.begin():
                self._fence(conn)
                self._write(conn)
        except BaseException:
            self.close()  # a broken connection must not be reused; the next flush opens a new one
            raise
        self._runs = {}
        self._inserts, self._updates, self._edges, self._events = [], [], [], []
        self._artifacts = {}
        self._since, self._at_risk = None, 0.0

    def _fence(self, conn: Connection) -> None:
        """Drop the writes of runs `owner` does not hold any more (artifact rows stay: they belong to no run)."""
        runs = set(self._runs.values()) | {event[0] for event in self._events}
        if self.owner is None or not runs:
            return
        gone = runs - held_runs(conn, runs, self.owner, self.lease_seconds)
        if not gone:
            return
        self.lost |= gone
        keep = {step_run_id for step_run_id, run_id in self._runs.items() if run_id not in gone}
        self._inserts = [row for row in self._inserts if row["id"] in keep]
        self._updates = [row for row in self._updates if row["id"] in keep]
        self._edges = [edge for edge in self._edges if edge[0] in keep]
        self._events = [event for event in self._events if event[0] not in gone]

    def _write(self, conn: Connection) -> None:
        # The prebuilt statements run on the connection (on SQLite, on its cursor): the ORM session's
        # execute path costs more than these small writes.
        if self._artifacts:
            execute_many(conn, UPSERT_ARTIFACT, lineage.artifact_rows(self._artifacts.values()))
        inserts, updates = self._inserts, self._updates
        if inserts and updates:  # an attempt launched and ended since the last flush: insert its end
            pending = {row["id"]: row for row in inserts}
            rest = []
            for update in updates:
                row = pending.get(update["id"])
                if row is None:
                    rest.append(update)
                else:
                    kept = ("code_hash", "cache_key") if update["code_hash"] is None else ()
                    row.update({k: v for k, v in update.items() if k not in kept},
                               started_at=update["started_at"] or row["started_at"])
            updates = rest
        if inserts:
            execute_many(conn, INSERT_STEP_RUN, inserts)
        if updates:
            execute_many(conn, UPDATE_STEP_RUN, updates)
        edges = [{"step_run_id": step_run_id, "artifact": digest, "direction": direction, "name": name,
                  "position": position}
                 for step_run_id, direction, batch in self._edges for name, digest, position in batch]
        if edges:
            execute_many(conn, INSERT_EDGE, edges)
        if self._events:
            # Rare (failures, retries): an ORM session joined to this transaction.
            with Session(bind=conn) as session:
                for run_id, kind, message, event_step, data in self._events:
                    add_event(session, run_id, kind, message, event_step, **data)
                session.flush()

    def close(self) -> None:
        """Close the connection (writes not flushed yet stay collected)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
