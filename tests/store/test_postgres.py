"""The same store on PostgreSQL (a private server started by the `postgres_url` fixture)."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from tests_support import age_blobs, lease_fence, replayed_database, schema_of

from skyloop import Settings, run
from skyloop.errors import Conflict
from skyloop.registry.package import ModelManifest
from skyloop.registry.registry import create_version
from skyloop.store import lineage
from skyloop.store.db import Database
from skyloop.store.gc import collect_garbage
from skyloop.store.migrations import HEAD
from skyloop.store.models import Artifact, Base, Event, RunRow, StepRunRow
from skyloop.store.runs import claim_run, create_run, get_run, reap_expired_runs, utcnow
from skyloop.store.serializers import serialize
from skyloop.store.workspace import Workspace

pytestmark = [pytest.mark.postgres, pytest.mark.integration]


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture
def pg_settings(tmp_path: Path, pg_url: str) -> Settings:
    return Settings.for_home(tmp_path / "home").model_copy(update={"db_url": pg_url})


def test_urls_use_psycopg_3(pg_db: Database) -> None:
    assert pg_db.engine.dialect.driver == "psycopg"
    assert not pg_db.is_sqlite


def test_the_migration_applies(pg_db: Database, pg_url: str, new_pg_url: Callable[[], str]) -> None:
    with pg_db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
        assert set(inspect(conn).get_table_names()) == {*Base.metadata.tables, "alembic_version"}
    again = Database(pg_url)  # opening it again finds it current
    again.migrate()
    again.dispose()
    # The new database was created from the models; the scripts, replayed, must build the same.
    replayed = replayed_database(new_pg_url())
    with replayed.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert schema_of(pg_db) == schema_of(replayed)
    replayed.dispose()


def test_a_pipeline_runs_end_to_end_and_reruns_from_cache(chain: ModuleType, pg_settings: Settings) -> None:
    first = run(chain.chain, {"n": 3000}, backend="inline", settings=pg_settings)
    assert first.status == "SUCCEEDED", first.error
    assert {t: s.state.value for t, s in first.steps.items()} == {"make": "SUCCEEDED", "total": "SUCCEEDED"}
    assert first.output("total") == sum(range(3000))  # kept inline, in a bytea column
    second = run(chain.chain, {"n": 3000}, backend="inline", settings=pg_settings)
    assert second.status == "SUCCEEDED", second.error
    assert {t: s.state.value for t, s in second.steps.items()} == {"make": "CACHED", "total": "CACHED"}
    assert second.output("make") == list(range(3000))  # a blob file
    first._ws.close()
    second._ws.close()

    workspace = Workspace.open(pg_settings)
    try:
        assert not (pg_settings.home / "skyloop.db").exists()  # the metadata went to PostgreSQL
        listed = hashlib.sha256(serialize(list(range(3000)))[1]).hexdigest()
        with workspace.db.session() as session:
            makers = lineage.producers(session, listed)
            readers = lineage.consumers(session, listed)
            row = get_run(session, first.id)
        assert [(e.run_id, e.task) for e in makers] == [(first.id, "make"), (second.id, "make")]
        assert [(e.run_id, e.task, e.name) for e in readers] == [(first.id, "total", "xs"), (second.id, "total", "xs")]
        for stamp in (row.created_at, row.started_at, row.ended_at):
            assert stamp is not None and stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert first.steps["make"].started_at is not None and first.steps["make"].started_at.tzinfo is not None

        age_blobs(workspace.store)
        report = collect_garbage(workspace, timedelta(0))
        assert report.artifacts == 2 and not workspace.store.exists(listed)
    finally:
        workspace.close()
    third = run(chain.chain, {"n": 3000}, backend="inline", settings=pg_settings)
    assert {t: s.state.value for t, s in third.steps.items()} == {"make": "SUCCEEDED", "total": "SUCCEEDED"}
    third._ws.close()


def test_timestamps_come_back_timezone_aware(pg_db: Database) -> None:
    local = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-7)))
    with pg_db.session() as session:
        create_run(session, run_id="tz", pipeline="p", spec={}, params={}, backend="inline", owner="me",
                   lease_seconds=30)
        get_run(session, "tz").ended_at = local
    with pg_db.session() as session:
        row = get_run(session, "tz")
        assert row.ended_at == local and row.ended_at.tzinfo == UTC
        assert row.created_at.tzinfo == UTC and abs(row.created_at - utcnow()) < timedelta(minutes=1)
        assert session.scalars(select(RunRow.id).where(RunRow.ended_at > datetime(2030, 1, 2, tzinfo=UTC))).all() \
            == ["tz"]


def test_record_artifacts_upserts_a_batch_with_repeats(pg_db: Database, tmp_path: Path) -> None:
    from skyloop.store.artifacts import ArtifactStore

    store = ArtifactStore(str(tmp_path / "artifacts"))
    ref, other = store.put({"v": 1}), store.put({"v": 2})
    with pg_db.session() as session:
        lineage.record_artifacts(session, [ref, other, ref])
    with pg_db.session() as session:
        lineage.record_artifacts(session, [ref])
        assert session.scalar(select(func.count()).select_from(Artifact)) == 2


NUL_SOURCE = """
from skyloop import pipeline, step


@step(cache=False, retries=0)
def parse() -> int:
    raise RuntimeError("bad record: ab\\x00cd")  # text decoded from binary data


@pipeline
def nul():
    return parse()
"""


def test_text_with_a_nul_character_is_stored_not_refused(write_module: Callable[[str, str], ModuleType],
                                                          pg_settings: Settings) -> None:
    # PostgreSQL refuses NUL in text: a step's error holding one made the write of its end fail, and an agent,
    # which writes the ends of all its runs in one transaction, then failed every run it held, and stopped.
    failed = run(write_module("nul_pipeline", NUL_SOURCE).nul, {}, backend="inline", settings=pg_settings)
    assert failed.status == "FAILED"
    assert "bad record: ab\ufffdcd" in (failed.error or "")
    assert "ab\ufffdcd" in (failed.steps["parse"].error or "")
    failed._ws.close()


def test_leases_on_postgres(pg_db: Database) -> None:
    with pg_db.session() as session:
        create_run(session, run_id="r1", pipeline="p", spec={}, params={}, backend="local", owner="alice",
                   lease_seconds=60)
    with pytest.raises(Conflict), pg_db.session() as session:
        claim_run(session, "r1", "bob", lease_seconds=60)
    with pg_db.session() as session:
        get_run(session, "r1").lease_expires_at = utcnow() - timedelta(seconds=1)
    with pg_db.session() as session:
        assert reap_expired_runs(session) == ["r1"]
    with pg_db.session() as session:
        assert "--resume r1" in (get_run(session, "r1").error or "")
        assert claim_run(session, "r1", "bob", lease_seconds=60).owner == "bob"


def test_two_processes_migrate_and_insert_at_once(pg_url: str,
                                                  concurrent_writers: Callable[[str, int, int], None]) -> None:
    concurrent_writers(pg_url, 2, 100)
    database = Database(pg_url)
    with database.session() as session:
        ids = set(session.scalars(select(RunRow.id)))
        custom = session.scalar(select(func.count()).select_from(Event).where(Event.kind == "custom"))
    database.dispose()
    assert ids == {f"w{n}-{i}" for n in range(2) for i in range(100)}
    assert custom == 200


def test_two_writers_register_the_first_version_of_a_new_model_at_once(pg_db: Database) -> None:
    # FOR UPDATE locks no row before the model exists: both writers used to insert it, and one failed.
    manifest = ModelManifest(name=f"fresh-{uuid.uuid4().hex[:8]}", flavor="python")
    second: list[int | BaseException] = []

    def register() -> None:
        try:
            with pg_db.session() as session:
                second.append(create_version(session, manifest, "0" * 64, {}).version)
        except BaseException as exc:
            second.append(exc)

    with pg_db.session() as session:
        assert create_version(session, manifest, "0" * 64, {}).version == 1
        writer = threading.Thread(target=register)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()  # it waits for this transaction's model row
    writer.join(30)
    assert second == [2]


def test_an_attempt_sent_ahead_takes_the_code_it_ran_on_postgres(pg_db: Database) -> None:
    from skyloop.store.hotpath import INSERT_STEP_RUN, UPDATE_STEP_RUN, execute_many

    with pg_db.session() as session:
        create_run(session, run_id="rk", pipeline="p", spec={}, params={}, backend="ray", owner="me",
                   lease_seconds=30)
    now = utcnow()
    rows = [{"id": key, "run_id": "rk", "task": key, "map_index": -1, "attempt": 1, "state": "RUNNING",
             "step_ref": "m:t", "code_hash": "old", "cache_key": f"key-{key}", "resources": {}, "created_at": now,
             "started_at": now, "ended_at": None, "error": None, "traceback": None, "log_path": None, "worker": None,
             "max_rss": None, "cached_from": None, "estimate_seconds": None, "estimate_source": None,
             "input_bytes": None} for key in ("a", "b")]
    end = {"state": "SUCCEEDED", "ended_at": now, "started_at": None, "error": None, "traceback": None,
           "worker": None, "max_rss": None, "cached_from": None}
    with pg_db.engine.connect() as conn, conn.begin():
        execute_many(conn, INSERT_STEP_RUN, rows)
        execute_many(conn, UPDATE_STEP_RUN, [{**end, "id": "a", "code_hash": "new", "cache_key": "key-new"},
                                             {**end, "id": "b", "code_hash": None, "cache_key": None}])
    with pg_db.session() as session:
        found = {row.id: (row.state, row.code_hash, row.cache_key) for row in session.scalars(select(StepRunRow))}
    assert found == {"a": ("SUCCEEDED", "new", "key-new"), "b": ("SUCCEEDED", "old", "key-b")}


def test_a_write_renews_the_lease_of_the_runs_it_is_for_on_postgres(pg_db: Database) -> None:
    lease_fence(pg_db)
