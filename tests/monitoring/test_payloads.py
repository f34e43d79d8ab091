"""Payload logs: V2 inputs as columns, sampling, parquet segments indexed in the DB, reading back, labels."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from tests_support import before_first_update

from skyloop.config import Settings
from skyloop.monitoring.payloads import (
    META,
    LogSpec,
    PayloadLog,
    UnwrittenPayloads,
    feature_column,
    feature_rows,
    input_name,
    labelled,
    read_payloads,
)
from skyloop.store.feedback import record_feedback
from skyloop.store.models import PayloadSegmentRow
from skyloop.store.workspace import Workspace

DEPLOYMENT = "fraud"


@pytest.fixture
def workspace(settings: Settings) -> Iterator[Workspace]:
    ws = Workspace.open(settings)
    yield ws
    ws.close()


def _log(workspace: Workspace, deployment: str = DEPLOYMENT, seed: int | None = None, **spec: Any) -> PayloadLog:
    return PayloadLog(deployment, workspace, LogSpec.model_validate(spec), seed=seed)


def _x(*values: Any, name: str = "x") -> list[dict[str, Any]]:
    return [{"name": name, "shape": [len(values)], "datatype": "FP64", "data": list(values)}]


def _add(log: PayloadLog, inference_id: str, *values: Any, version: str = "v1",
         outputs: list[dict[str, Any]] | None = None) -> None:
    log.add(inference_id, "main", version, 0.002, _x(*values), outputs)


def _flush(log: PayloadLog) -> int:
    return log.write(log.take())


def _segments(workspace: Workspace, deployment: str = DEPLOYMENT) -> list[PayloadSegmentRow]:
    with workspace.db.read() as session:
        rows = list(session.scalars(select(PayloadSegmentRow).where(PayloadSegmentRow.deployment == deployment)
                                    .order_by(PayloadSegmentRow.id)))
        session.expunge_all()
    return rows


def _unix(at: datetime) -> float:
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _feedback(workspace: Workspace, inference_id: str, truth: Any = None, reward: float | None = None,
              model: str = DEPLOYMENT) -> None:
    with workspace.db.session() as session:
        record_feedback(session, model=model, version="v1", inference_id=inference_id, truth=truth, reward=reward)


# -- feature_rows ------------------------------------------------------------------------------------------------

def test_feature_rows_one_column_per_1d_tensor() -> None:
    columns = feature_rows([{"name": "age", "shape": [3], "datatype": "INT64", "data": [30, 41, 52]},
                            {"name": "city", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}])
    assert columns == {"age": [30, 41, 52], "city": ["a", "b", "c"]}


def test_feature_rows_splits_a_2d_tensor_into_numbered_columns() -> None:
    columns = feature_rows([{"name": "f", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}])
    assert columns == {"f_0": [1, 4], "f_1": [2, 5], "f_2": [3, 6]}


def test_feature_rows_flattens_nested_data() -> None:
    assert feature_rows([{"name": "f", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]) == {"f_0": [1, 3], "f_1": [2, 4]}
    assert feature_rows([{"name": "x", "shape": [3], "data": [[1], [2], [3]]}]) == {"x": [1, 2, 3]}


def test_feature_rows_an_n_by_1_tensor_is_still_numbered() -> None:
    assert feature_rows([{"name": "x", "shape": [3, 1], "data": [[1], [2], [3]]}]) == {"x_0": [1, 2, 3]}


def test_feature_rows_without_shape_is_one_column() -> None:
    assert feature_rows([{"name": "x", "data": [1, 2]}]) == {"x": [1, 2]}


@pytest.mark.parametrize("tensor", [
    {"shape": [2], "data": [1, 2]},
    {"name": 3, "shape": [2], "data": [1, 2]},
    {"name": "y", "shape": [1], "data": 5},
    {"name": "y", "shape": [1]},
    {"name": "y", "shape": [0, 3], "data": []},
    {"name": "y", "shape": ["b", 3], "data": [1, 2, 3]},
    {"name": "y", "shape": 2, "data": [1, 2]},
    "y",
    [1, 2],
])
def test_feature_rows_skips_malformed_tensors(tensor: Any) -> None:
    assert feature_rows([tensor, {"name": "x", "shape": [2], "data": [1, 2]}]) == {"x": [1, 2]}


@pytest.mark.parametrize("inputs", [{"x": [1]}, "x", 5, None])
def test_feature_rows_of_something_other_than_a_list_is_nothing(inputs: Any) -> None:
    assert feature_rows(inputs) == {}


def test_feature_rows_flattens_ragged_data() -> None:
    assert feature_rows([{"name": "x", "shape": [3], "data": [[1], 2, [3]]}]) == {"x": [1, 2, 3]}


# -- LogSpec, sampling, buffering --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [{"sample": 1.5}, {"sample": -0.1}, {"flush_rows": 0}, {"flush_seconds": 0},
                                  {"mask": {"ssn": "encrypt"}}, {"rotate": True}])
def test_log_spec_rejects_bad_values(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LogSpec.model_validate(spec)


def test_sample_zero_logs_nothing(workspace: Workspace) -> None:
    log = _log(workspace, sample=0.0)
    for i in range(200):
        _add(log, f"i{i}", 1.0)
    assert log.take() == []
    assert not log.due()


def test_sample_half_logs_about_half_and_is_reproducible(workspace: Workspace) -> None:
    kept = []
    for _ in range(2):
        log = _log(workspace, sample=0.5, seed=11)
        for i in range(2_000):
            _add(log, f"i{i}", float(i))
        kept.append([item[0] for item in log.take()])
    assert 900 <= len(kept[0]) <= 1_100
    assert kept[0] == kept[1]


def test_inputs_that_are_not_a_list_are_dropped(workspace: Workspace) -> None:
    log = _log(workspace)
    log.add("i1", "main", "v1", 0.01, {"x": [1, 2]}, None)
    assert log.dropped == 1
    assert log.take() == []


def test_due_by_rows(workspace: Workspace) -> None:
    log = _log(workspace, flush_rows=3, flush_seconds=3_600)
    assert not log.due()
    _add(log, "i1", 1.0)
    _add(log, "i2", 1.0)
    assert not log.due()
    _add(log, "i3", 1.0)
    assert log.due()


def test_due_by_time_and_take_empties_the_buffer(workspace: Workspace) -> None:
    log = _log(workspace, flush_rows=1_000, flush_seconds=0.02)
    time.sleep(0.03)
    assert not log.due()  # time alone does not make an empty buffer due
    _add(log, "i1", 1.0)
    assert log.due()
    batch = log.take()
    assert [item[0] for item in batch] == ["i1"]
    assert log.take() == []
    _add(log, "i2", 1.0)
    assert not log.due()  # take() restarted the clock
    time.sleep(0.03)
    assert log.due()


# -- write --------------------------------------------------------------------------------------------------------

def test_write_makes_one_indexed_segment_per_call(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "a1", 1.0, version="v2")
    _add(log, "a2", 2.0, version="v1")
    batch = log.take()
    assert log.write(batch) == 2
    _add(log, "b1", 3.0)
    assert _flush(log) == 1
    assert log.logged == 3

    folder = workspace.settings.home / "payloads" / DEPLOYMENT
    files = sorted(folder.iterdir())
    assert len(files) == 2
    assert all(f.suffix == ".parquet" and not f.name.startswith(".") for f in files)

    segments = _segments(workspace)
    assert [s.rows for s in segments] == [2, 1]
    assert [s.versions for s in segments] == [["v1", "v2"], ["v1"]]
    assert {Path(s.path) for s in segments} == set(files)
    first = pd.read_parquet(segments[0].path)
    assert first["id"].tolist() == ["a1", "a2"]
    assert _unix(segments[0].first_at) == pytest.approx(batch[0][1], abs=1e-3)
    assert _unix(segments[0].last_at) == pytest.approx(batch[1][1], abs=1e-3)
    assert _unix(segments[0].first_at) <= _unix(segments[0].last_at) <= _unix(segments[1].first_at)


def test_write_columns(workspace: Workspace) -> None:
    log = _log(workspace)
    log.add("i1", "canary", "v3", 0.25, [{"name": "amount", "shape": [1], "data": [9.5]},
                                         {"name": "country", "shape": [1], "data": ["fr"]}],
            [{"name": "label", "shape": [1], "data": [1]}])
    _flush(log)
    frame = read_payloads(workspace, DEPLOYMENT)
    assert list(frame.columns) == [*META, "amount", "country"]
    row = frame.iloc[0].to_dict()
    assert {k: row[k] for k in ("id", "row", "predictor", "version", "latency", "prediction", "amount", "country")} \
        == {"id": "i1", "row": 0, "predictor": "canary", "version": "v3", "latency": 0.25, "prediction": 1,
            "amount": 9.5, "country": "fr"}


def test_write_gives_one_row_per_request_row(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "batch", 1.0, 2.0, 3.0, outputs=[{"name": "p", "shape": [3], "data": [0, 1, 0]}])
    _add(log, "none", 6.0)
    assert _flush(log) == 2  # requests; they become rows when read
    _add(log, "probs", 4.0, 5.0, outputs=[{"name": "p", "shape": [2, 2], "data": [[0.9, 0.1], [0.2, 0.8]]}])
    assert _flush(log) == 1
    frame = read_payloads(workspace, DEPLOYMENT)
    assert frame["id"].tolist() == ["batch"] * 3 + ["none", "probs", "probs"]
    assert frame["row"].tolist() == [0, 1, 2, 0, 0, 1]
    assert frame["x"].tolist() == [1.0, 2.0, 3.0, 6.0, 4.0, 5.0]
    # Per-row predictions; a row's vector is stored as its text; no outputs is a missing value.
    predictions = frame["prediction"].tolist()
    assert predictions[:3] == [0, 1, 0]
    assert pd.isna(predictions[3])
    assert predictions[4:] == ["[0.9, 0.1]", "[0.2, 0.8]"]


def test_a_batch_mixing_scalar_and_vector_predictions_is_written(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "scalar", 1.0, outputs=[{"name": "p", "shape": [1], "data": [1]}])
    _add(log, "vector", 2.0, outputs=[{"name": "p", "shape": [1, 2], "data": [[0.9, 0.1]]}])
    assert _flush(log) == 2


def test_write_of_nothing_writes_no_segment(workspace: Workspace) -> None:
    log = _log(workspace)
    assert log.write([]) == 0
    assert _segments(workspace) == []
    assert not (workspace.settings.home / "payloads" / DEPLOYMENT).exists()


def test_a_request_without_rows_is_stored_but_reads_as_nothing(workspace: Workspace) -> None:
    log = _log(workspace)
    log.add("empty", "main", "v1", 0.01, [{"name": "x", "shape": [0], "data": []}], None)
    log.add("junk", "main", "v1", 0.01, b"not json", None)
    assert _flush(log) == 2
    assert read_payloads(workspace, DEPLOYMENT).empty


def test_write_leaves_no_temp_files(workspace: Workspace) -> None:
    log = _log(workspace)
    for n in range(3):
        _add(log, f"i{n}", float(n))
        _flush(log)
    names = [p.name for p in (workspace.settings.home / "payloads" / DEPLOYMENT).iterdir()]
    assert len(names) == 3
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]


# -- masking ------------------------------------------------------------------------------------------------------

def _emails(log: PayloadLog, *emails: str) -> None:
    for i, email in enumerate(emails):
        log.add(f"m{i}", "main", "v1", 0.01, [{"name": "email", "shape": [1], "data": [email]},
                                              {"name": "amount", "shape": [1], "data": [float(i)]}], None)


def test_hash_mask_keeps_a_stable_digest(workspace: Workspace) -> None:
    log = _log(workspace, mask={"email": "hash"})
    _emails(log, "ann@example.com", "bob@example.com", "ann@example.com")
    _flush(log)
    # A new log of the same deployment (say, after a restart) hashes the same way.
    again = _log(workspace, mask={"email": "hash"})
    _emails(again, "ann@example.com")
    _flush(again)
    digests = read_payloads(workspace, DEPLOYMENT)["email"].tolist()
    assert all(len(d) == 16 and all(ch in "0123456789abcdef" for ch in d) for d in digests)
    assert digests[0] == digests[2] == digests[3]
    assert digests[0] != digests[1]
    assert "ann@example.com" not in digests


def test_hash_differs_between_deployments(workspace: Workspace) -> None:
    one, other = _log(workspace, "one", mask={"email": "hash"}), _log(workspace, "other", mask={"email": "hash"})
    for log in (one, other):
        _emails(log, "ann@example.com")
        _flush(log)
    assert read_payloads(workspace, "one")["email"][0] != read_payloads(workspace, "other")["email"][0]


def test_drop_mask_removes_the_column_and_absent_fields_are_ignored(workspace: Workspace) -> None:
    log = _log(workspace, mask={"email": "drop", "phone": "hash"})
    _emails(log, "ann@example.com", "bob@example.com")
    _flush(log)
    frame = read_payloads(workspace, DEPLOYMENT)
    assert "email" not in frame.columns
    assert "phone" not in frame.columns
    assert frame["amount"].tolist() == [0.0, 1.0]
    raw = Path(_segments(workspace)[0].path).read_bytes()
    assert b"ann@example.com" not in raw


def test_hash_of_a_value_does_not_depend_on_the_rest_of_the_batch(workspace: Workspace) -> None:
    log = _log(workspace, mask={"account": "hash"})
    log.add("a", "main", "v1", 0.01, _x(1, name="account"), None)
    _flush(log)
    log.add("b", "main", "v1", 0.01, _x(1, name="account"), None)
    log.add("c", "main", "v1", 0.01, _x(2.5, name="account"), None)
    _flush(log)
    digests = read_payloads(workspace, DEPLOYMENT)["account"].tolist()
    assert digests[0] == digests[1]


def test_mask_covers_a_2d_tensor(workspace: Workspace) -> None:
    log = _log(workspace, mask={"card": "drop"})
    log.add("i1", "main", "v1", 0.01, [{"name": "card", "shape": [1, 2], "data": [[4111, 1111]]},
                                       {"name": "amount", "shape": [1], "data": [3.0]}], None)
    _flush(log)
    frame = read_payloads(workspace, DEPLOYMENT)
    assert [c for c in frame.columns if c.startswith("card")] == []


def test_a_ragged_request_is_dropped_not_the_batch(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "good", 1.0)
    log.add("ragged", "main", "v1", 0.01, [{"name": "x", "shape": [2], "data": [1.0, 2.0]},
                                           {"name": "y", "shape": [1], "data": [3.0]}], None)
    assert _flush(log) == 2
    assert read_payloads(workspace, DEPLOYMENT)["id"].tolist() == ["good"]


# -- read_payloads -------------------------------------------------------------------------------------------------

def test_read_payloads_across_segments_and_deployments(workspace: Workspace) -> None:
    log, other = _log(workspace), _log(workspace, "other")
    for n in range(3):
        _add(log, f"s{n}", float(n))
        _flush(log)
    _add(other, "o1", 9.0)
    _flush(other)
    assert read_payloads(workspace, DEPLOYMENT)["id"].tolist() == ["s0", "s1", "s2"]
    assert read_payloads(workspace, "other")["id"].tolist() == ["o1"]


def test_read_payloads_since(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "old1", 1.0)
    _add(log, "old2", 2.0)
    _flush(log)
    time.sleep(0.01)
    cut = time.time()
    time.sleep(0.01)
    _add(log, "new1", 3.0)
    _flush(log)
    _add(log, "new2", 4.0)
    _flush(log)
    frame = read_payloads(workspace, DEPLOYMENT, since=cut)
    assert frame["id"].tolist() == ["new1", "new2"]
    assert (frame["at"] >= cut).all()
    assert read_payloads(workspace, DEPLOYMENT, since=time.time() + 60).empty


def test_read_payloads_since_inside_a_segment(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "before", 1.0)
    time.sleep(0.01)
    cut = time.time()
    time.sleep(0.01)
    _add(log, "after", 2.0)
    _flush(log)
    assert read_payloads(workspace, DEPLOYMENT, since=cut)["id"].tolist() == ["after"]


def test_read_payloads_by_version(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "a", 1.0, version="v1")
    _flush(log)
    _add(log, "b", 2.0, version="v1")
    _add(log, "c", 3.0, version="v2")
    _flush(log)
    _add(log, "d", 4.0, version="v2")
    _flush(log)
    assert read_payloads(workspace, DEPLOYMENT, version="v1")["id"].tolist() == ["a", "b"]
    assert read_payloads(workspace, DEPLOYMENT, version="v2")["id"].tolist() == ["c", "d"]
    assert read_payloads(workspace, DEPLOYMENT, version="v9").empty


def test_read_payloads_last(workspace: Workspace) -> None:
    log = _log(workspace)
    for n in range(4):
        _add(log, f"i{n}", float(n), outputs=[{"data": [n]}])
        _flush(log)
    frame = read_payloads(workspace, DEPLOYMENT, last=3)
    assert frame["id"].tolist() == ["i1", "i2", "i3"]
    assert frame.index.tolist() == [0, 1, 2]
    assert read_payloads(workspace, DEPLOYMENT, last=10)["id"].tolist() == ["i0", "i1", "i2", "i3"]


def test_read_payloads_empty_has_the_meta_columns(workspace: Workspace) -> None:
    frame = read_payloads(workspace, "nobody")
    assert frame.empty
    assert list(frame.columns) == list(META)


def test_requests_no_reader_can_parse_are_skipped_not_their_window(workspace: Workspace) -> None:
    # Logged as they came (nothing is parsed on the hot path): one that cannot be read as rows once made every
    # read of its window raise, so drift and quality were never measured again.
    log = _log(workspace)
    _add(log, "good", 1.0)
    for i, body in enumerate([b'{"inputs": {"x": [1]}}', b'{"inputs": [1, 2]}', b'{"inputs": 5}',
                              b'{"inputs": [{"name": "x", "shape": ["b", 1], "data": [1]}]}']):
        log.add(f"bad{i}", "main", "v1", 0.01, body, None)
    log.add("ragged", "main", "v1", 0.01, b'{"inputs": [{"name": "x", "shape": [2], "data": [[3.0], 4.0]}]}',
            b'{"outputs": [{"name": "y", "shape": [1], "data": 7}]}')
    assert _flush(log) == 6
    frame = read_payloads(workspace, DEPLOYMENT)
    assert frame["id"].tolist() == ["good", "ragged", "ragged"]
    assert frame["x"].tolist() == [1.0, 3.0, 4.0]


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_read_payloads_skips_an_unreadable_segment_file(workspace: Workspace, damage: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # A power cut after the rename can leave a segment empty or cut short: its rows are lost, never the
    # window's, and it is said once, not at every read.
    log = _log(workspace)
    for n in range(3):
        _add(log, f"i{n}", float(n))
        _flush(log)
    path = Path(_segments(workspace)[1].path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "empty": b"", "garbage": b"PAR1" + b"x" * 100}[damage])
    for _ in range(2):
        assert read_payloads(workspace, DEPLOYMENT)["id"].tolist() == ["i0", "i2"]
    assert read_payloads(workspace, DEPLOYMENT, last=2)["id"].tolist() == ["i0", "i2"]
    assert labelled(workspace, DEPLOYMENT).empty
    warned = [r for r in caplog.records if "unreadable payload segment" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0].getMessage()


def test_read_payloads_skips_a_deleted_segment_file(workspace: Workspace) -> None:
    log = _log(workspace)
    for n in range(3):
        _add(log, f"i{n}", float(n))
        _flush(log)
    Path(_segments(workspace)[1].path).unlink()
    assert read_payloads(workspace, DEPLOYMENT)["id"].tolist() == ["i0", "i2"]
    for segment in _segments(workspace):
        Path(segment.path).unlink(missing_ok=True)
    assert list(read_payloads(workspace, DEPLOYMENT).columns) == list(META)


# -- labelled ---------------------------------------------------------------------------------------------------------

def test_labelled_joins_feedback_and_keeps_only_answered(workspace: Workspace) -> None:
    log = _log(workspace)
    for n in range(4):
        _add(log, f"i{n}", float(n))
    _flush(log)
    _feedback(workspace, "i1", truth=1)
    _feedback(workspace, "i3", truth=0, reward=0.5)
    _feedback(workspace, "i0", truth=1, model="someone-else")
    _feedback(workspace, "ghost", truth=1)
    frame = labelled(workspace, DEPLOYMENT)
    assert frame["id"].tolist() == ["i1", "i3"]
    assert frame["x"].tolist() == [1.0, 3.0]
    assert frame["truth"].tolist() == [1, 0]
    assert frame["reward"].iloc[1] == 0.5
    assert pd.isna(frame["reward"].iloc[0])


def test_labelled_picks_the_row_of_a_batched_truth(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "batch", 1.0, 2.0, 3.0)
    _add(log, "single", 4.0)
    _flush(log)
    _feedback(workspace, "batch", truth=["a", "b", "c"])
    _feedback(workspace, "single", truth="d")
    frame = labelled(workspace, DEPLOYMENT)
    assert list(zip(frame["id"], frame["row"], frame["truth"], strict=True)) == [
        ("batch", 0, "a"), ("batch", 1, "b"), ("batch", 2, "c"), ("single", 0, "d")]


def test_labelled_joins_a_truth_and_a_reward_given_apart(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "i1", 1.0)
    _flush(log)
    _feedback(workspace, "i1", truth=1)
    _feedback(workspace, "i1", reward=1.0)  # one row per answer (a second truth would be refused)
    frame = labelled(workspace, DEPLOYMENT)
    assert len(frame) == 1
    assert (frame["truth"][0], frame["reward"][0]) == (1, 1.0)


def test_labelled_last_returns_the_most_recent_rows(workspace: Workspace) -> None:
    log = _log(workspace)
    for n in range(5):
        _add(log, f"i{n}", float(n))
        _flush(log)
    for n in (4, 0, 2, 3):  # feedback order does not matter, inference time does
        _feedback(workspace, f"i{n}", truth=n)
    frame = labelled(workspace, DEPLOYMENT, last=2)
    assert frame["id"].tolist() == ["i3", "i4"]
    assert frame["truth"].tolist() == [3, 4]
    assert labelled(workspace, DEPLOYMENT)["id"].tolist() == ["i0", "i2", "i3", "i4"]


def test_labelled_without_feedback_is_empty_with_truth_and_reward(workspace: Workspace) -> None:
    log = _log(workspace)
    _add(log, "i1", 1.0)
    _flush(log)
    frame = labelled(workspace, DEPLOYMENT)
    assert frame.empty
    assert {"truth", "reward", *META} <= set(frame.columns)
    nothing = labelled(workspace, "nobody")
    assert nothing.empty
    assert {"truth", "reward", *META} <= set(nothing.columns)


def test_inputs_named_like_metadata_keep_the_metadata_and_their_values(workspace: Workspace) -> None:
    log = _log(workspace)
    inputs = [*_x(42.0, name="id"), *_x(1.5, name="version"), *_x(0.5)]
    log.add("inf-1", "main", "v3", 0.01, inputs, None)
    _flush(log)
    _feedback(workspace, "inf-1", truth=1)
    (row,) = read_payloads(workspace, DEPLOYMENT, version="v3").to_dict("records")
    assert (row["id"], row["version"], row["input.id"], row["input.version"], row["x"]) == ("inf-1", "v3", 42.0,
                                                                                          1.5, 0.5)
    assert labelled(workspace, DEPLOYMENT)["truth"].tolist() == [1]
    assert [input_name(c) for c in ("input.id", "input.version", "x", "input.x")] == ["id", "version", "x", "input.x"]
    assert [feature_column(n) for n in ("id", "x")] == ["input.id", "x"]


def test_inputs_named_like_the_feedback_keep_their_values_apart_from_it(workspace: Workspace) -> None:
    log = _log(workspace)
    log.add("inf-1", "main", "v1", 0.01, [*_x(7.0, name="truth"), *_x(0.25, name="reward"), *_x(0.5)], None)
    _flush(log)
    _feedback(workspace, "inf-1", truth=1, reward=0.75)
    (row,) = labelled(workspace, DEPLOYMENT).to_dict("records")
    assert (row["truth"], row["reward"], row["input.truth"], row["input.reward"], row["x"]) == (1, 0.75, 7.0, 0.25,
                                                                                                0.5)
    assert [input_name(c) for c in ("input.truth", "input.reward")] == ["truth", "reward"]


def test_labels_that_come_many_answers_late_are_still_joined(workspace: Workspace) -> None:
    log = _log(workspace, flush_rows=100)
    for i in range(1200):
        _add(log, f"i{i}", float(i))
    _flush(log)
    for i in range(100):  # only the oldest answers are labelled yet, 1,100 answers later
        _feedback(workspace, f"i{i}", truth=i % 2)
    rows = labelled(workspace, DEPLOYMENT, last=50)
    assert rows["id"].tolist() == [f"i{i}" for i in range(50, 100)]
    assert rows["truth"].tolist() == [i % 2 for i in range(50, 100)]
    assert len(labelled(workspace, DEPLOYMENT)) == 100


def test_a_write_the_db_refuses_keeps_its_inferences_for_the_next_one(workspace: Workspace) -> None:
    log = _log(workspace, flush_rows=2)
    for i in range(3):
        _add(log, f"i{i}", float(i))

    def locked() -> None:
        raise OperationalError("INSERT INTO payload_segments", {}, Exception("database is locked"))

    with before_first_update(workspace.db, locked, verb="INSERT"), pytest.raises(UnwrittenPayloads) as caught:
        _flush(log)
    assert [r[0] for r in caught.value.rest] == ["i0", "i1", "i2"]
    assert _segments(workspace) == [] and list(log.folder.iterdir()) == []  # no file that no reader would see
    log.give_back(caught.value.rest)
    _add(log, "i3", 3.0)  # came in while the write failed: after the ones given back
    assert _flush(log) == 4
    assert read_payloads(workspace, DEPLOYMENT).sort_values("at")["id"].tolist() == ["i0", "i1", "i2", "i3"]


def test_what_is_given_back_is_held_up_to_ten_segments(workspace: Workspace) -> None:
    log = _log(workspace, flush_rows=1)
    for i in range(12):
        _add(log, f"i{i}", float(i))
    log.give_back(log.take())
    assert [r[0] for r in log.take()] == [f"i{i}" for i in range(2, 12)] and log.dropped == 2


def test_a_segment_holds_at_most_flush_rows_requests(workspace: Workspace) -> None:
    log = _log(workspace, flush_rows=5, flush_seconds=3_600)
    for i in range(12):
        _add(log, f"i{i}", float(i))
    assert _flush(log) == 12
    assert [s.rows for s in _segments(workspace)] == [5, 5, 2]
    assert read_payloads(workspace, DEPLOYMENT)["x"].tolist() == [float(i) for i in range(12)]


@pytest.mark.parametrize("last", [None, 10])
def test_an_id_sent_again_takes_its_label_for_its_last_answer_only(workspace: Workspace, last: int | None) -> None:
    # Two clients numbering their requests from "1" (or a retry): one label, for the answer the server gave last,
    # was joined to every logged request of that id, training on a wrong label and counting it twice.
    log = _log(workspace)
    _add(log, "1", 1.0, 1.5)  # two rows
    _add(log, "2", 5.0)
    _flush(log)
    _add(log, "1", 2.0)
    _flush(log)
    _feedback(workspace, "1", truth=1)
    _feedback(workspace, "2", truth=0)
    frame = labelled(workspace, DEPLOYMENT, last=last)
    assert sorted(zip(frame["id"], frame["x"], frame["truth"], strict=True)) == [("1", 2.0, 1), ("2", 5.0, 0)]
