"""ORM models of the metadata DB (separate from the API schemas in `spec/`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Artifact",
    "ArtifactPin",
    "Base",
    "DeploymentCommandRow",
    "DeploymentEventRow",
    "DeploymentRow",
    "DriftReportRow",
    "Event",
    "FeedbackRow",
    "Lineage",
    "ModelAliasRow",
    "ModelRow",
    "ModelVersionRow",
    "PayloadSegmentRow",
    "PoolSlotRow",
    "RunRow",
    "StepRunRow",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class CleanText(TypeDecorator[str]):
    """Text that user code writes (an error, a traceback, a message): NUL, which PostgreSQL refuses in text, is
    stored as U+FFFD. (Refused, one step's error failed the write of every run its agent held, and the agent.)"""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class RunRow(Base):
    """One execution of a pipeline."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)
    backend: Mapped[str | None] = mapped_column(String(20))
    """The backend it runs on; for a queued run, the one it asked for (None: any agent's)."""
    created_at: Mapped[datetime] = mapped_column(index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(CleanText)
    owner: Mapped[str | None] = mapped_column(String(100))
    """Which orchestrator process holds the run (host:pid:nonce)."""
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    priority: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    """Fair-share weight against other runs of the same priority."""


class StepRunRow(Base):
    """One attempt of one task (or of one element of a mapped task)."""

    __tablename__ = "step_runs"
    __table_args__ = (
        UniqueConstraint("run_id", "task", "map_index", "attempt", name="uq_step_attempt"),
        Index("ix_step_runs_cache_key", "cache_key", "state"),
        Index("ix_step_runs_history", "step_ref", "code_hash", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(200))
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    """Element of a mapped task, or -1 for an unmapped one (and for the parent of a fan-out)."""
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(20), index=True)
    step_ref: Mapped[str] = mapped_column(String(500))
    code_hash: Mapped[str | None] = mapped_column(String(64))
    cache_key: Mapped[str | None] = mapped_column(String(64))
    resources: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(CleanText)
    traceback: Mapped[str | None] = mapped_column(CleanText)
    log_path: Mapped[str | None] = mapped_column(String(1000))
    worker: Mapped[str | None] = mapped_column(String(100))
    max_rss: Mapped[int | None] = mapped_column(BigInteger)
    cached_from: Mapped[str | None] = mapped_column(String(32))
    """The step run whose outputs a CACHED attempt reused."""
    estimate_seconds: Mapped[float | None] = mapped_column(Float)
    """How long the scheduler expected this attempt to take (compare with ended_at - started_at)."""
    estimate_source: Mapped[str | None] = mapped_column(String(20))
    """Where the estimate came from: default, history, history-scaled, siblings (units of the same map)."""
    input_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Total size of the artifacts the attempt read (scales duration estimates)."""


class PoolSlotRow(Base):
    """One slot of a concurrency pool, held by an attempt of a run while it runs (see `store.pools`).

    A pool of limit n has slots 0..n-1: the primary key lets no two processes hold the same slot, so no
    more than n attempts of the pool run at once, whichever processes run them."""

    __tablename__ = "pool_slots"

    pool: Mapped[str] = mapped_column(String(200), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    """The orchestrator process holding it (as `RunRow.owner`): the slot lives while that process holds the run."""
    run_id: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    """The attempt holding it, by its number in the owner's queue."""
    taken_at: Mapped[datetime] = mapped_column()


class Artifact(Base):
    """A stored value, named by the sha256 of its bytes."""

    __tablename__ = "artifacts"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    serializer: Mapped[str] = mapped_column(String(20))
    type_name: Mapped[str] = mapped_column(String(300))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(index=True)
    last_used_at: Mapped[datetime] = mapped_column(index=True)
    deleted_at: Mapped[datetime | None] = mapped_column()
    """Set when garbage collection removed the blob; lineage rows stay."""
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The bytes themselves for small artifacts (kept in the DB instead of a file of their own)."""


class Lineage(Base):
    """An edge between a step run and an artifact it read (`in`) or wrote (`out`)."""

    __tablename__ = "lineage"
    __table_args__ = (Index("ix_lineage_artifact", "artifact", "direction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    step_run_id: Mapped[str] = mapped_column(ForeignKey("step_runs.id", ondelete="CASCADE"), index=True)
    artifact: Mapped[str] = mapped_column(ForeignKey("artifacts.digest"))
    direction: Mapped[str] = mapped_column(String(3))
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer, default=-1)
    """Index within a gathered (list) input, else -1."""


class ArtifactPin(Base):
    """Something outside runs that keeps an artifact alive (e.g. a registered model version)."""

    __tablename__ = "artifact_pins"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact: Mapped[str] = mapped_column(ForeignKey("artifacts.digest"), index=True)
    holder: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column()


class Event(Base):
    """A state change worth showing: run and step transitions, retries, adoption after a crash."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step_run_id: Mapped[str | None] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column()
    kind: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(CleanText, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ModelRow(Base):
    """A registered model: a name under which immutable versions are numbered 1, 2, ..."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(CleanText, default="")
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    """The highest version number handed out (versions are never renumbered)."""
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()


class ModelVersionRow(Base):
    """One immutable version of a model: its `model.yaml` and the digests of its files."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    flavor: Mapped[str] = mapped_column(String(50))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The parsed `model.yaml`."""
    manifest: Mapped[str] = mapped_column(String(64))
    """sha256 of the stored `model.yaml` bytes."""
    files: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Relative path -> sha256 of every file of the model directory, `model.yaml` included."""
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_id: Mapped[str | None] = mapped_column(String(32), index=True)
    """The run that logged it (no foreign key: a version outlives a purged run)."""
    step_run_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column()


class ModelAliasRow(Base):
    """A movable name (`champion`, `challenger`, ...) for one version of a model."""

    __tablename__ = "model_aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column()


class FeedbackRow(Base):
    """The label (`truth`) and/or `reward` of one answered inference, joined to it later by `inference_id`."""

    __tablename__ = "inference_feedback"
    # One row per answer: each takes one truth and one reward (`store.feedback.record_feedback`).
    __table_args__ = (Index("ix_inference_feedback_model_inference_id", "model", "inference_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    """The served model (or graph) name the feedback was posted to."""
    version: Mapped[str | None] = mapped_column(String(100))
    inference_id: Mapped[str] = mapped_column(String(200), index=True)
    truth: Mapped[Any | None] = mapped_column(JSON)
    reward: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(index=True)
    """When its latest feedback arrived (a reward after the truth, or the reverse, moves it)."""


class DeploymentRow(Base):
    """A deployment: its desired spec (what `deploy apply` wrote) and its observed state (what the controller saw)."""

    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_version: Mapped[int] = mapped_column(Integer)
    desired: Mapped[str] = mapped_column(String(20))
    """`running`, or `deleted` (the controller stops it and drops the row)."""
    status: Mapped[str] = mapped_column(String(30))
    """Pending, Progressing, Paused, Healthy, Degraded, Stopped."""
    reason: Mapped[str] = mapped_column(CleanText, default="")
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The controller's view: gateway address, predictors with weights, versions and replicas, the rollout."""
    controller: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()


class DeploymentEventRow(Base):
    """One transition of a deployment, with the traffic, versions and metric values that it was made on."""

    __tablename__ = "deployment_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(200), index=True)
    spec_version: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column()
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(30))
    step: Mapped[int | None] = mapped_column(Integer)
    weights: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(CleanText, default="")


class DeploymentCommandRow(Base):
    """`promote` or `rollback` asked for by a user, until the controller acts on it."""

    __tablename__ = "deployment_commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(200), index=True)
    command: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column()
    handled_at: Mapped[datetime | None] = mapped_column()


class PayloadSegmentRow(Base):
    """A file of logged inferences (parquet), indexed so that monitoring reads only the segments it needs."""

    __tablename__ = "payload_segments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(200), index=True)
    path: Mapped[str] = mapped_column(Text)
    rows: Mapped[int] = mapped_column(Integer)
    versions: Mapped[list[str]] = mapped_column(JSON, default=list)
    first_at: Mapped[datetime] = mapped_column()
    last_at: Mapped[datetime] = mapped_column(index=True)


class DriftReportRow(Base):
    """One drift check of a deployed model version: recent inputs against its training reference."""

    __tablename__ = "drift_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column()
    dataset_drift: Mapped[bool] = mapped_column()
    share: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
