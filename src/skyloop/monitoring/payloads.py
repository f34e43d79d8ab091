"""Payload logs: the inferences a gateway answered, in parquet segments that the metadata DB indexes.

The gateway calls `PayloadLog.add` on its hot path: a sampling draw and an append, nothing more. The
controller calls `flush` about once a second; it turns the buffered requests into rows (one per row of
the request: features, prediction, predictor, model version, latency, time) in a worker thread, masks the
sensitive fields, writes `<home>/payloads/<deployment>/<segment>.parquet` (temp file, then rename) and
only then adds the segment's row to `payload_segments`: a crash leaves at worst an unindexed file.

`read_payloads` reads the segments of a time range back as one frame; `labelled` joins them to the
feedback stored by the replicas (`inference_feedback`) by inference id, which is what retraining and
live quality use.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from skyloop.store.models import FeedbackRow, PayloadSegmentRow
from skyloop.store.workspace import Workspace

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LogSpec", "PayloadLog", "feature_rows", "labelled", "read_payloads"]

META = ("id", "row", "at", "predictor", "version", "latency", "prediction")
"""The columns of a payload frame besides the features."""


class LogSpec(BaseModel):
    """What a deployment logs."""

    model_config = ConfigDict(extra="forbid")

    sample: float = Field(default=1.0, ge=0, le=1)
    """The share of inferences logged."""
    mask: dict[str, Literal["hash", "drop"]] = Field(default_factory=dict)
    """Sensitive input fields: `hash` keeps a salted sha256 prefix (joins still work), `drop` removes them."""
    flush_rows: int = Field(default=5000, ge=1)
    """Rows per segment at most."""
    flush_seconds: float = Field(default=1.0, gt=0)
    """How often buffered inferences are written."""


def feature_rows(inputs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """V2 request inputs as columns: a 1-D tensor is a column, an [n, k] tensor gives `name_0` ... `name_{k-1}`."""
    columns: dict[str, list[Any]] = {}
    for tensor in inputs:
        name, shape, data = tensor.get("name"), tensor.get("shape") or [], tensor.get("data")
        if not isinstance(name, str) or not isinstance(data, list):
            continue
        flat = _flatten(data)
        if len(shape) <= 1:
            columns[name] = flat
        else:
            n = int(shape[0]) if shape[0] else 0
            k = len(flat) // n if n else 0
            for j in range(k):
                columns[f"{name}_{j}"] = flat[j::k]
    if len({len(v) for v in columns.values()}) > 1:
        return {}  # tensors of different row counts: not one request's rows; the caller drops it
    return columns


def _flatten(data: list[Any]) -> list[Any]:
    if data and isinstance(data[0], list):
        return [v for part in data for v in _flatten(part)]
    return data


def _predictions(outputs: list[dict[str, Any]] | None, rows: int) -> list[Any]:
    if not outputs or not isinstance(outputs[0], dict):
        return [None] * rows
    flat = _flatten(outputs[0].get("data") or [])
    if len(flat) == rows:
        return flat
    k = len(flat) // rows if rows else 0
    return [flat[i * k:(i + 1) * k] for i in range(rows)] if k else [None] * rows


class PayloadLog:
    """Buffers a deployment's answered inferences and writes them as indexed segments."""

    def __init__(self, deployment: str, workspace: Workspace, spec: LogSpec, seed: int | None = None) -> None:
        self.deployment = deployment
        self.workspace = workspace
        self.spec = spec
        self.folder = workspace.settings.home / "payloads" / deployment
        self._rng = random.Random(seed)
        self._buffer: list[tuple[str, float, str, str, float, list[dict[str, Any]], list[dict[str, Any]] | None]] = []
        self._lock = threading.Lock()
        self._salt = hashlib.sha256(deployment.encode()).hexdigest()[:16]
        self.flushed_at = time.monotonic()
        self.logged = 0
        self.dropped = 0

    def add(self, inference_id: str, predictor: str, version: str, latency: float, inputs: Any,
            outputs: Any) -> None:
        """Buffer one answered inference (if the sampling draw keeps it). Hot path: no I/O here."""
        if self.spec.sample < 1.0 and self._rng.random() >= self.spec.sample:
            return
        if not isinstance(inputs, list):
            self.dropped += 1
            return
        self._buffer.append((inference_id, time.time(), predictor, version, latency, inputs, outputs))

    def due(self) -> bool:
        """Whether enough time or rows have gone by to write a segment."""
        return bool(self._buffer) and (len(self._buffer) >= self.spec.flush_rows
                                       or time.monotonic() - self.flushed_at >= self.spec.flush_seconds)

    def take(self) -> list[Any]:
        """The buffered inferences, leaving the buffer empty (call on the gateway's loop)."""
        batch, self._buffer = self._buffer, []
        self.flushed_at = time.monotonic()
        return batch

    def write(self, batch: list[Any]) -> int:
        """Write `batch` (from `take`) as one segment and index it; returns the rows written (worker thread)."""
        import pandas as pd

        frames = []
        for inference_id, at, predictor, version, latency, inputs, outputs in batch:
            columns = self._mask(feature_rows(inputs))
            rows = len(next(iter(columns.values()))) if columns else 0
            if not rows:
                self.dropped += 1
                continue
            meta: dict[str, Any] = {"id": [inference_id] * rows, "row": list(range(rows)), "at": [at] * rows,
                                    "predictor": [predictor] * rows, "version": [version] * rows,
                                    "latency": [latency] * rows, "prediction": _predictions(outputs, rows)}
            frames.append({**meta, **columns})
        if not frames:
            return 0
        frame = pd.concat([pd.DataFrame(f) for f in frames], ignore_index=True)
        if any(isinstance(v, list) for v in frame["prediction"]):  # one type per column: vectors as text
            frame["prediction"] = frame["prediction"].map(lambda v: v if v is None else str(v))
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = self.folder / f".{name}.tmp"
            frame.to_parquet(tmp, index=False)
            path = self.folder / name
            tmp.replace(path)
            first, last = float(frame["at"].min()), float(frame["at"].max())
            with self.workspace.db.session() as session:
                session.add(PayloadSegmentRow(deployment=self.deployment, path=str(path), rows=len(frame),
                                              versions=sorted(frame["version"].unique().tolist()),
                                              first_at=datetime.fromtimestamp(first, UTC),
                                              last_at=datetime.fromtimestamp(last, UTC)))
        self.logged += len(frame)
        return len(frame)

    def _masked(self, column: str) -> str | None:
        """How `column` is masked: by its field's name, or as element `_j` of a masked 2-D tensor."""
        how = self.spec.mask.get(column)
        if how is None:
            field, _, index = column.rpartition("_")
            how = self.spec.mask.get(field) if index.isdigit() else None
        return how

    def _mask(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # Per request, on the values as they arrived: a hash never depends on what else is in the segment.
        if not self.spec.mask:
            return columns
        masked: dict[str, list[Any]] = {}
        for column, values in columns.items():
            how = self._masked(column)
            if how == "drop":
                continue
            if how == "hash":
                values = [hashlib.sha256(f"{self._salt}:{v!r}".encode()).hexdigest()[:16] for v in values]
            masked[column] = values
        return masked


def read_payloads(workspace: Workspace, deployment: str, since: float | None = None,
                  version: str | None = None, last: int | None = None) -> pd.DataFrame:
    """Logged inferences of `deployment` (at or after unix time `since`; of one model `version`; the `last` N)."""
    import pandas as pd

    query = select(PayloadSegmentRow).where(PayloadSegmentRow.deployment == deployment)
    if since is not None:
        query = query.where(PayloadSegmentRow.last_at >= datetime.fromtimestamp(since, UTC))
    with workspace.db.read() as session:
        segments = [(r.path, r.versions) for r in session.scalars(query.order_by(PayloadSegmentRow.id))]
    frames = []
    for path, versions in segments:
        if version is not None and version not in versions:
            continue
        if Path(path).exists():
            frames.append(pd.read_parquet(path))
    if not frames:
        return pd.DataFrame(columns=list(META))
    frame = pd.concat(frames, ignore_index=True)
    if since is not None:
        frame = frame[frame["at"] >= since]
    if version is not None:
        frame = frame[frame["version"] == version]
    if last is not None:
        frame = frame.tail(last)
    return frame.reset_index(drop=True)


def labelled(workspace: Workspace, deployment: str, since: float | None = None, version: str | None = None,
             last: int | None = None) -> pd.DataFrame:
    """Logged inferences that received feedback, with `truth` and `reward` columns (joined by inference id)."""
    import pandas as pd

    payloads = read_payloads(workspace, deployment, since=since, version=version)
    query = select(FeedbackRow.inference_id, FeedbackRow.truth, FeedbackRow.reward).where(
        FeedbackRow.model == deployment).order_by(FeedbackRow.id)
    if since is not None:
        query = query.where(FeedbackRow.created_at >= datetime.fromtimestamp(since, UTC))
    with workspace.db.read() as session:
        feedback = pd.DataFrame(session.execute(query).all(), columns=["id", "truth", "reward"])
    if payloads.empty or feedback.empty:
        return payloads.iloc[0:0].assign(truth=[], reward=[])
    feedback = feedback.drop_duplicates("id", keep="last")
    joined = payloads.merge(feedback, on="id", how="inner")
    # A batched request's truth is a list: row i of the request gets element i.
    joined["truth"] = [t[r] if isinstance(t, list) and r < len(t) else t
                       for t, r in zip(joined["truth"], joined["row"], strict=True)]
    joined = joined.sort_values("at", kind="stable")
    if last is not None:
        joined = joined.tail(last)
    return joined.reset_index(drop=True)
