"""Repository functions of the model registry: each takes the session explicitly.

Versions are immutable once written; tags and aliases are the only things that change. An alias is one
row, so moving it from version 2 to version 3 is one UPDATE, seen by readers either before or after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from skyloop.errors import NotFound, SpecError
from skyloop.registry.package import ModelManifest
from skyloop.registry.uri import LATEST, ModelRef, check_alias, check_name
from skyloop.store.lineage import pin
from skyloop.store.models import Artifact, ModelAliasRow, ModelRow, ModelVersionRow
from skyloop.store.runs import utcnow

__all__ = [
    "ModelInfo",
    "ModelVersionInfo",
    "create_version",
    "delete_tag",
    "get_model",
    "list_models",
    "list_versions",
    "remove_alias",
    "resolve",
    "set_alias",
    "set_tags",
]


@dataclass(frozen=True)
class ModelVersionInfo:
    """One version of a registered model, as the API and the CLI show it."""

    name: str
    version: int
    flavor: str
    manifest: ModelManifest
    files: dict[str, str]
    """Relative path -> sha256 of every file, `model.yaml` included."""
    tags: dict[str, str]
    aliases: list[str]
    run_id: str | None
    step_run_id: str | None
    created_at: datetime

    @property
    def uri(self) -> str:
        """`models:/name/version`."""
        return ModelRef(self.name, self.version).uri

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"name": self.name, "version": self.version, "uri": self.uri, "flavor": self.flavor,
                "aliases": self.aliases, "tags": self.tags, "run_id": self.run_id, "step_run_id": self.step_run_id,
                "created_at": self.created_at.isoformat(), "files": self.files,
                "model": self.manifest.model_dump(mode="json", exclude_none=True)}


@dataclass(frozen=True)
class ModelInfo:
    """A registered model with its aliases and the number of its newest version."""

    name: str
    description: str
    tags: dict[str, str]
    latest_version: int
    aliases: dict[str, int] = field(default_factory=dict)
    versions: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"name": self.name, "description": self.description, "tags": self.tags,
                "latest_version": self.latest_version, "versions": self.versions, "aliases": self.aliases,
                "created_at": self.created_at.isoformat() if self.created_at else None,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None}


def _aliases(session: Session, model_id: int) -> dict[str, int]:
    rows = session.execute(select(ModelAliasRow.alias, ModelVersionRow.version)
                           .join(ModelVersionRow, ModelVersionRow.id == ModelAliasRow.version_id)
                           .where(ModelAliasRow.model_id == model_id).order_by(ModelAliasRow.alias))
    return {alias: version for alias, version in rows}


def _version_info(session: Session, model: ModelRow, row: ModelVersionRow) -> ModelVersionInfo:
    aliases = [a for a, v in _aliases(session, model.id).items() if v == row.version]
    return ModelVersionInfo(name=model.name, version=row.version, flavor=row.flavor,
                            manifest=ModelManifest.model_validate(row.spec), files=dict(row.files),
                            tags=dict(row.tags), aliases=aliases, run_id=row.run_id, step_run_id=row.step_run_id,
                            created_at=row.created_at)


def _model_row(session: Session, name: str, for_update: bool = False) -> ModelRow:
    query = select(ModelRow).where(ModelRow.name == name)
    if for_update:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None:
        raise NotFound(f"no model named {name!r}; `skyloop models list` shows the registered ones")
    return row


_MAX_VERSION = 2**63 - 1
"""The largest number the DB's version column holds; asking it for a larger one raises OverflowError."""


def _version_row(session: Session, model: ModelRow, version: int) -> ModelVersionRow:
    row = None
    if 1 <= version <= _MAX_VERSION:
        row = session.scalars(select(ModelVersionRow).where(ModelVersionRow.model_id == model.id,
                                                            ModelVersionRow.version == version)).first()
    if row is None:
        raise NotFound(f"model {model.name!r} has no version {version} (its newest is {model.latest_version}); "
                       f"`skyloop models show {model.name}` lists them")
    return row


def _resolve_row(session: Session, ref: ModelRef, for_update: bool = False) -> tuple[ModelRow, ModelVersionRow]:
    model = _model_row(session, ref.name, for_update)
    if ref.version is not None:
        return model, _version_row(session, model, ref.version)
    if ref.alias is not None:
        alias = session.get(ModelAliasRow, (model.id, ref.alias))
        if alias is None:
            known = ", ".join(_aliases(session, model.id)) or "none"
            raise NotFound(f"model {model.name!r} has no alias {ref.alias!r} (its aliases: {known}); "
                           f"set one with `skyloop models alias {model.name} {ref.alias} VERSION`")
        row = session.get(ModelVersionRow, alias.version_id)
        assert row is not None  # the foreign key guarantees it
        return model, row
    if model.latest_version == 0:
        raise NotFound(f"model {model.name!r} has no versions yet")
    return model, _version_row(session, model, model.latest_version)


def create_version(session: Session, manifest: ModelManifest, manifest_digest: str, files: Mapping[str, str],
                   tags: Mapping[str, str] | None = None, description: str | None = None) -> ModelVersionInfo:
    """Register the next version of `manifest.name` (creating the model) and pin every file it references, and
    the artifacts its producing step read (`producer.inputs`: its training data, which `models show` lists and
    garbage collection must then keep).

    The files' artifact rows must already exist in this session (the blobs are written first); an input
    with no artifact row (a manifest written elsewhere) is not pinned.
    """
    name = check_name(manifest.name)
    now = utcnow()
    lock = select(ModelRow).where(ModelRow.name == name).with_for_update()
    model = session.scalars(lock).first()
    if model is None:
        # Two writers of a new model's first version: one inserts the row, both then lock it (FOR UPDATE
        # finds no row to lock before it exists, so both would insert it on PostgreSQL).
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        session.execute(dialect.insert(ModelRow).values(
            name=name, description=description or "", tags={}, latest_version=0, created_at=now, updated_at=now,
        ).on_conflict_do_nothing(index_elements=["name"]))
        model = session.scalars(lock).one()
    if description is not None:
        model.description = description
    # The model row is locked (SQLite: the whole DB is), so two writers never take the same number.
    model.latest_version += 1
    model.updated_at = now
    producer = manifest.producer
    row = ModelVersionRow(model_id=model.id, version=model.latest_version, flavor=manifest.flavor,
                          spec=manifest.model_dump(mode="json", exclude_none=True), manifest=manifest_digest,
                          files=dict(files), tags=_check_tags(tags or {}),
                          run_id=producer.run_id if producer else None,
                          step_run_id=producer.step_run_id if producer else None, created_at=now)
    session.add(row)
    session.flush()
    holder = f"model:{name}/{row.version}"
    inputs = sorted(set(producer.inputs.values()) - set(files.values())) if producer else []
    known: set[str] = set()
    for i in range(0, len(inputs), 500):  # a gathered input may name thousands
        known.update(session.scalars(select(Artifact.digest).where(Artifact.digest.in_(inputs[i:i + 500]))))
    for digest in sorted(set(files.values()) | known):
        pin(session, digest, holder)
    return _version_info(session, model, row)


def resolve(session: Session, ref: ModelRef) -> ModelVersionInfo:
    """The version a reference names: by number, by alias, or the latest."""
    model, row = _resolve_row(session, ref)
    return _version_info(session, model, row)


def get_model(session: Session, name: str) -> ModelInfo:
    """A registered model by name."""
    return _model_info(session, _model_row(session, name))


def _model_info(session: Session, model: ModelRow) -> ModelInfo:
    count = session.scalar(select(func.count()).select_from(ModelVersionRow)
                           .where(ModelVersionRow.model_id == model.id)) or 0
    return ModelInfo(name=model.name, description=model.description, tags=dict(model.tags),
                     latest_version=model.latest_version, aliases=_aliases(session, model.id), versions=count,
                     created_at=model.created_at, updated_at=model.updated_at)


def list_models(session: Session) -> list[ModelInfo]:
    """Every registered model, by name."""
    return [_model_info(session, m) for m in session.scalars(select(ModelRow).order_by(ModelRow.name))]


def list_versions(session: Session, name: str) -> list[ModelVersionInfo]:
    """Every version of a model, oldest first."""
    model = _model_row(session, name)
    rows: Sequence[ModelVersionRow] = session.scalars(
        select(ModelVersionRow).where(ModelVersionRow.model_id == model.id).order_by(ModelVersionRow.version)).all()
    return [_version_info(session, model, r) for r in rows]


def set_alias(session: Session, name: str, alias: str, version: int) -> int | None:
    """Point `alias` at `version` (moving it if it pointed elsewhere); returns the version it left, if any."""
    check_alias(alias)
    if alias == LATEST:
        raise SpecError(f"alias {LATEST!r} always means the newest version and cannot be set; pick another name")
    model = _model_row(session, name, for_update=True)
    target = _version_row(session, model, version)
    row = session.get(ModelAliasRow, (model.id, alias))
    now = utcnow()
    if row is None:
        session.add(ModelAliasRow(model_id=model.id, alias=alias, version_id=target.id, updated_at=now))
        return None
    previous = session.get(ModelVersionRow, row.version_id)
    row.version_id, row.updated_at = target.id, now
    return previous.version if previous is not None else None


def remove_alias(session: Session, name: str, alias: str) -> int:
    """Drop an alias; returns the version it pointed at."""
    model = _model_row(session, name, for_update=True)
    row = session.get(ModelAliasRow, (model.id, alias))
    if row is None:
        raise NotFound(f"model {name!r} has no alias {alias!r}")
    pointed = session.get_one(ModelVersionRow, row.version_id).version
    session.delete(row)
    return pointed


def _check_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    for key in tags:
        if not isinstance(key, str) or not key or len(key) > 250:
            raise SpecError(f"tag key {key!r} must be a non-empty string of at most 250 characters")
    return {k: str(v) for k, v in tags.items()}


def set_tags(session: Session, ref: ModelRef, tags: Mapping[str, Any]) -> dict[str, str]:
    """Set tags on a model (`ref` without version or alias) or on one version; returns all its tags."""
    new = _check_tags(tags)
    if ref.version is None and ref.alias is None:
        model = _model_row(session, ref.name, for_update=True)
        model.tags = {**model.tags, **new}
        model.updated_at = utcnow()
        return dict(model.tags)
    _, row = _resolve_row(session, ref, for_update=True)
    row.tags = {**row.tags, **new}
    return dict(row.tags)


def delete_tag(session: Session, ref: ModelRef, key: str) -> None:
    """Remove one tag from a model or a version."""
    if ref.version is None and ref.alias is None:
        target: ModelRow | ModelVersionRow = _model_row(session, ref.name, for_update=True)
    else:
        target = _resolve_row(session, ref, for_update=True)[1]
    if key not in target.tags:
        raise NotFound(f"{ref.uri} has no tag {key!r}")
    target.tags = {k: v for k, v in target.tags.items() if k != key}
