"""Cache keys of step attempts and the lookup of earlier results with the same key."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from skyloop.execution.tasks import Element, Gathered, InputValue, Literal_
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.models import Artifact, Lineage, StepRunRow

__all__ = ["cache_key", "find_cached", "input_digest"]


def input_digest(value: InputValue) -> object:
    """A JSON-able identity of an input: artifact digests, or the literal value itself."""
    if isinstance(value, ArtifactRef):
        return value.digest
    if isinstance(value, Gathered):
        return [ref.digest for ref in value.refs]
    if isinstance(value, Element):
        return {"of": input_digest(value.source), "index": value.index}
    if isinstance(value, Literal_):
        return {"value": value.value}
    raise TypeError(value)


def cache_key(code_hash: str, version: str, inputs: dict[str, InputValue]) -> str:
    """sha256 of the step's code, its cache version and the identity of every input."""
    body = {"code": code_hash, "version": version, "inputs": {k: input_digest(v) for k, v in inputs.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=repr).encode()).hexdigest()


def find_cached(session: Session, key: str, output_names: list[str]) -> tuple[str, dict[str, ArtifactRef]] | None:
    """The newest successful attempt with this key whose outputs all still exist, and those outputs."""
    candidates = session.scalars(
        select(StepRunRow.id).where(StepRunRow.cache_key == key, StepRunRow.state == "SUCCEEDED")
        .order_by(StepRunRow.ended_at.desc()).limit(3)
    ).all()
    for step_run_id in candidates:
        rows = session.execute(
            select(Lineage.name, Artifact.digest, Artifact.serializer, Artifact.type_name, Artifact.size)
            .join(Artifact, Artifact.digest == Lineage.artifact)
            .where(Lineage.step_run_id == step_run_id, Lineage.direction == "out", Artifact.deleted_at.is_(None))
        ).all()
        outputs = {name: ArtifactRef(digest, ser, tn, size) for name, digest, ser, tn, size in rows}
        if set(outputs) >= set(output_names):
            return step_run_id, outputs
    return None
