"""The per-attempt writes: on SQLite they go to the DBAPI cursor, and must store what SQLAlchemy would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import TextClause, text
from tests_support import lease_fence

from skyloop.errors import StoreError
from skyloop.execution.recorder import Recorder
from skyloop.execution.tasks import TaskResult, TaskState
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.db import Database, translate_errors
from skyloop.store.hotpath import INSERT_EDGE, INSERT_STEP_RUN, UPDATE_STEP_RUN, UPSERT_ARTIFACT, execute_many
from skyloop.store.models import Artifact, Event, Lineage, StepRunRow
from skyloop.store.runs import create_run

EAST = timezone(timedelta(hours=5))
WEST = timezone(timedelta(hours=-7))


def _step_run(step_run_id: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": step_run_id, "run_id": "r", "task": "train", "map_index": -1, "attempt": 1, "state": "RUNNING",
        "step_ref": "m:train", "code_hash": "c" * 64, "cache_key": None,
        "resources": {"cpus": 2.0, "custom": {"license": 1.0}, "memory": 2**31},
        "created_at": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=EAST),
        "started_at": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=EAST), "ended_at": None,
        "error": None, "traceback": None, "log_path": "/logs/train.log", "worker": None, "max_rss": None,
        "cached_from": None, "estimate_seconds": 12.5, "estimate_source": "history", "input_bytes": 3 * 2**33,
    }
    return row | changes


BATCHES: list[tuple[TextClause, list[dict[str, Any]]]] = [
    (UPSERT_ARTIFACT, [{"digest": "d" * 64, "serializer": "json", "type_name": "list", "size": 5,
                        "created_at": datetime(2030, 1, 1, tzinfo=WEST), "last_used_at": datetime(2030, 1, 1),
                        "data": b"[1,2]"},
                       {"digest": "e" * 64, "serializer": "pickle", "type_name": "Model", "size": 9000,
                        "created_at": datetime(2030, 1, 1, tzinfo=UTC), "last_used_at": datetime(2030, 1, 1),
                        "data": None}]),
    (INSERT_STEP_RUN, [_step_run("a" * 32), _step_run("b" * 32, map_index=3, state="CACHED", resources={},
                                                        cache_key="j" * 64,
                                                        ended_at=datetime(2030, 1, 2, 0, 0, tzinfo=UTC))]),
    (UPDATE_STEP_RUN, [{"id": "a" * 32, "state": "FAILED", "ended_at": datetime(2030, 1, 3, 1, 2, 3, 4, tzinfo=WEST),
                        "started_at": None, "error": "ValueError: no", "traceback": "Traceback ...\n",
                        "worker": "ray:127.0.0.1:42", "max_rss": 2**40, "cached_from": "b" * 32,
                        "code_hash": "f" * 64, "cache_key": "k" * 64},  # the code it ran, not the one it was sent with
                       {"id": "b" * 32, "state": "CACHED", "ended_at": datetime(2030, 1, 3, tzinfo=UTC),
                        "started_at": None, "error": None, "traceback": None, "worker": None, "max_rss": None,
                        "cached_from": None, "code_hash": None, "cache_key": None}]),  # keeps its code and key
    (INSERT_EDGE, [{"step_run_id": "a" * 32, "artifact": "d" * 64, "direction": "in", "name": "xs", "position": 0},
                   {"step_run_id": "a" * 32, "artifact": "e" * 64, "direction": "out", "name": "return",
                    "position": -1}]),
]


def _written(db: Database, fast: bool) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables the batches touch, as SQLite stores them, after writing the batches."""
    with db.session() as session:
        create_run(session, run_id="r", pipeline="p", spec={}, params={}, backend="inline", owner="me",
                   lease_seconds=30)
    with db.engine.connect() as conn, conn.begin():
        for statement, rows in BATCHES:
            if fast:
                execute_many(conn, statement, rows)
            else:
                conn.execute(statement, rows)
    with db.engine.connect() as conn:
        return {table: [tuple(row) for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2"))]
                for table in ("artifacts", "step_runs", "lineage")}


def test_sqlite_stores_exactly_what_sqlalchemy_would(tmp_path: Path) -> None:
    fast, reference = Database(f"sqlite:///{tmp_path / 'fast.db'}"), Database(f"sqlite:///{tmp_path / 'ref.db'}")
    try:
        stored = _written(fast, fast=True)
        assert stored == _written(reference, fast=False)
        assert [len(rows) for rows in stored.values()] == [2, 2, 2]
        # And the ORM reads it back as written: UTC-aware timestamps, JSON, bytes, the update applied.
        with fast.read() as session:
            row = session.get(StepRunRow, "a" * 32)
            assert row is not None
            assert row.state == "FAILED" and row.error == "ValueError: no" and row.max_rss == 2**40
            assert (row.code_hash, row.cache_key) == ("f" * 64, "k" * 64)
            other = session.get(StepRunRow, "b" * 32)
            assert other is not None and (other.code_hash, other.cache_key) == ("c" * 64, "j" * 64)
            assert row.ended_at == datetime(2030, 1, 3, 1, 2, 3, 4, tzinfo=WEST) and row.ended_at.tzinfo == UTC
            assert row.started_at == datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=EAST)  # COALESCE kept it
            assert row.resources == {"cpus": 2.0, "custom": {"license": 1.0}, "memory": 2**31}
            assert row.input_bytes == 3 * 2**33
            artifact = session.get(Artifact, "d" * 64)
            assert artifact is not None and artifact.data == b"[1,2]"
            assert artifact.last_used_at == datetime(2030, 1, 1, tzinfo=UTC)  # naive counts as UTC
            assert session.query(Lineage).count() == 2
    finally:
        fast.dispose()
        reference.dispose()


def test_a_failed_batch_on_sqlite_is_a_store_error_and_rolls_back(db: Database) -> None:
    with db.session() as session:
        create_run(session, run_id="r", pipeline="p", spec={}, params={}, backend="inline", owner="me",
                   lease_seconds=30)
    with pytest.raises(StoreError, match="UNIQUE"), translate_errors("writing"), db.engine.connect() as conn, \
            conn.begin():
        execute_many(conn, INSERT_STEP_RUN, [_step_run("a" * 32)])
        execute_many(conn, INSERT_STEP_RUN, [_step_run("b" * 32)])  # same run, task, index and attempt
    with db.read() as session:
        assert session.query(StepRunRow).count() == 0


def test_an_attempt_that_ends_before_the_flush_is_inserted_with_its_end(db: Database) -> None:
    with db.session() as session:
        create_run(session, run_id="r", pipeline="p", spec={}, params={}, backend="ray", owner="me",
                   lease_seconds=30)
    recorder = Recorder(db)
    started, ended = 1_900_000_000.25, 1_900_000_003.5
    for key, task in (("a" * 32, "quick"), ("b" * 32, "lost")):
        recorder.attempt(run_id="r", step_run_id=key, task=task, map_index=-1, attempt=1, state="RUNNING",
                         step_ref="m:f", resources={"cpus": 1.0}, log_path="/l")
    recorder.finished(TaskResult(key="a" * 32, state=TaskState.SUCCEEDED, started_at=started, ended_at=ended,
                                 worker="ray:127.0.0.1:7", max_rss=2**20), "r")
    recorder.finished(TaskResult(key="b" * 32, state=TaskState.CRASHED, error="worker died", ended_at=ended), "r")
    recorder.flush()
    recorder.close()
    with db.read() as session:
        quick, lost = session.get(StepRunRow, "a" * 32), session.get(StepRunRow, "b" * 32)
        assert quick is not None and lost is not None
        assert (quick.state, quick.worker, quick.max_rss, quick.error) == ("SUCCEEDED", "ray:127.0.0.1:7", 2**20, None)
        assert (quick.started_at, quick.ended_at) == (datetime.fromtimestamp(started, UTC),
                                                      datetime.fromtimestamp(ended, UTC))
        assert (lost.state, lost.error, lost.ended_at) == ("CRASHED", "worker died", datetime.fromtimestamp(ended, UTC))
        assert lost.started_at is not None and lost.started_at < lost.ended_at  # the launch's, kept


def test_a_flush_drops_the_writes_of_runs_the_owner_no_longer_holds(db: Database) -> None:
    with db.session() as session:
        for run_id, owner in (("held", "me"), ("taken", "other")):
            create_run(session, run_id=run_id, pipeline="p", spec={}, params={}, backend="local", owner=owner,
                       lease_seconds=30)
    recorder = Recorder(db, owner="me")
    output = ArtifactRef("d" * 64, "json", "int", 1, b"1")
    for run_id, key in (("held", "a" * 32), ("taken", "b" * 32)):
        recorder.attempt(run_id=run_id, step_run_id=key, task="t", map_index=-1, attempt=1, state="RUNNING",
                         step_ref="m:f", resources={})
        recorder.finished(TaskResult(key=key, state=TaskState.SUCCEEDED, outputs={"output": output},
                                     ended_at=1_900_000_000.0), run_id)
        recorder.event(run_id, "step.note", "ended", key)
    recorder.flush()
    recorder.close()
    assert recorder.lost == {"taken"}
    with db.read() as session:
        assert [(r.run_id, r.state) for r in session.query(StepRunRow)] == [("held", "SUCCEEDED")]
        assert {e.run_id for e in session.query(Event) if e.kind == "step.note"} == {"held"}
        assert {e.step_run_id for e in session.query(Lineage)} == {"a" * 32}
        assert session.get(Artifact, output.digest) is not None  # artifacts belong to no run


def test_a_write_renews_the_lease_of_the_runs_it_is_for(db: Database) -> None:
    lease_fence(db)
