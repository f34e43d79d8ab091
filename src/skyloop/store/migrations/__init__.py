"""Alembic migrations of the metadata DB, run programmatically when a `Database` opens."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from skyloop.store.models import Base

__all__ = ["HEAD", "alembic_config", "create", "known_revision", "upgrade"]

HEAD = "0010"
"""The newest revision; a test checks it against the scripts so that the quick check stays right."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at this folder (and at `connection`, when given)."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def known_revision(revision: str) -> bool:
    """Whether `revision` is one of this skyloop's migrations (loads the scripts: only off the quick path)."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:  # Alembic's "Can't locate revision" and its kin
        return False


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Apply migrations up to `revision` on `connection`.

    On SQLite the connection must have foreign keys off (as `Database.migrate` sets it): Alembic alters a
    table there by copying it and dropping the old one, and that DROP would cascade to the rows pointing at it.
    """
    command.upgrade(alembic_config(connection), revision)


def create(connection: Connection) -> None:
    """Create the newest schema in an empty database at once and stamp it `HEAD` (Alembic's recipe for
    a new database: a third of the time of replaying every migration, which a test proves equivalent).

    The stamp writes Alembic's own version table (its `version_table_impl` hook) rather than running
    `alembic stamp`, which loads every migration script only to look up `HEAD` (~9 ms per new DB).
    """
    Base.metadata.create_all(connection, checkfirst=False)
    version = MigrationContext.configure(connection).impl.version_table_impl(
        version_table="alembic_version", version_table_schema=None, version_table_pk=True)
    version.create(connection)
    connection.execute(version.insert().values(version_num=HEAD))
