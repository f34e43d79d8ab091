"""The metadata DB: engine set-up (SQLite in WAL mode, or PostgreSQL), sessions and migrations."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from skyloop.errors import StoreError
from skyloop.store.hotpath import dbapi_cursor
from skyloop.store.migrations import HEAD, create, known_revision, upgrade

__all__ = ["Database", "translate_errors"]


@contextlib.contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """Turn SQLAlchemy errors (and sqlite3's, from code on the DBAPI connection) into `StoreError`
    naming what we were doing."""
    try:
        yield
    except (SQLAlchemyError, sqlite3.Error) as exc:
        detail = exc.args[0] if exc.args else exc
        raise StoreError(f"metadata DB failed while {action}: {exc.__class__.__name__}: {detail}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers and one writer work at once across processes; NORMAL sync is safe in WAL
    # (a power cut can lose the last commits, never corrupt the file).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _check_foreign_keys(conn: Connection) -> None:
    # Migrations ran with foreign keys off (see `Database._foreign_keys_off`): refuse to commit one that
    # left a row pointing at nothing, as SQLite would have with them on.
    with dbapi_cursor(conn) as cursor:
        broken = cursor.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({row[0] for row in broken})
        raise StoreError(f"migrating the metadata DB would leave {len(broken)} rows of {', '.join(tables)} pointing "
                         "at rows that do not exist; nothing was changed")


class Database:
    """One metadata DB: an engine, a session factory, and the schema brought up to date on open."""

    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except Exception as exc:
            raise StoreError(f"invalid metadata DB URL {url!r}: {exc}") from exc
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # Our own BEGIN IMMEDIATE (below) takes the write lock up front, avoiding deadlocks
            # between two processes that both read and then try to write.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30, "isolation_level": None}
        elif parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            self.engine: Engine = create_engine(parsed, pool_pre_ping=not self.is_sqlite, **kwargs)
        except ImportError as exc:
            raise StoreError(f"the driver for {parsed.get_backend_name()} is missing ({exc}); "
                             "install the extra: pip install 'skyloop[postgres]'") from exc
        except NoSuchModuleError as exc:
            raise StoreError(f"unsupported metadata DB URL {url!r}: {exc}; use sqlite:/// or postgresql://") from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = self._sessions
        self.read_engine: Engine = self.engine
        """Where reads go (see `read`)."""
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            # Reads need no write lock: a second engine whose transactions begin deferred (not for an
            # in-memory DB, which a second engine would open empty).
            self.read_engine = create_engine(parsed, **kwargs)
            event.listen(self.read_engine, "connect", _sqlite_pragmas)
            event.listen(self.read_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
            self._readers = sessionmaker(self.read_engine, expire_on_commit=False)
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self.dispose()  # nobody gets this object to close: a refused DB must not keep connections open
                raise

    def _current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (cheap when it already is)."""
        with translate_errors("checking the schema version"):
            if self._current_revision() == HEAD:
                return
        with self._migration_lock(), translate_errors("migrating the schema"):
            current = self._current_revision()
            if current is not None and current != HEAD and not known_revision(current):
                raise StoreError(f"the metadata DB {self.url} is at schema revision {current!r}, which this "
                                 f"skyloop does not know (its newest is {HEAD!r}): a newer skyloop wrote it. "
                                 "Upgrade skyloop, or use another --home (or SKYLOOP_DB_URL)")
            if current != HEAD:
                with self.engine.connect() as conn, self._foreign_keys_off(conn), conn.begin():
                    if inspect(conn).get_table_names():
                        upgrade(conn)
                    else:  # a new database
                        create(conn)
                    if self.is_sqlite:
                        _check_foreign_keys(conn)

    @contextlib.contextmanager
    def _foreign_keys_off(self, conn: Connection) -> Iterator[None]:
        # Alembic alters a SQLite table by copying it and dropping the old one, and with foreign keys on,
        # SQLite's DROP TABLE first deletes every row, cascading: recreating `runs` (0008) emptied
        # `step_runs`, `lineage` and `events`. The pragma is ignored inside a transaction, so it is set
        # on the DBAPI connection before ours begins, and set back before the connection returns to the pool.
        if not self.is_sqlite:
            yield
            return
        with dbapi_cursor(conn) as cursor:
            cursor.execute("PRAGMA foreign_keys=OFF")
        try:
            yield
        finally:
            try:
                with dbapi_cursor(conn) as cursor:
                    cursor.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error:
                conn.invalidate()  # never hand out a connection that does not enforce foreign keys
                raise

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        # Two processes opening a new DB at once must not both create the tables.
        if self.is_sqlite:
            database = make_url(self.url).database
            if not database or database == ":memory:":
                yield
                return
            fd = os.open(f"{database}.migrate.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        else:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(7243501)"))
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(7243501)"))
                    conn.commit()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with translate_errors("writing metadata"), self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: on SQLite it does not take the write lock."""
        with translate_errors("reading metadata"), self._readers() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()
