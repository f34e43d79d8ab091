"""Fixtures for deployment tests: a home with registered iris models, node classes and one real controller
process for the module (stopped by PID); node classes for the gateway tests' in-process replicas."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import NODES, Env, stop_tree
from tests_support import write

from skyloop.config import Settings
from skyloop.store.workspace import Workspace


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A home with `iris` versions 1 and 2 (champion -> 1, challenger -> 2), nodes.py, and a running controller."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model
    from skyloop.registry.registry import set_alias

    root = tmp_path_factory.mktemp("deploy")
    settings = Settings.for_home(root / "home")
    X, y = load_iris(return_X_y=True)
    for max_iter in (500, 600):
        log_model(LogisticRegression(max_iter=max_iter).fit(X, y), "iris", input_example=X[:5], settings=settings)
    workspace = Workspace.open(settings)
    with workspace.db.session() as session:
        set_alias(session, "iris", "champion", 1)
        set_alias(session, "iris", "challenger", 2)
    workspace.close()
    write(root / "specs" / "nodes.py", NODES)
    argv = [sys.executable, "-m", "skyloop", "--home", str(settings.home), "deploy", "controller"]
    with open(root / "controller.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Env(settings, root / "specs", X, y)
    finally:
        stop_tree(proc)
        print((root / "controller.log").read_text()[-3000:])



GATEWAY_NODES = '''
import numpy as np


class Constant:
    """Answers one class for every row."""

    def __init__(self, label=0):
        self.label = label

    def predict(self, X):
        return np.full(len(X), self.label, dtype=np.int64)


class Complex:
    """Answers complex numbers, which no V2 datatype carries."""

    def predict(self, X):
        return np.asarray(X).astype(complex)
'''


@pytest.fixture
def nodes(tmp_path: Path) -> Path:
    """A folder with the `nodes.py` of the gateway tests' replicas."""
    write(tmp_path / "graph" / "nodes.py", GATEWAY_NODES)
    return tmp_path / "graph"
