"""Fixtures for serving tests: a registered iris classifier and user node classes on disk."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from starlette.testclient import TestClient
from tests_support import write

from skyloop.config import Settings
from skyloop.serving import DataPlane, create_app, spec_for_target

NODES = '''
import numpy as np


class Scale:
    """TRANSFORMER: multiplies the features."""

    def __init__(self, factor=1.0):
        self.factor = factor
        self.loaded = False

    def load(self):
        self.loaded = True

    def transform_input(self, X):
        assert self.loaded, "load() was not called"
        return np.asarray(X) * self.factor


class Constant:
    """MODEL: answers one class for every row."""

    def __init__(self, label=0):
        self.label = label

    def predict(self, X):
        return np.full(len(X), self.label, dtype=np.int64)


class Vote:
    """COMBINER: majority vote, ties to the first child."""

    def aggregate(self, answers):
        stacked = np.stack([np.asarray(a) for a in answers])
        return np.array([np.bincount(col).argmax() for col in stacked.T], dtype=np.int64)


class Pick:
    """ROUTER: routes to `child`, and learns from rewards."""

    def __init__(self, child=0):
        self.child = child
        self.rewards = []

    def route(self, X):
        return self.child

    def send_feedback(self, features, reward, truth, routing):
        self.rewards.append((routing, reward))


class Label:
    """OUTPUT_TRANSFORMER: class index -> name (BYTES)."""

    def transform_output(self, Y):
        names = np.array(["setosa", "versicolor", "virginica"], dtype=object)
        return {"label": names[np.asarray(Y)]}


class Boom:
    """MODEL that fails on a marker value."""

    def predict(self, X):
        if np.any(np.asarray(X) < 0):
            raise ValueError("negative features are not allowed")
        return np.asarray(X).sum(axis=1)


class Echo:
    """MODEL for text: upper-cases BYTES."""

    def predict(self, X):
        return np.array([str(v).upper() for v in np.asarray(X).reshape(-1)], dtype=object)
'''


@pytest.fixture(scope="session")
def iris() -> tuple[Any, np.ndarray[Any, Any]]:
    """A fitted LogisticRegression on iris, and its features."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=500).fit(X, y), X


@pytest.fixture
def iris_uri(settings: Settings, iris: tuple[Any, np.ndarray[Any, Any]]) -> str:
    """`models:/iris@champion`, registered in the test's home."""
    from skyloop.registry import log_model
    from skyloop.registry.registry import set_alias
    from skyloop.store.workspace import Workspace

    clf, X = iris
    info = log_model(clf, "iris", input_example=X[:5], settings=settings)
    workspace = Workspace.open(settings)
    try:
        with workspace.db.session() as session:
            set_alias(session, "iris", "champion", info.version)
    finally:
        workspace.close()
    return "models:/iris@champion"


@pytest.fixture
def client(settings: Settings, iris_uri: str) -> Iterator[TestClient]:
    """The serving app (in this process) over `models:/iris@champion`, loaded; a module may define its own."""
    plane = DataPlane([spec_for_target(iris_uri)], settings)
    with TestClient(create_app(plane)) as client:
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/v2/health/ready").json()
            time.sleep(0.02)
        yield client


@pytest.fixture
def nodes_dir(tmp_path: Path) -> Path:
    """A folder with `nodes.py` (user node classes) for specs to point at."""
    write(tmp_path / "graph" / "nodes.py", NODES)
    return tmp_path / "graph"


@pytest.fixture
def serve() -> Any:
    """`serve(settings, *args, workers=N)`: a context manager running `skyloop serve` (see `serve_process`)."""
    return serve_process


@contextlib.contextmanager
def serve_process(settings: Settings, *args: str, workers: int = 1,
                  env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`skyloop serve ARGS` as a real process on 127.0.0.1 and a free port (`env`: added to the environment);
    stopped (and its workers) by PID."""
    cmd = [sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", *args,
           "--host", "127.0.0.1", "--port", "0", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        port = _announced_port(proc)
        _wait_ready(port, proc)
        yield proc, port
    finally:
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.poll() is None:  # (a pid reaped already, by the test, may be another process's by now)
                children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def _announced_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(60)
    line = found[0] if found else ""
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v2", line)
    if match is None:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"skyloop serve did not start (exit {proc.returncode}): {line!r} {err}")
    return int(match.group(1))


def _wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.05)
    raise AssertionError("server never became ready")
