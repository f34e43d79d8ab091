"""Databases written by an older skyloop, opened by this one: every row survives every migration, on SQLite
and on PostgreSQL, and a database newer than this skyloop is refused without a change."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Table, column, insert, inspect, select, table, text

from skyloop.errors import StoreError
from skyloop.store.db import Database
from skyloop.store.migrations import HEAD, upgrade
from skyloop.store.models import Base
from skyloop.store.runs import step_runs

POSTGRES = pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.integration])
OLD_REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006", "0007"]

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 12, 5, 0, tzinfo=UTC)

# Rows an older skyloop wrote, by the revision that brought their table in; only the columns that existed
# then (the columns later revisions add are left to their defaults).
OLD_ROWS: list[tuple[str, str, list[dict[str, Any]]]] = [
    ("0001", "runs", [
        {"id": "r1", "pipeline": "train", "spec": {"name": "train", "tasks": ["make", "fit"]}, "params": {"n": 3},
         "status": "SUCCEEDED", "backend": "local", "created_at": T0, "started_at": T0, "ended_at": T1,
         "error": None, "owner": None, "lease_expires_at": None, "priority": 0},
        {"id": "r2", "pipeline": "train", "spec": {"name": "train"}, "params": {}, "status": "QUEUED",
         "backend": "ray", "created_at": T1, "started_at": None, "ended_at": None, "error": None,
         "owner": None, "lease_expires_at": None, "priority": 5},
    ]),
    ("0001", "step_runs", [
        {"id": "s1", "run_id": "r1", "task": "make", "map_index": -1, "attempt": 1, "state": "SUCCEEDED",
         "step_ref": "pipe:make", "code_hash": "c" * 64, "cache_key": "k" * 64, "resources": {"cpu": 1},
         "created_at": T0, "started_at": T0, "ended_at": T1, "error": None, "traceback": None,
         "log_path": "/logs/s1.log", "worker": "host:1", "max_rss": 2**33, "cached_from": None},
        {"id": "s2", "run_id": "r1", "task": "fit", "map_index": -1, "attempt": 1, "state": "CACHED",
         "step_ref": "pipe:fit", "code_hash": None, "cache_key": None, "resources": {}, "created_at": T1,
         "started_at": None, "ended_at": T1, "error": None, "traceback": None, "log_path": None,
         "worker": None, "max_rss": None, "cached_from": "s0"},
    ]),
    ("0001", "artifacts", [
        {"digest": "a" * 64, "serializer": "pickle", "type_name": "list", "size": 12, "created_at": T0,
         "last_used_at": T1, "deleted_at": None, "data": b"\x80\x05small"},
        {"digest": "b" * 64, "serializer": "raw", "type_name": "bytes", "size": 10**6, "created_at": T0,
         "last_used_at": T0, "deleted_at": None, "data": None},
    ]),
    ("0001", "lineage", [
        {"step_run_id": "s1", "artifact": "a" * 64, "direction": "out", "name": "output", "position": -1},
        {"step_run_id": "s2", "artifact": "a" * 64, "direction": "in", "name": "xs", "position": 0},
    ]),
    ("0001", "artifact_pins", [
        {"artifact": "b" * 64, "holder": "model:clf/1", "created_at": T1},
    ]),
    ("0001", "events", [
        {"run_id": "r1", "step_run_id": None, "at": T0, "kind": "run.started", "message": "started",
         "data": {}},
        {"run_id": "r1", "step_run_id": "s1", "at": T1, "kind": "step.succeeded", "message": "",
         "data": {"seconds": 1.5}},
    ]),
    ("0003", "models", [
        {"id": 1, "name": "clf", "description": "a classifier", "tags": {"team": "ml"}, "latest_version": 1,
         "created_at": T0, "updated_at": T1},
    ]),
    ("0003", "model_versions", [
        {"id": 1, "model_id": 1, "version": 1, "flavor": "sklearn", "spec": {"flavor": "sklearn"},
         "manifest": "m" * 64, "files": {"model.yaml": "m" * 64, "model.pkl": "b" * 64}, "tags": {},
         "run_id": "r1", "step_run_id": "s2", "created_at": T1},
    ]),
    ("0003", "model_aliases", [
        {"model_id": 1, "alias": "champion", "version_id": 1, "updated_at": T1},
    ]),
    ("0004", "inference_feedback", [
        {"model": "clf", "version": "1", "inference_id": "q1", "truth": [1, 0], "reward": None,
         "created_at": T0},
        {"model": "clf", "version": None, "inference_id": "q2", "truth": None, "reward": 0.25,
         "created_at": T1},
    ]),
    ("0005", "deployments", [
        {"name": "web", "spec": {"predictors": []}, "spec_version": 2, "desired": "running", "status": "Healthy",
         "reason": "", "state": {"gateway": "127.0.0.1:8000"}, "controller": None, "lease_expires_at": None,
         "created_at": T0, "updated_at": T1},
    ]),
    ("0005", "deployment_events", [
        {"deployment": "web", "spec_version": 2, "at": T1, "kind": "rollout.step", "status": "Progressing",
         "step": 1, "weights": {"main": 90, "canary": 10}, "versions": {"main": "1"}, "metrics": None,
         "reason": ""},
    ]),
    ("0005", "deployment_commands", [
        {"deployment": "web", "command": "promote", "created_at": T1, "handled_at": None},
    ]),
    ("0006", "payload_segments", [
        {"deployment": "web", "path": "payloads/web/0001.parquet", "rows": 100, "versions": ["1"],
         "first_at": T0, "last_at": T1},
    ]),
    ("0006", "drift_reports", [
        {"deployment": "web", "version": "1", "at": T1, "dataset_drift": True, "share": 0.5,
         "report": {"columns": {"x": 0.01}}},
    ]),
]


@pytest.fixture(params=["sqlite", POSTGRES])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A new database on SQLite, then on the private PostgreSQL."""
    return sqlite_url if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


def _old_table(name: str, columns: list[str]) -> Any:
    # Only the columns given, with the models' types (UTC timestamps, JSON), and none of the models'
    # Python-side defaults for columns that a later revision adds.
    model: Table = Base.metadata.tables[name]
    return table(name, *(column(c, model.c[c].type) for c in columns))


def _rows_of(database: Database, revision: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    with database.engine.connect() as conn:
        for since, name, rows in OLD_ROWS:
            if since <= revision:
                old = _old_table(name, list(rows[0]))
                # Sorted here: PostgreSQL cannot order by a JSON column.
                found[name] = sorted((dict(r._mapping) for r in conn.execute(select(old))), key=repr)
    return found


@pytest.mark.parametrize("revision", OLD_REVISIONS)
def test_a_db_of_an_older_skyloop_keeps_every_row(url: str, revision: str) -> None:
    old = Database(url, migrate=False)
    with old.engine.begin() as conn:
        upgrade(conn, revision)
        for since, name, rows in OLD_ROWS:
            if since <= revision:
                conn.execute(insert(_old_table(name, list(rows[0]))), rows)
    before = _rows_of(old, revision)
    assert sum(map(len, before.values())) == sum(len(rows) for since, _, rows in OLD_ROWS if since <= revision)
    old.dispose()

    current = Database(url)  # what any command does when it opens the home
    try:
        with current.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
            if current.is_sqlite:  # the migration turned them off for its own connection only
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert _rows_of(current, revision) == before
        with current.read() as session:
            # what `skyloop runs show r1` lists
            assert [s.id for s in step_runs(session, "r1")] == ["s1", "s2"]
        with current.engine.connect() as conn:
            weights = conn.execute(text("SELECT id, weight, backend FROM runs ORDER BY id")).all()
        assert [tuple(w) for w in weights] == [("r1", 1.0, "local"), ("r2", 1.0, "ray")]
    finally:
        current.dispose()


def test_a_db_of_a_newer_skyloop_is_refused_unchanged(url: str) -> None:
    newer = Database(url)
    with newer.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0042'"))
        before = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in inspect(conn).get_table_names()}
    newer.dispose()
    with pytest.raises(StoreError, match=r"'0042', which this skyloop does not know.*Upgrade skyloop"):
        Database(url)
    check = Database(url, migrate=False)
    with check.engine.connect() as conn:
        if not check.is_sqlite:  # the refused open closed its connections (a server retrying would leak them)
            others = ("SELECT count(*) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            assert conn.execute(text(others)).scalar() == 0
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0042"
        assert {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                for t in inspect(conn).get_table_names()} == before
    check.dispose()


def test_the_training_inputs_of_versions_registered_before_are_pinned(url: str) -> None:
    # Registering a version now pins the artifacts its step read; versions registered before had only their
    # files pinned, and `artifacts gc` deleted their training data. The upgrade pins what is still stored.
    old = Database(url, migrate=False)
    spec = {"flavor": "sklearn", "producer": {"run_id": "r1", "inputs": {
        "X": "a" * 64, "y": "b" * 64, "gone": "c" * 64, "never": "d" * 64}}}
    with old.engine.begin() as conn:
        upgrade(conn, "0009")
        conn.execute(insert(_old_table("artifacts", ["digest", "serializer", "type_name", "size", "created_at",
                                                     "last_used_at", "deleted_at", "data"])), [
            {"digest": d * 64, "serializer": "raw", "type_name": "bytes", "size": 1, "created_at": T0,
             "last_used_at": T0, "deleted_at": T1 if d == "c" else None, "data": b"x"} for d in "abc"])
        conn.execute(insert(_old_table("models", ["id", "name", "description", "tags", "latest_version",
                                                  "created_at", "updated_at"])),
                     [{"id": 1, "name": "clf", "description": "", "tags": {}, "latest_version": 2,
                       "created_at": T0, "updated_at": T1}])
        conn.execute(insert(_old_table("model_versions", ["id", "model_id", "version", "flavor", "spec", "manifest",
                                                          "files", "tags", "run_id", "step_run_id", "created_at"])),
                     [{"id": v, "model_id": 1, "version": v, "flavor": "sklearn",
                       "spec": spec if v == 1 else {"flavor": "sklearn"}, "manifest": "m" * 64, "files": {},
                       "tags": {}, "run_id": "r1", "step_run_id": None, "created_at": T1} for v in (1, 2)])
        conn.execute(insert(_old_table("artifact_pins", ["artifact", "holder", "created_at"])),
                     [{"artifact": "b" * 64, "holder": "model:clf/1", "created_at": T0}])
    old.dispose()
    current = Database(url)
    try:
        with current.engine.connect() as conn:
            pins = sorted(tuple(r) for r in conn.execute(text("SELECT artifact, holder FROM artifact_pins")))
        # Still stored: pinned once each (b was already); deleted (c) or never stored (d): nothing to keep.
        assert pins == [("a" * 64, "model:clf/1"), ("b" * 64, "model:clf/1")]
    finally:
        current.dispose()
