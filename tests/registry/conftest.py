"""Fixtures of the registry tests: a small trained classifier and a workspace in a temporary home."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from skyloop import Settings
from skyloop.store.workspace import Workspace


@pytest.fixture(scope="session")
def data() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Twelve rows of four features in three well separated classes."""
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0], [0.0, 3.0, 3.0, 3.0]])
    X = np.concatenate([c + rng.normal(0, 0.3, size=(4, 4)) for c in centers])
    y = np.repeat([0, 1, 2], 4)
    return X, y


@pytest.fixture(scope="session")
def classifier(data: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> LogisticRegression:
    X, y = data
    return LogisticRegression(max_iter=1000).fit(X, y)


@pytest.fixture
def workspace(settings: Settings) -> Iterator[Workspace]:
    ws = Workspace.open(settings)
    yield ws
    ws.close()
