"""The closed loop's gate gives logged rows to a model as the server gave them, and judges its answers as live
quality did: real registered models, rows made by the payload log's own `feature_rows` from V2 requests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from skyloop.config import Settings
from skyloop.deploy.loop import gate_failures, holdout_accuracy
from skyloop.deploy.spec import GateSpec
from skyloop.errors import SpecError
from skyloop.monitoring.payloads import feature_column, feature_rows
from skyloop.registry import load_model, log_model
from skyloop.registry.api import LoadedModel

RNG = np.random.default_rng(0)
A, B = RNG.normal(size=200), RNG.normal(size=200) * 0.01
Y = (A > 0).astype(int)


def _logged(tensors: list[dict[str, Any]]) -> pd.DataFrame:
    """The feature columns the payload log keeps for one V2 request of these tensors."""
    return pd.DataFrame({feature_column(name): values for name, values in feature_rows(tensors).items()})


def _registered(model: object, settings: Settings, example: Any = None) -> LoadedModel:
    info = log_model(model, "m", settings=settings, input_example=example)
    return load_model(info.uri, settings)


def test_columns_in_the_clients_order_reach_the_model_in_its_own(settings: Settings) -> None:
    # Clients send the table's columns as tensors in any order (the server takes them by name). The gate gave
    # the model the columns in the logged order: a champion 100% accurate live scored 0.54, and any challenger
    # was better than that.
    frame = pd.DataFrame({"a": A, "b": B})
    champion = _registered(LogisticRegression().fit(frame, Y), settings, frame.head(3))
    rows = _logged([{"name": "b", "shape": [200], "datatype": "FP64", "data": B.tolist()},
                    {"name": "a", "shape": [200], "datatype": "FP64", "data": A.tolist()}])
    assert list(rows.columns) == ["b", "a"]
    assert holdout_accuracy(champion, rows, Y.tolist()) == 1.0


class Column:
    """Answers right, as a one-column frame (a python model, keras or torch answer (n, 1))."""

    def predict(self, X: Any) -> pd.DataFrame:
        return pd.DataFrame({"y": (np.asarray(X)[:, 0] > 0).astype(int)})


class Zeros:
    def predict(self, X: Any) -> np.ndarray[Any, Any]:
        return np.zeros((len(X), 1), dtype=int)


class Labelled:
    """Answers right, with the probabilities beside the label (an ONNX classifier's two outputs)."""

    def predict(self, X: Any) -> dict[str, np.ndarray[Any, Any]]:
        first = np.asarray(X)[:, 0]
        return {"label": (first > 0).astype(int), "probabilities": np.stack([first <= 0, first > 0], 1) * 1.0}


def test_answers_are_judged_per_row_as_live_quality_judges_them(settings: Settings) -> None:
    # An answer of shape (n, 1) was compared whole with each truth: every model scored 0, and with min_delta 0
    # a challenger that answers 0 for everything was blessed over a right champion. A dict answer failed.
    iris_like = _logged([{"name": "input-0", "shape": [200, 2], "datatype": "FP64",
                          "data": np.stack([A, B], 1).ravel().tolist()}])
    assert list(iris_like.columns) == ["input-0_0", "input-0_1"]
    example = np.stack([A, B], 1)[:3]
    right, zeros = _registered(Column(), settings, example), _registered(Zeros(), settings, example)
    truth = Y.tolist()
    champion, challenger = holdout_accuracy(right, iris_like, truth), holdout_accuracy(zeros, iris_like, truth)
    assert champion == 1.0 and challenger == pytest.approx(1 - Y.mean())
    assert gate_failures(GateSpec(min_delta=0.0), champion, challenger)  # not blessed
    assert holdout_accuracy(_registered(Labelled(), settings, example), iris_like, truth) == 1.0


def test_a_model_input_the_log_lacks_is_named(settings: Settings) -> None:
    frame = pd.DataFrame({"a": A, "b": B})
    model = _registered(LogisticRegression().fit(frame, Y), settings, frame.head(3))
    rows = _logged([{"name": "a", "shape": [200], "datatype": "FP64", "data": A.tolist()}])
    with pytest.raises(SpecError, match="the payload log has no column 'b' of input 'b', which models:/m/1 takes"):
        holdout_accuracy(model, rows, Y.tolist())
