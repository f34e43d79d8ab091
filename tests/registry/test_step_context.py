"""`log_model` inside a running step records the run, the step run and the artifacts the step read.

The steps live in a file written per test and loaded by path, as a user's would: `local` workers
import them by that path in their own processes, and register in the run's DB (a temporary home).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
from skyloop.registry.context import current_step
from skyloop.registry.registry import resolve
from skyloop.registry.uri import parse_model_ref
from skyloop.store.models import Lineage, StepRunRow
from skyloop.store.workspace import Workspace

STEPS = '''
import os
import skyloop
from skyloop import pipeline, step

@step
def make_rows(seed: int) -> list[list[float]]:
    return [[float(seed + i), float((seed * i) % 5)] for i in range(6)]

@step
def label(rows: list[list[float]], cut: float) -> list[int]:
    return [int(row[0] > cut) for row in rows]

@step
def shard(i: int) -> int:
    return i * 10

@step
def train(rows: list[list[float]], labels: list[int], shards: list[int]) -> dict:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=200).fit(rows, labels)
    info = skyloop.log_model(model, "ctx-model", metrics={"rows": float(len(rows))})
    return {"version": info.version, "pid": os.getpid()}

@pipeline
def training(seed: int = 3, cut: float = 5.5):
    rows = make_rows(seed)
    return train(rows, label(rows, cut), shard.map([1, 2]))
'''


def _recorded(settings: Settings, run_id: str, uri: str) -> tuple[Any, dict[str, StepRunRow], dict[str, str]]:
    """The model version, the run's attempt rows by task (units as `task[i]`) and every output by step run."""
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            info = resolve(session, parse_model_ref(uri))
            rows = {r.task if r.map_index < 0 else f"{r.task}[{r.map_index}]": r
                    for r in session.query(StepRunRow).filter_by(run_id=run_id)}
            outputs = {edge.step_run_id: edge.artifact
                       for edge in session.query(Lineage).filter_by(direction="out")}
        return info, rows, outputs
    finally:
        workspace.close()


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["local", "inline"])
def test_log_model_in_a_step_records_run_step_and_inputs(backend: str, tmp_path: Path) -> None:
    file = tmp_path / "ctx_steps.py"
    file.write_text(STEPS)
    settings = Settings.for_home(tmp_path / "home")

    result = run(load_file_module(file).training, backend=backend, settings=settings)

    assert result.status == "SUCCEEDED", result.error
    out = result.output("train")
    assert out["version"] == 1
    # On local the step ran in a worker process, which registered into the run's DB (not ~/.skyloop).
    assert (out["pid"] != os.getpid()) == (backend == "local")
    assert current_step() is None
    info, rows, outputs = _recorded(settings, result.id, "models:/ctx-model/1")
    producer = info.manifest.producer
    assert producer is not None
    assert (producer.run_id, producer.step_run_id, producer.task) == (result.id, rows["train"].id, "train")
    assert (info.run_id, info.step_run_id) == (result.id, rows["train"].id)
    assert producer.inputs == {
        "rows": outputs[rows["make_rows"].id],
        "labels": outputs[rows["label"].id],
        "shards[0]": outputs[rows["shard[0]"].id],
        "shards[1]": outputs[rows["shard[1]"].id],
    }
    assert info.manifest.metrics == {"rows": 6.0}


RETURNS_ITS_MODEL = '''
import numpy as np
from sklearn.linear_model import LogisticRegression
import skyloop
from skyloop import pipeline, step

@step
def fit() -> LogisticRegression:
    x = np.random.default_rng(0).normal(size=(30, 4))
    model = LogisticRegression(max_iter=300).fit(x, np.arange(30) % 3)
    skyloop.log_model(model, "returned", flavor="sklearn")  # model.joblib: the same bytes as the output
    return model

@step
def use(model: LogisticRegression, k: int) -> float:
    return float(model.coef_.sum()) * k

@pipeline
def fit_and_use(k: int = 1):
    return use(fit(), k)
'''


def test_a_step_that_registers_the_model_it_returns_is_read_back_from_the_cache(tmp_path: Path) -> None:
    file = tmp_path / "returns_its_model.py"
    file.write_text(RETURNS_ITS_MODEL)
    settings = Settings.for_home(tmp_path / "home")
    pipe = load_file_module(file).fit_and_use
    first = run(pipe, {"k": 1}, backend="inline", settings=settings)
    first._ws.close()
    assert first.status == "SUCCEEDED", first.error
    second = run(pipe, {"k": 2}, backend="inline", settings=settings)
    second._ws.close()
    assert second.status == "SUCCEEDED", second.error
    assert second.steps["fit"].state.value == "CACHED"
    assert second.output("use") == pytest.approx(2 * first.output("use"))
