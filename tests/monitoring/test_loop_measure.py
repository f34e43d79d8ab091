"""The loop's measures on real payload logs, drift reports and events (no controller): masked inputs, features
that stop arriving, labelled rows across a restart, the drift reports' retention, and the history picture."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from sqlalchemy import func, select

from skyloop.config import MonitoringSettings, Settings
from skyloop.deploy.gateway import _Metrics
from skyloop.deploy.loop import Loop
from skyloop.deploy.picture import SCORE_CAP, drift_score, drift_series, write_history_picture
from skyloop.deploy.spec import LoopSpec
from skyloop.monitoring.drift import detect_drift
from skyloop.monitoring.drift_inputs import masked_as
from skyloop.monitoring.payloads import count_feedback
from skyloop.store import deployments as store
from skyloop.store.feedback import record_feedback
from skyloop.store.models import DriftReportRow
from skyloop.store.workspace import Workspace

NAME = "dep"
VERSION = "m/1"


@pytest.fixture
def workspace(settings: Settings) -> Iterator[Workspace]:
    ws = Workspace.open(settings)
    with ws.db.session() as session:
        store.apply_deployment(session, NAME, {"name": NAME, "predictors": []})
    yield ws
    ws.close()


class Runner(SimpleNamespace):
    """The parts of a deployment runner a loop reads, over a real workspace and real gateway metrics."""

    def __init__(self, workspace: Workspace, created_at: float) -> None:
        super().__init__(name=NAME, controller=SimpleNamespace(workspace=workspace, settings=workspace.settings),
                         gateway=SimpleNamespace(payloads=None, metrics=_Metrics(), weights={"main": 100.0}),
                         hosts={"main": SimpleNamespace(version=VERSION)}, rollout=None, created_at=created_at,
                         events=[])

    async def event(self, kind: str, reason: str, **_: Any) -> None:
        self.events.append((kind, reason))


def _loop(workspace: Workspace, spec: dict[str, Any], reference: pd.DataFrame | None = None) -> Loop:
    loop = Loop(Runner(workspace, time.time() - 10), LoopSpec.model_validate(spec))  # type: ignore[arg-type]
    loop.references[VERSION] = reference
    return loop


def _log(loop: Loop, rows: pd.DataFrame) -> None:
    """Log `rows` as one-row V2 requests, as a gateway would, and write them out."""
    for _, row in rows.iterrows():
        inputs = [{"name": c, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64",
                   "data": [v.item() if hasattr(v, "item") else v]} for c, v in row.items()]
        loop.payloads.add(uuid.uuid4().hex, "main", VERSION, 0.01, orjson.dumps({"inputs": inputs}),
                          orjson.dumps({"outputs": [{"name": "y", "shape": [1], "datatype": "INT64", "data": [0]}]}))
    loop.payloads.write(loop.payloads.take())


def _reference(n: int = 2_000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"x0": rng.normal(size=n), "country": rng.choice(["fr", "de", "us"], n)})


# -- masked inputs -------------------------------------------------------------------------------------------------

def test_a_hashed_categorical_is_compared_hashed_and_a_hashed_numeric_is_left_out_and_named(
        workspace: Workspace) -> None:
    reference = _reference()
    spec = {"log": {"mask": {"country": "hash", "x0": "hash"}}, "drift": {"window": 300}}
    loop = _loop(workspace, spec, reference)
    _log(loop, reference.sample(300, random_state=1))  # unchanged traffic
    signals = loop.measure()
    # Before: every hash was a category the reference never had (drift at every check), and x0's hashes made the
    # whole measure fail ("test 'ks' needs numbers").
    assert "error" not in loop.last, loop.last
    assert signals.dataset_drift is False and signals.drift_detail == "0/1 features drift"
    assert "x0: masked with hash" in loop.last["unchecked"]
    moved = _loop(workspace, spec, reference)
    _log(moved, reference.head(300).assign(country="fr"))
    assert moved.measure().dataset_drift is True  # a hashed categorical still drifts when it moves


def test_hashed_codes_drift_only_when_they_move_whatever_the_references_dtype(workspace: Workspace) -> None:
    # A column of codes with one missing is float (75001.0) and a float32 column holds 0.10000000149011612, while
    # clients send 75001 and 0.1: every hash was one the reference never had, and the data drifted at every check.
    rng = np.random.default_rng(0)
    zips = rng.choice([75001, 75002, 75003], 2000).astype(float)
    zips[:5] = np.nan
    grades = rng.choice(np.array([0.1, 0.2, 0.3], dtype=np.float32), 2000)
    reference = pd.DataFrame({"zip": zips, "grade": grades})
    spec = {"log": {"mask": {"zip": "hash", "grade": "hash"}}, "drift": {"window": 300}}

    def send(loop: Loop, zip_codes: Any) -> None:
        for code, grade in zip(zip_codes, rng.choice([0.1, 0.2, 0.3], 300), strict=True):
            inputs = [{"name": "zip", "shape": [1], "datatype": "INT64", "data": [int(code)]},
                      {"name": "grade", "shape": [1], "datatype": "FP32", "data": [float(grade)]}]
            loop.payloads.add(uuid.uuid4().hex, "main", VERSION, 0.01, orjson.dumps({"inputs": inputs}), None)
        loop.payloads.write(loop.payloads.take())

    same = _loop(workspace, spec, reference)
    send(same, rng.choice([75001, 75002, 75003], 300))
    assert same.measure().dataset_drift is False, same.last
    assert same.last["drift"] == "0/2 features drift"
    moved = _loop(workspace, spec, reference)
    send(moved, np.full(300, 75001))
    assert moved.measure().dataset_drift is True


def test_what_is_left_out_is_said_once(workspace: Workspace) -> None:
    loop = _loop(workspace, {"log": {"mask": {"x0": "drop"}}, "drift": {"every": "10ms"}}, _reference())
    _log(loop, _reference().head(100))
    for _ in range(3):
        asyncio.run(loop.tick())
        time.sleep(0.02)
    said = [reason for kind, reason in loop.runner.events if kind == "loop.unchecked"]
    assert said == ["drift leaves out x0: masked with drop, so never logged"]


@pytest.mark.parametrize(("feature", "mask", "how"), [
    ("email", {"email": "hash"}, "hash"), ("input-0_3", {"input-0": "drop"}, "drop"),
    ("input.id", {"id": "hash"}, "hash"), ("input-0_x", {"input-0": "hash"}, None), ("x0", {}, None)])
def test_a_feature_is_masked_as_its_input(feature: str, mask: dict[str, str], how: str | None) -> None:
    assert masked_as(feature, mask) == how


def test_a_feature_that_stops_arriving_drifts_and_is_not_called_missing_from_the_reference(
        workspace: Workspace) -> None:
    reference = _reference()
    spec = {"drift": {"tests": {"features": {"country": {"test": "chisquare"}}}}}
    loop = _loop(workspace, spec, reference)
    _log(loop, reference[["x0"]].head(100))  # clients stopped sending country
    signals = loop.measure()
    assert "error" not in loop.last, loop.last  # was "drift spec names features the reference lacks: country"
    assert signals.drift_detail == "1/2 features drift"
    row = _reports(workspace)[-1]
    gone = next(f for f in row.report["features"] if f["feature"] == "country")
    assert gone["drifted"] and gone["statistic"] is None


def test_hashed_inputs_are_not_retrained_on(workspace: Workspace) -> None:
    spec = {"log": {"mask": {"country": "hash"}},
            "triggers": {"on": [{"labelled_rows": 1}], "cooldown": "1h"},
            "retrain": {"pipeline": "nowhere.py:never", "model": "m", "min_rows": 10, "backend": "inline"}}
    loop = _loop(workspace, spec, _reference())
    _log(loop, _reference().head(50))
    from skyloop.monitoring.payloads import read_payloads

    with workspace.db.session() as session:
        for inference in read_payloads(workspace, NAME)["id"]:
            record_feedback(session, NAME, VERSION, inference, truth=1)
    loop.phase = "retraining"
    asyncio.run(loop._retrain_and_roll_out())
    kinds = [kind for kind, _ in loop.runner.events]
    assert kinds == ["loop.failed"] and loop.phase == "watching"
    assert "'country' masked with hash" in loop.runner.events[0][1]


# -- labelled rows across a restart -------------------------------------------------------------------------------

def test_a_restarted_loop_counts_labelled_rows_from_the_last_firing(workspace: Workspace) -> None:
    created = time.time() - 5
    spec = LoopSpec.model_validate({"triggers": {"on": [{"labelled_rows": 100}], "cooldown": 0},
                                    "retrain": {"pipeline": "x.py:p", "model": "m"}})
    with workspace.db.session() as session:
        for i in range(30):  # before the firing: not counted
            record_feedback(session, NAME, VERSION, f"old{i}", truth=1)
    time.sleep(0.05)
    with workspace.db.session() as session:
        store.record_event(session, NAME, 1, "loop.fired", "ok", reason="fired")
        store.record_event(session, NAME, 1, "loop.finished", "ok", reason="done")
    time.sleep(0.05)
    with workspace.db.session() as session:
        for i in range(120):
            record_feedback(session, NAME, VERSION, f"id{i}", truth=1)
    loop = Loop(Runner(workspace, created), spec)  # type: ignore[arg-type]
    loop._resume_triggers()
    assert count_feedback(workspace, NAME, loop.labelled_since) == 120  # was 0: counted from the restart
    never = Loop(Runner(workspace, created), LoopSpec())  # type: ignore[arg-type]
    never.runner.name = never._name = "other"
    never._resume_triggers()
    assert never.labelled_since == created  # no firing yet: from the deployment's creation


# -- drift reports: retention, and the history picture ---------------------------------------------------------------

def _reports(workspace: Workspace) -> list[DriftReportRow]:
    with workspace.db.read() as session:
        return list(session.scalars(select(DriftReportRow).order_by(DriftReportRow.id)))


def test_drift_reports_past_their_retention_are_deleted(settings: Settings, tmp_path: Path) -> None:
    kept = settings.model_copy(update={"monitoring": MonitoringSettings(drift_report_days=1.0)})
    ws = Workspace.open(kept)
    try:
        with ws.db.session() as session:
            store.apply_deployment(session, NAME, {"name": NAME, "predictors": []})
            now = datetime.now(UTC)
            for days, deployment in ((3, NAME), (0.5, NAME), (3, "someone-else")):
                session.add(DriftReportRow(deployment=deployment, version=VERSION, at=now - timedelta(days=days),
                                           dataset_drift=False, share=0.0, report={}))
        loop = _loop(ws, {}, _reference())
        _log(loop, _reference().head(50))
        loop.measure()
        with ws.db.read() as session:
            left = session.execute(select(DriftReportRow.deployment, DriftReportRow.at)
                                   .order_by(DriftReportRow.id)).all()
        assert [d for d, _ in left] == [NAME, "someone-else", NAME]  # the 3-day-old one of NAME is gone
    finally:
        ws.close()


def _store_checks(workspace: Workspace, n: int, start: datetime) -> None:
    rng = np.random.default_rng(0)
    reference = pd.DataFrame({"x0": rng.normal(size=500), "country": rng.choice(["fr", "de", "us"], 500)})
    with workspace.db.session() as session:
        for i in range(n):
            shift = 1.0 if i >= n // 2 else 0.0  # x0 moves half-way; country never does
            current = pd.DataFrame({"x0": rng.normal(shift, 1.0, 300), "country": rng.choice(["fr", "de", "us"], 300)})
            report = detect_drift(reference, current)
            session.add(DriftReportRow(deployment=NAME, version=VERSION, at=start + timedelta(seconds=5 * i),
                                       dataset_drift=report.dataset_drift, share=report.share,
                                       report={**report.to_dict(), "quality": 0.9}))


def test_the_picture_draws_one_score_per_feature_with_drift_at_one(workspace: Workspace, tmp_path: Path) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    _store_checks(workspace, 20, start)
    drift, quality = drift_series(workspace, NAME, start.timestamp())
    assert len(drift) == len(quality) == 20
    before, after = drift[0][1], drift[-1][1]
    assert before["x0"] < 1 and before["country"] < 1  # nothing drifts: both under the line
    assert after["x0"] >= 1 > after["country"]  # the drifted feature above it, the other under
    # The raw statistics put country's chi-squared (0-18) far above x0's KS distance (0.4) that drifted.
    assert drift_score({"test": "wasserstein", "statistic": 0.2, "p_value": None, "threshold": 0.1}) == 2.0
    assert drift_score({"test": "ks", "statistic": 0.5, "p_value": 0.05, "threshold": 0.05}) == pytest.approx(1.0)
    assert drift_score({"test": "ks", "statistic": 0.9, "p_value": 0.0, "threshold": 0.05}) == SCORE_CAP
    assert drift_score({"test": "ks", "statistic": None, "p_value": None, "threshold": 0.05}) == SCORE_CAP
    assert drift_score({"test": "chisquare", "statistic": None, "p_value": None, "threshold": 0.05,
                        "testable": False}) is None
    png, _ = write_history_picture(workspace, NAME, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_picture_reads_a_bounded_number_of_checks_from_its_start(workspace: Workspace) -> None:
    start = datetime.now(UTC) - timedelta(hours=2)
    _store_checks(workspace, 60, start)
    drift, _ = drift_series(workspace, NAME, (start + timedelta(seconds=5 * 10)).timestamp(), points=10)
    assert len(drift) <= 10
    assert drift[0][0] >= 0  # nothing before `start`
    assert any(flag for _, _, flag in drift) and not all(flag for _, _, flag in drift)
    with workspace.db.read() as session:
        assert session.scalar(select(func.count()).select_from(DriftReportRow)) == 60
    assert all(math.isfinite(s) for _, scores, _ in drift for s in scores.values())
