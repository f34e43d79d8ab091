"""The metadata DB on SQLite: migrations, WAL mode, error translation, several writing processes."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from tests_support import replayed_database, schema_of

from skyloop.errors import StoreError
from skyloop.store.db import Database
from skyloop.store.migrations import HEAD, alembic_config
from skyloop.store.models import Base, Event, RunRow
from skyloop.store.runs import create_run, get_run, list_runs


def new_run(db: Database, run_id: str, owner: str = "me", lease_seconds: float = 60) -> None:
    with db.session() as session:
        create_run(session, run_id=run_id, pipeline="p", spec={"name": "p"}, params={"n": 1}, backend="inline",
                   owner=owner, lease_seconds=lease_seconds)


def test_head_matches_the_migration_scripts() -> None:
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD


def test_a_new_db_is_migrated_to_head(db: Database) -> None:
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
        assert set(inspect(conn).get_table_names()) == {*Base.metadata.tables, "alembic_version"}


def test_the_migrations_match_the_models(tmp_path: Path) -> None:
    replayed = replayed_database(f"sqlite:///{tmp_path / 'replayed.db'}")
    with replayed.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    replayed.dispose()


def test_a_new_db_gets_the_schema_the_migrations_build(db: Database, tmp_path: Path) -> None:
    # A new database is created from the models at once and stamped HEAD; one that has tables is
    # migrated. Both must end with the same schema, server defaults and constraints included.
    replayed = replayed_database(f"sqlite:///{tmp_path / 'replayed.db'}")
    created = schema_of(db)
    assert created == schema_of(replayed)
    assert ("weight", "FLOAT", False, "'1'") in created["runs"]["columns"]  # type: ignore[index]
    replayed.dispose()


def test_migrating_again_is_a_no_op(db: Database, sqlite_url: str) -> None:
    new_run(db, "r1")
    db.migrate()
    again = Database(sqlite_url)
    again.migrate()
    with again.session() as session:
        assert get_run(session, "r1").params == {"n": 1}
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    again.dispose()


def test_migrate_false_leaves_the_file_empty(sqlite_url: str) -> None:
    database = Database(sqlite_url, migrate=False)
    with database.engine.connect() as conn:
        assert inspect(conn).get_table_names() == []
    database.migrate()
    with database.engine.connect() as conn:
        assert "runs" in inspect(conn).get_table_names()
    database.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(db: Database, sqlite_url: str) -> None:
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert Path(sqlite_url.removeprefix("sqlite:///") + "-wal").exists()


def test_a_missing_folder_is_created(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'a' / 'b' / 'meta.db'}")
    assert (tmp_path / "a" / "b" / "meta.db").exists()
    database.dispose()


def test_an_invalid_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="invalid metadata DB URL"):
        Database("not a url")


def test_a_missing_driver_names_the_extra() -> None:
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here")
    with pytest.raises(StoreError, match="pip install"):
        Database("mysql://u@localhost/db", migrate=False)  # MySQLdb is not a dependency


def test_an_unknown_dialect_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="unsupported metadata DB URL"):
        Database("nosuchdb://u@localhost/db", migrate=False)


def test_sqlalchemy_errors_become_store_errors_and_roll_back(db: Database) -> None:
    new_run(db, "dup")
    with pytest.raises(StoreError, match="IntegrityError"), db.session() as session:
        session.add(Event(run_id="dup", at=datetime.now(UTC), kind="before.failure", message="", data={}))
        create_run(session, run_id="dup", pipeline="p", spec={}, params={}, backend="inline", owner="x",
                   lease_seconds=1)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Event).where(Event.kind == "before.failure")) == 0


def test_timestamps_come_back_timezone_aware_in_utc(db: Database) -> None:
    new_run(db, "tz")
    local = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5)))
    with db.session() as session:
        get_run(session, "tz").ended_at = local
    with db.session() as session:
        row = get_run(session, "tz")
        assert row.created_at.tzinfo is not None and row.created_at.utcoffset() == timedelta(0)
        assert row.ended_at == local
        assert row.ended_at.tzinfo == UTC
        # Ordering by time works on the stored text too.
        assert session.scalars(select(RunRow.id).where(RunRow.ended_at > datetime(2030, 1, 1, tzinfo=UTC))).all() \
            == ["tz"]


def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(StoreError, match="FOREIGN KEY"), db.session() as session:
        session.add(Event(run_id="no-such-run", at=datetime.now(UTC), kind="x", message="", data={}))


# -- several processes at once ---------------------------------------------------------------------

@pytest.mark.integration
def test_several_processes_migrate_and_write_at_once(sqlite_url: str,
                                                    concurrent_writers: Callable[[str, int, int], None]) -> None:
    workers, count = 4, 200
    concurrent_writers(sqlite_url, workers, count)
    database = Database(sqlite_url)
    with database.session() as session:
        ids = set(session.scalars(select(RunRow.id)))
        per_kind = dict(session.execute(select(Event.kind, func.count()).group_by(Event.kind)).tuples().all())
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    database.dispose()
    assert ids == {f"w{n}-{i}" for n in range(workers) for i in range(count)}
    assert per_kind == {"run.started": workers * count, "custom": workers * count}


def test_an_in_memory_db_reads_what_it_wrote() -> None:
    db = Database("sqlite://")
    try:
        with db.session() as session:
            create_run(session, run_id="r1", pipeline="p", spec={}, params={}, backend="inline", owner="me",
                       lease_seconds=30)
        with db.read() as session:
            assert [r.id for r in list_runs(session)] == ["r1"]
    finally:
        db.dispose()
