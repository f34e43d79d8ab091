"""pin the training inputs of registered model versions, as registering a version now does

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 12:30:00

A version's `model.yaml` lists the artifacts its producing step read (`producer.inputs`, shown by
`skyloop models show`), but only its own files were pinned: `skyloop artifacts gc` deleted the training
data of versions registered before this revision. Their inputs still stored are pinned now.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_HOLDER = "model:{name}/{version}"


def upgrade() -> None:
    conn = op.get_bind()
    versions = sa.table("model_versions", sa.column("model_id", sa.Integer), sa.column("version", sa.Integer),
                        sa.column("spec", sa.JSON))
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("name", sa.String))
    artifacts = sa.table("artifacts", sa.column("digest", sa.String), sa.column("deleted_at", sa.DateTime))
    pins = sa.table("artifact_pins", sa.column("artifact", sa.String), sa.column("holder", sa.String),
                    sa.column("created_at", sa.DateTime(timezone=True)))
    wanted: dict[str, set[str]] = {}
    for name, version, spec in conn.execute(
            sa.select(models.c.name, versions.c.version, versions.c.spec)
            .join(models, models.c.id == versions.c.model_id)):
        producer: Any = (spec or {}).get("producer") if isinstance(spec, dict) else None
        inputs = producer.get("inputs") if isinstance(producer, dict) else None
        if isinstance(inputs, dict):
            digests = {d for d in inputs.values() if isinstance(d, str)}
            if digests:
                wanted[_HOLDER.format(name=name, version=version)] = digests
    if not wanted:
        return
    every = sorted(set().union(*wanted.values()))
    stored: set[str] = set()
    for i in range(0, len(every), 500):
        stored.update(conn.execute(sa.select(artifacts.c.digest).where(
            artifacts.c.digest.in_(every[i:i + 500]), artifacts.c.deleted_at.is_(None))).scalars())
    held = {(a, h) for a, h in conn.execute(sa.select(pins.c.artifact, pins.c.holder)
                                            .where(pins.c.holder.like("model:%")))}
    now = datetime.now(UTC)
    rows = [{"artifact": digest, "holder": holder, "created_at": now}
            for holder, digests in sorted(wanted.items()) for digest in sorted(digests & stored)
            if (digest, holder) not in held]
    if rows:
        conn.execute(sa.insert(pins), rows)


def downgrade() -> None:
    # The pins stay: they keep data that an older skyloop would delete, and remove nothing it needs.
    pass
