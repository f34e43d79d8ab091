"""Alembic environment: migrations always run on a connection handed over by `Database`."""

from __future__ import annotations

from alembic import context

from skyloop.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("skyloop runs its migrations through skyloop.store.db.Database")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
