"""Garbage collection keeps what a registered model's manifest names as its training inputs, as `skyloop artifacts
gc --help` promises ("that no registered model ... references"): `models show` lists them, they stay readable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests_support import age_blobs, write

from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
from skyloop.registry.registry import resolve
from skyloop.registry.uri import parse_model_ref
from skyloop.store.models import Artifact
from skyloop.store.workspace import Workspace

TRAINING = '''
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from skyloop import log_model, pipeline, step


@step
def load(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": (x[:, 0] > 0).astype(int)})


@step
def scale(factor: float) -> list[float]:
    return [factor] * 1000


@step
def train(df: pd.DataFrame, weights: list[float]) -> float:
    clf = LogisticRegression().fit(df[["a", "b", "c"]], df["y"])
    log_model(clf, "gcprobe")
    return float(clf.score(df[["a", "b", "c"]], df["y"]))


@pipeline
def training(n: int = 500):
    return train(load(n), scale(2.0))
'''


def test_gc_keeps_the_training_inputs_a_registered_models_manifest_lists(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = Settings.for_home(home)
    module = load_file_module(write(tmp_path / "gc_training.py", TRAINING))
    result = run(module.training, backend="inline", settings=settings)
    result._ws.close()  # the returned Run keeps its workspace open for lazy output loading
    assert result.status == "SUCCEEDED", result.error
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            version = resolve(session, parse_model_ref("models:/gcprobe/1"))
        inputs = version.manifest.producer.inputs if version.manifest.producer else {}
        assert set(inputs) == {"df", "weights"}
        age_blobs(workspace.store)  # past what a collection keeps as possibly in flight
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
        gc = subprocess.run([sys.executable, "-m", "skyloop", "artifacts", "gc", "--older-than", "0s", "--json"],
                            capture_output=True, text=True, env={**env, "SKYLOOP_HOME": str(home)}, timeout=120)
        assert gc.returncode == 0, gc.stderr
        with workspace.db.read() as session:
            for name, digest in inputs.items():
                row = session.get(Artifact, digest)
                assert row is not None and row.deleted_at is None, f"training input {name} was collected"
        frame = workspace.store.get_bytes(inputs["df"], verify=True)  # the blob is still there, whole
        assert frame
        assert f'"{inputs["df"]}"' not in gc.stdout
    finally:
        workspace.close()
