"""Payload logs: the inferences a gateway answered, in parquet segments that the metadata DB indexes.

The gateway calls `PayloadLog.add` on its hot path with the request and response bodies it already has:
a sampling draw and an append, nothing more. About once a second the controller writes the buffer in a
worker thread as `<home>/payloads/<deployment>/<segment>.parquet`, one row per request (id, time,
predictor, model version, latency, and the V2 request and response as JSON), temp file then rename, and
only then adds the segment's row to `payload_segments`: a crash leaves at worst an unindexed file.
Fields named in `mask` are hashed or dropped before anything is written.

Nothing is parsed on the way in: `read_payloads` expands the requests it reads into one row per row of
each request (the features as columns, the prediction, and the metadata), so the cost of logging is paid
by readers, for the rows they read (a drift window), not by the gateway for all traffic. `labelled`
joins them to the feedback stored by the replicas (`inference_feedback`) by inference id, which is what
retraining and live quality use.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from skyloop.store.models import FeedbackRow, PayloadSegmentRow
from skyloop.store.workspace import Workspace

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LogSpec", "PayloadLog", "UnwrittenPayloads", "count_feedback", "feature_column", "feature_rows",
           "input_name", "labelled", "predictions", "read_payloads"]

META = ("id", "row", "at", "predictor", "version", "latency", "prediction")
"""The columns of a payload frame besides the features."""
_TAKEN = (*META, "truth", "reward")
"""Column names an input cannot have as itself: the metadata, and the feedback that `labelled` joins."""
_SHIFTED = "input."
_UNREADABLE: set[str] = set()
"""Segment files found unreadable (each is logged once)."""

log = logging.getLogger("skyloop.monitoring")


def feature_column(name: str) -> str:
    """The column of model input `name` in a payload frame: its name, or `input.NAME` for an input named like a
    metadata or feedback column (an input `id` must not overwrite the inference ids that feedback is joined on,
    nor an input `truth` the labels joined to it)."""
    return _SHIFTED + name if name in _TAKEN else name


def input_name(column: str) -> str:
    """The model input behind a payload frame's feature column (the inverse of `feature_column`)."""
    name = column.removeprefix(_SHIFTED)
    return name if name in _TAKEN else column


class LogSpec(BaseModel):
    """What a deployment logs."""

    # Finite numbers only, as in `deploy.spec`: NaN passes every bound and neither survives the stored JSON.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sample: float = Field(default=1.0, ge=0, le=1)
    """The share of inferences logged."""
    mask: dict[str, Literal["hash", "drop"]] = Field(default_factory=dict)
    """Sensitive input fields: `hash` keeps a salted sha256 prefix (joins still work), `drop` removes them."""
    flush_rows: int = Field(default=5000, ge=1)
    """Rows per segment at most."""
    flush_seconds: float = Field(default=1.0, gt=0)
    """How often buffered inferences are written."""


def feature_rows(inputs: Any) -> dict[str, list[Any]]:
    """V2 request inputs as columns: a 1-D tensor is a column, an [n, k] tensor gives `name_0` ... `name_{k-1}`.

    Whatever is not a list of tensors, and a tensor without a name, data or a usable shape, gives nothing: a
    logged request that no reader can parse must not make every later read of its window fail."""
    columns: dict[str, list[Any]] = {}
    for tensor in inputs if isinstance(inputs, list) else []:
        if not isinstance(tensor, dict):
            continue
        name, shape, data = tensor.get("name"), tensor.get("shape") or [], tensor.get("data")
        if not isinstance(name, str) or not isinstance(data, list) or not isinstance(shape, list):
            continue
        flat = _flatten(data)
        if len(shape) <= 1:
            columns[name] = flat
        else:
            try:
                n = max(int(shape[0]), 0)
            except (TypeError, ValueError, OverflowError):  # `"b"`, `null`, `Infinity`: no row count
                n = 0
            k = len(flat) // n if n else 0
            for j in range(k):
                columns[f"{name}_{j}"] = flat[j::k]
    if len({len(v) for v in columns.values()}) > 1:
        return {}  # tensors of different row counts: not one request's rows; the caller drops it
    return columns


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if any(isinstance(part, list) for part in data):  # nested, or ragged: `[[1], 2]` is 1, 2
        return [v for part in data for v in _flatten(part)]
    return data


def predictions(outputs: list[dict[str, Any]] | None, rows: int) -> list[Any]:
    """The logged prediction of each of `rows` rows: the first output tensor's value, or its values, per row."""
    if not outputs or not isinstance(outputs[0], dict):
        return [None] * rows
    flat = _flatten(outputs[0].get("data") or [])
    if len(flat) == rows:
        return flat
    k = len(flat) // rows if rows else 0
    return [flat[i * k:(i + 1) * k] for i in range(rows)] if k else [None] * rows


Body = bytes | list[dict[str, Any]] | None
"""A V2 request or response: its raw JSON bytes, or its list of tensors."""


class UnwrittenPayloads(Exception):
    """A write failed: `rest` holds the inferences it did not write (`PayloadLog.give_back` them)."""

    def __init__(self, rest: list[Any], cause: BaseException) -> None:
        super().__init__(f"{len(rest)} logged inferences not written: {type(cause).__name__}: {cause}")
        self.rest = rest


class PayloadLog:
    """Buffers a deployment's answered inferences and writes them as indexed segments."""

    def __init__(self, deployment: str, workspace: Workspace, spec: LogSpec, seed: int | None = None) -> None:
        self.deployment = deployment
        self.workspace = workspace
        self.spec = spec
        self.folder = workspace.settings.home / "payloads" / deployment
        self._rng = random.Random(seed)
        self._buffer: list[tuple[str, float, str, str, float, Body, Body]] = []
        self._lock = threading.Lock()
        self._salt = hashlib.sha256(deployment.encode()).hexdigest()[:16]
        self.flushed_at = time.monotonic()
        self.logged = 0
        """Requests written."""
        self.dropped = 0
        """Requests refused: inputs that are neither JSON bytes nor a list of tensors."""

    def add(self, inference_id: str, predictor: str, version: str, latency: float, inputs: Body,
            outputs: Body) -> None:
        """Buffer one answered inference (if the sampling draw keeps it). Hot path: no parsing, no I/O.

        `inputs` is the request (raw V2 JSON bytes, or its `inputs` list), `outputs` the response (bytes, or
        its `outputs` list)."""
        if self.spec.sample < 1.0 and self._rng.random() >= self.spec.sample:
            return
        if not isinstance(inputs, bytes | list):
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
        """Write `batch` (from `take`) as segments of at most `flush_rows` requests and index them; returns the
        requests written (worker thread). Raises `UnwrittenPayloads` with what is left when a segment fails (the
        DB cannot take its row, the disk is full): a segment is indexed whole or not at all."""
        size = self.spec.flush_rows
        written = 0
        for i in range(0, len(batch), size):
            try:
                written += self._segment(batch[i:i + size])
            except Exception as exc:
                raise UnwrittenPayloads(batch[i:], exc) from exc
        return written

    def give_back(self, batch: list[Any]) -> None:
        """Put back what a failed write left, ahead of what came since (call on the gateway's loop): the next
        write tries again. At most ten segments' worth is held; the oldest beyond are dropped and counted."""
        held = batch + self._buffer
        over = len(held) - 10 * self.spec.flush_rows
        if over > 0:
            self.dropped += over
            held = held[over:]
        self._buffer = held

    def _segment(self, batch: list[Any]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids, ats, predictors, versions, latencies, requests, responses = (list(c) for c in zip(*batch, strict=True))
        requests = [self._request(r) for r in requests]
        responses = [r if isinstance(r, bytes) else orjson.dumps({"outputs": r or []}) for r in responses]
        table = pa.table({"id": pa.array(ids, pa.string()), "at": pa.array(ats, pa.float64()),
                          "predictor": pa.array(predictors, pa.string()), "version": pa.array(versions, pa.string()),
                          "latency": pa.array(latencies, pa.float64()), "request": pa.array(requests, pa.binary()),
                          "response": pa.array(responses, pa.binary())})
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = self.folder / f".{name}.tmp"
            pq.write_table(table, tmp)
            path = self.folder / name
            try:
                tmp.replace(path)
                with self.workspace.db.session() as session:
                    session.add(PayloadSegmentRow(deployment=self.deployment, path=str(path), rows=len(batch),
                                                  versions=sorted(set(versions)),
                                                  first_at=datetime.fromtimestamp(min(ats), UTC),
                                                  last_at=datetime.fromtimestamp(max(ats), UTC)))
            except BaseException:  # not indexed: no reader sees it, and its rows are written again
                tmp.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                raise
        self.logged += len(batch)
        return len(batch)

    def _request(self, inputs: bytes | list[dict[str, Any]]) -> bytes:
        if not self.spec.mask:
            return inputs if isinstance(inputs, bytes) else orjson.dumps({"inputs": inputs})
        try:
            tensors = orjson.loads(inputs).get("inputs") if isinstance(inputs, bytes) else inputs
        except (orjson.JSONDecodeError, AttributeError):
            return b"{}"
        return orjson.dumps({"inputs": [m for t in tensors or [] if (m := self._mask(t)) is not None]})

    def _mask(self, tensor: Any) -> dict[str, Any] | None:
        # Per value as it arrived: a hash never depends on what else is in the segment.
        how = self.spec.mask.get(str(tensor.get("name"))) if isinstance(tensor, dict) else None
        if how is None:
            return tensor if isinstance(tensor, dict) else None
        if how == "drop":
            return None
        return {**tensor, "datatype": "BYTES", "data": self.hashed(_flatten(tensor.get("data") or []))}

    def hashed(self, values: list[Any]) -> list[str]:
        """`values` (as JSON gives them: str, int, float, bool, None) as a `hash` mask logs them: salted sha256
        prefixes, the same for the same value and deployment (drift compares a reference hashed so)."""
        return [hashlib.sha256(f"{self._salt}:{_canonical(v)!r}".encode()).hexdigest()[:16] for v in values]


def _canonical(value: Any) -> Any:
    """One spelling per value for `hashed`: a client's `75001` and a reference's `75001.0` (a column of codes
    with a missing one is float) are one value, as are a numpy scalar and its Python number."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _expand(frame: pd.DataFrame) -> pd.DataFrame:
    """Segment rows (one per request) as one row per request row: metadata, prediction, feature columns."""
    import pandas as pd

    meta: dict[str, list[Any]] = {name: [] for name in META}
    features: dict[str, list[Any]] = {}
    total = 0
    for inference_id, at, predictor, version, latency, request, response in zip(
            frame["id"], frame["at"], frame["predictor"], frame["version"], frame["latency"], frame["request"],
            frame["response"], strict=True):
        try:
            doc, answer = orjson.loads(request), orjson.loads(response)
        except orjson.JSONDecodeError:
            continue
        columns = feature_rows(doc.get("inputs") or []) if isinstance(doc, dict) else {}
        rows = len(next(iter(columns.values()))) if columns else 0
        if not rows:
            continue
        for name, values in columns.items():
            features.setdefault(feature_column(name), [None] * total).extend(values)
        shifted = {feature_column(name) for name in columns}
        for name, values in features.items():
            if name not in shifted:
                values.extend([None] * rows)
        meta["id"].extend([inference_id] * rows)
        meta["row"].extend(range(rows))
        meta["at"].extend([at] * rows)
        meta["predictor"].extend([predictor] * rows)
        meta["version"].extend([version] * rows)
        meta["latency"].extend([latency] * rows)
        meta["prediction"].extend(predictions(answer.get("outputs") if isinstance(answer, dict) else None, rows))
        total += rows
    if any(isinstance(v, list) for v in meta["prediction"]):  # one type per column: vectors as text
        meta["prediction"] = [v if v is None else str(v) for v in meta["prediction"]]
    return pd.DataFrame({**meta, **features})


def _read_segment(path: str) -> pd.DataFrame | None:
    """A segment file's rows; None for one that is gone or unreadable (a power cut can leave a renamed file
    empty or cut short, since nothing is synced to disk): every read of its window would fail otherwise."""
    import pandas as pd
    import pyarrow as pa

    if not Path(path).exists():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        if path not in _UNREADABLE:  # said once per file and process, not at every drift check
            _UNREADABLE.add(path)
            log.warning("skipping the unreadable payload segment %s: %s", path, exc)
        return None


def read_payloads(workspace: Workspace, deployment: str, since: float | None = None,
                  version: str | None = None, last: int | None = None, ids: set[str] | None = None) -> pd.DataFrame:
    """Logged inferences of `deployment` (at or after unix time `since`; of one model `version`; the `last` N;
    with inference ids among `ids`).

    Segments are read newest first: with `last`, only until N rows are in hand; with `ids`, until each was found."""
    import pandas as pd

    query = select(PayloadSegmentRow).where(PayloadSegmentRow.deployment == deployment)
    if since is not None:
        query = query.where(PayloadSegmentRow.last_at >= datetime.fromtimestamp(since, UTC))
    with workspace.db.read() as session:
        segments = [(r.path, r.versions) for r in session.scalars(query.order_by(PayloadSegmentRow.id.desc()))]
    frames = []
    have = 0
    missing = set(ids or ())
    for path, versions in segments:
        if version is not None and version not in versions:
            continue
        stored = _read_segment(path)
        if stored is not None and ids is not None:
            stored = stored[stored["id"].isin(ids)]
            missing -= set(stored["id"])
        if stored is not None:
            frame = _expand(stored)
            if since is not None:
                frame = frame[frame["at"] >= since]
            if version is not None:
                frame = frame[frame["version"] == version]
            frames.append(frame)
            have += len(frame)
        if (last is not None and have >= last) or (ids is not None and not missing):
            break
    if not frames:
        return pd.DataFrame(columns=list(META))
    frame = pd.concat(frames[::-1], ignore_index=True)
    if last is not None:
        frame = frame.tail(last)
    return frame.reset_index(drop=True)


def count_feedback(workspace: Workspace, deployment: str, since: float) -> int:
    """Feedback rows for `deployment` created at or after unix time `since` (cheap: one COUNT)."""
    from sqlalchemy import func

    with workspace.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(FeedbackRow).where(
            FeedbackRow.model == deployment, FeedbackRow.created_at >= datetime.fromtimestamp(since, UTC))) or 0)


def labelled(workspace: Workspace, deployment: str, since: float | None = None, version: str | None = None,
             last: int | None = None) -> pd.DataFrame:
    """Logged inferences that received feedback, with `truth` and `reward` columns (joined by inference id)."""
    import pandas as pd

    query = select(FeedbackRow.inference_id, FeedbackRow.truth, FeedbackRow.reward).where(
        FeedbackRow.model == deployment)
    if since is not None:
        query = query.where(FeedbackRow.created_at >= datetime.fromtimestamp(since, UTC))
    if last is not None:
        # With `last`, from the feedback side: the newest labels, and then the logs of the answers they are about
        # (a label may come thousands of answers after its answer; some are of other versions, hence the margin).
        query = query.order_by(FeedbackRow.id.desc()).limit(4 * last + 100)
    with workspace.db.read() as session:
        feedback = pd.DataFrame(session.execute(query).all(), columns=["id", "truth", "reward"])
    payloads = read_payloads(workspace, deployment, since=since, version=version,
                             ids=None if last is None else set(feedback["id"]))
    if payloads.empty or feedback.empty:
        return payloads.iloc[0:0].assign(truth=[], reward=[])
    # An id a client sent again (a retry, or ids counted from 1 by each client) names its last answer, the one
    # its feedback was taken for: the older rows under it would get that answer's labels, wrongly and twice.
    request = (payloads["row"] == 0).cumsum()  # which logged request each row is of (they come in log order)
    payloads = payloads[request == request.groupby(payloads["id"]).transform("max")]
    joined = payloads.merge(feedback, on="id", how="inner")
    # A batched request's truth is a list: row i of the request gets element i.
    joined["truth"] = [t[r] if isinstance(t, list) and r < len(t) else t
                       for t, r in zip(joined["truth"], joined["row"], strict=True)]
    joined = joined.sort_values("at", kind="stable")
    if last is not None:
        joined = joined.tail(last)
    return joined.reset_index(drop=True)
