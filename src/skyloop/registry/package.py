"""A model directory: its files and `model.yaml` (flavor, signature, metrics, file hashes, producer)."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyloop.errors import IntegrityError, ModelLoadError, SpecError

__all__ = [
    "MANIFEST",
    "Datatype",
    "ModelManifest",
    "Producer",
    "Signature",
    "TensorSpec",
    "hash_file",
    "hash_files",
    "read_manifest",
    "verify_directory",
    "write_atomic",
    "write_manifest",
]

MANIFEST = "model.yaml"

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]
"""The Open Inference Protocol (V2) tensor datatypes."""


class TensorSpec(BaseModel):
    """One input or output tensor: name, V2 datatype and shape (-1 for a variable dimension)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    datatype: Datatype
    shape: list[int]


class Signature(BaseModel):
    """What a model takes and returns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    frame: bool | None = None
    """True when the inputs are the columns of one table (inferred from a pandas frame): the server passes
    the model a frame with these column names, even when there is only one column."""


class Producer(BaseModel):
    """What made the model: the run and step run that logged it and the artifacts that step read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = None
    step_run_id: str | None = None
    task: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict)
    """Input name -> artifact digest (several inputs of one name are `name[0]`, `name[1]`, ...)."""


class ModelManifest(BaseModel):
    """The contents of `model.yaml`."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    name: str
    flavor: str
    signature: Signature | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    """Relative path -> sha256 of every file of the directory except `model.yaml` itself."""
    producer: Producer | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    """Versions of Python and of the flavor's libraries when the model was saved."""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def hash_file(path: Path) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> path of every regular file under `root` except `model.yaml`, sorted."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise SpecError(f"model directory {root} holds a symbolic link {path.relative_to(root)}; "
                            "copy the file in instead")
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST and "__pycache__" not in path.parts:
                found[rel] = path
    return found


def hash_files(root: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every regular file under `root` except `model.yaml`, sorted."""
    return {rel: hash_file(path) for rel, path in _model_files(root).items()}


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name, so that readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: ModelManifest) -> bytes:
    """Write `model.yaml` into `root`; returns its bytes."""
    data = yaml.safe_dump(manifest.model_dump(mode="json", exclude_none=True), sort_keys=False).encode()
    write_atomic(root / MANIFEST, data)
    return data


def parse_manifest(data: bytes, where: str) -> ModelManifest:
    """Parse the bytes of a `model.yaml`; errors name the field and the file."""
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{where} is not valid YAML: {exc}") from exc
    try:
        return ModelManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ModelLoadError(f"{where} is invalid: {problems}") from exc


def read_manifest(root: Path) -> ModelManifest:
    """The `model.yaml` of a model directory."""
    path = root / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{root} is not a model directory: it has no {MANIFEST}")
    return parse_manifest(path.read_bytes(), str(path))


def verify_directory(root: Path, manifest: ModelManifest) -> None:
    """Refuse a directory whose files are missing, differ from the hashes in its manifest, or are not listed.

    An unlisted file is refused too: otherwise emptying `files:` in `model.yaml` would let any file load.
    """
    try:
        present = _model_files(root)
    except SpecError as exc:
        raise IntegrityError(f"model {manifest.name!r}: {exc}") from exc
    # `.tmp-` files are another process's `write_atomic` in flight, renamed to a listed name when done.
    unlisted = sorted(rel for rel in present if rel not in manifest.files
                      and not Path(rel).name.startswith(".tmp-"))
    if unlisted:
        raise IntegrityError(f"model {manifest.name!r}: file {unlisted[0]} in {root} is not listed in {MANIFEST}; "
                             "remove it or register the model again")
    for rel, expected in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise ModelLoadError(f"model {manifest.name!r}: file {rel} listed in {MANIFEST} is missing from {root}")
        actual = hash_file(path)
        if actual != expected:
            raise IntegrityError(f"model {manifest.name!r}: file {rel} was altered (sha256 {actual[:12]}, "
                                 f"expected {expected[:12]}); restore it or register the model again")
