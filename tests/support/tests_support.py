"""Small helpers shared by tests (importable as `tests_support`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from sqlalchemy import inspect

from skyloop.store.db import Database
from skyloop.store.migrations import upgrade

__all__ = ["replayed_database", "schema_of", "write"]


def write(path: Path, text: str) -> Path:
    """Write dedented text (without the leading newline) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def replayed_database(url: str) -> Database:
    """A database whose schema comes from running every migration script in turn."""
    database = Database(url, migrate=False)
    with database.engine.begin() as conn:
        upgrade(conn)
    return database


def schema_of(database: Database) -> dict[str, object]:
    """Everything the inspector tells about each table, in a comparable form."""
    with database.engine.connect() as conn:
        found = inspect(conn)
        return {table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in found.get_columns(table)],
            "primary key": found.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in found.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
            "foreign keys": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                                    f["options"].get("ondelete")) for f in found.get_foreign_keys(table)),
        } for table in sorted(found.get_table_names())}
