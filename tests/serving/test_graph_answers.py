"""Whose fault an inference graph's failures are: the client's (4xx) or the graph's (5xx), always naming the node.

Graphs of user nodes and registered models, served by the app over the data plane (the in-process client).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from starlette.testclient import TestClient

from skyloop.config import Settings
from skyloop.serving import DataPlane, create_app, load_serve_spec

NODES = '''
import numpy as np

from skyloop.serving import InputRejected


class Three:
    """TRANSFORMER that drops a feature: the model below cannot take what it makes."""

    def transform_input(self, X):
        return np.asarray(X)[:, :3]


class Renamed:
    """TRANSFORMER that names its answer wrongly for the model below."""

    def transform_input(self, X):
        return {"wrong": np.asarray(X)}


class Strict:
    """TRANSFORMER that refuses requests without 4 features, as the client's fault."""

    def transform_input(self, X):
        if np.asarray(X).shape[-1] != 4:
            raise InputRejected("need 4 features")
        return X


class Answer:
    """MODEL answering what its parameter `kind` names."""

    def __init__(self, kind="ok"):
        self.kind = kind

    def predict(self, X):
        n = len(X)
        return {
            "ok": lambda: np.arange(n),
            "none": lambda: None,
            "ragged": lambda: [[1, 2], [3]],
            "pair": lambda: (np.arange(n), np.arange(n + 1)),
            "object": lambda: object(),
            "dicts": lambda: [{"label": "a", "p": 0.3} for _ in range(n)],
            "mapping": lambda: {"label": [None] * n},
        }[self.kind]()


class Route:
    """ROUTER returning `choice` as it is (a bool, a float, a string, ...)."""

    def __init__(self, choice=0, kind="int"):
        self.choice = {"int": int, "bool": bool, "float": float, "str": str,
                       "np.int64": np.int64, "np.float64": np.float64, "np.bool": np.bool_}[kind](choice)

    def route(self, X):
        return self.choice


class Const:
    """MODEL: answers `value` for every row, and remembers the rewards it is told."""

    def __init__(self, value=0):
        self.value = value
        self.rewards = []

    def predict(self, X):
        return np.full(len(X), self.value)

    def send_feedback(self, features, reward, truth, routing):
        self.rewards.append(reward)


class Broken(Const):
    """ROUTER (to child 0) whose feedback store is down."""

    def route(self, X):
        return 0

    def send_feedback(self, features, reward, truth, routing):
        raise RuntimeError("bandit store down")


class First:
    """COMBINER: the first child's answer."""

    def aggregate(self, answers):
        return answers[0]


class Same:
    """OUTPUT_TRANSFORMER: the answer as it is."""

    def transform_output(self, Y):
        return Y
'''

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3]]
REQUEST = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": ROWS}]}
IRIS = {"name": "logreg", "type": "MODEL", "model_uri": "models:/iris@champion"}


def _client(folder: Path, settings: Settings, graph: dict[str, Any]) -> Iterator[tuple[TestClient, DataPlane]]:
    folder.mkdir(exist_ok=True)
    (folder / "nodes.py").write_text(NODES)
    spec = folder / "graph.yaml"
    spec.write_text(yaml.safe_dump({"name": "g", "graph": graph}))
    plane = DataPlane([load_serve_spec(spec)], settings)
    with TestClient(create_app(plane)) as client:
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/v2/health/ready").json()
            time.sleep(0.02)
        yield client, plane


def _infer(client: TestClient, body: dict[str, Any] = REQUEST) -> tuple[int, Any]:
    response = client.post("/v2/models/g/infer", json=body)
    return response.status_code, response.json()


@pytest.mark.parametrize(("transformer", "message"), [
    ("Three", "node 'logreg' failed: the model refused what node 't' gave it (fix that node or the model): "
              "ValueError: X has 3 features, but LogisticRegression is expecting 4 features"),
    ("Renamed", "node 'logreg' failed: what node 't' gave it does not fit the model's signature (fix that node): "
                "unknown input 'wrong'; the model takes input-0"),
])
def test_a_model_refusing_what_another_node_made_is_a_server_error_naming_both(
        tmp_path: Path, settings: Settings, iris_uri: str, transformer: str, message: str) -> None:
    # It was a 422 blaming the client, who cannot fix the graph's transformer; and a gateway counts only 5xx as
    # errors, so that a canary with a broken transformer showed an error rate of 0.
    graph = {"name": "t", "type": "TRANSFORMER", "implementation": f"nodes.py:{transformer}", "children": [IRIS]}
    for client, _ in _client(tmp_path / "g", settings, graph):
        status, doc = _infer(client)
        assert status == 500 and doc["error"].startswith(message), doc


def test_a_node_refuses_a_bad_request_with_a_422(tmp_path: Path, settings: Settings, iris_uri: str) -> None:
    # Every exception of a user node was a 500, which counts against the predictor and trains bandits away from it.
    graph = {"name": "strict", "type": "TRANSFORMER", "implementation": "nodes.py:Strict", "children": [IRIS]}
    for client, _ in _client(tmp_path / "g", settings, graph):
        status, doc = _infer(client, {"inputs": [{"name": "input-0", "shape": [2, 3], "datatype": "FP64",
                                                  "data": [1, 2, 3, 4, 5, 6]}]})
        assert (status, doc) == (422, {"error": "node 'strict' refused the input: need 4 features"})
        status, doc = _infer(client)
        assert status == 200 and doc["outputs"][0]["data"] == [0, 1]
        # A transformer that passes the request's array on as it is made nothing: the model below still checks the
        # request's own tensor, and what it refuses of it is still the client's fault.
        status, doc = _infer(client, {"inputs": [{**REQUEST["inputs"][0], "name": "zzz"}]})
        assert (status, doc) == (422, {"error": "model node 'logreg': unknown input 'zzz'; the model takes input-0"})
        header = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                           "parameters": {"binary_data_size": 32}}]})
        response = client.post("/v2/models/g/infer", content=header + np.array([np.nan, 1, 2, 3]).tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
        assert response.status_code == 422, response.text
        assert response.json()["error"].startswith("model 'logreg' refused the input: ")


@pytest.mark.parametrize(("kind", "message"), [
    ("none", "node 'm' failed: returned None for output 'predict'; return an array"),
    ("ragged", "node 'm' failed: returned output 'predict' that is not a rectangular array (ValueError: "),
    ("pair", "node 'm' failed: returned output 'predict' that is not a rectangular array (ValueError: "),
    ("object", "node 'm' failed: returned output 'predict' holding object values (<object"),
    ("dicts", "node 'm' failed: returned output 'predict' holding dict values ({'label': 'a', 'p': 0.3}), which "
              "no V2 datatype carries"),
    ("mapping", "node 'm' failed: returned output 'label' holding NoneType values (None)"),
])
def test_an_answer_the_protocol_cannot_carry_is_a_node_error_naming_the_node(
        tmp_path: Path, settings: Settings, kind: str, message: str) -> None:
    # Ragged answers were a 500 "internal error: ValueError" naming nothing; None, objects and dicts were a 200
    # with their Python reprs as strings. The node named is the one that answered, below the root.
    graph = {"name": "pass", "type": "TRANSFORMER", "implementation": "nodes.py:Strict", "children": [
        {"name": "m", "type": "MODEL", "implementation": "nodes.py:Answer", "parameters": {"kind": kind}}]}
    for client, _ in _client(tmp_path / "g", settings, graph):
        status, doc = _infer(client)
        assert status == 500 and doc["error"].startswith(message), doc


@pytest.mark.parametrize(("choice", "kind", "status"), [
    (1, "int", 200), (1, "np.int64", 200), (True, "bool", 500), (1.7, "float", 500), ("1", "str", 500),
    (1.0, "np.float64", 500), (True, "np.bool", 500),
])
def test_a_router_must_return_an_integer(tmp_path: Path, settings: Settings, choice: Any, kind: str,
                                         status: int) -> None:
    # True, 1.7 and "1" all routed to child 1: a bandit's probability or a "use the challenger" flag was truncated.
    graph = {"name": "r", "type": "ROUTER", "implementation": "nodes.py:Route",
             "parameters": {"choice": choice, "kind": kind}, "children": [
                 {"name": "c0", "implementation": "nodes.py:Const", "parameters": {"value": 0}},
                 {"name": "c1", "implementation": "nodes.py:Const", "parameters": {"value": 1}}]}
    for client, _ in _client(tmp_path / "g", settings, graph):
        got, doc = _infer(client)
        assert got == status, doc
        if status == 200:
            assert doc["outputs"][0]["data"] == [1, 1] and doc["parameters"]["routing"] == {"r": 1}
        else:
            assert doc["error"].startswith("node 'r' failed: route() must return a child index (an int) or -1, "
                                           "returned "), doc


def test_a_failing_send_feedback_does_not_stop_the_others_nor_fail_stored_feedback(
        tmp_path: Path, settings: Settings) -> None:
    # The router's hook raised: the client got a 500 (so it sent again, and got a 409: the feedback was stored), and
    # the child that answered was never told.
    graph = {"name": "r", "type": "ROUTER", "implementation": "nodes.py:Broken",
             "children": [{"name": "c", "implementation": "nodes.py:Const"}]}
    for client, plane in _client(tmp_path / "g", settings, graph):
        status, doc = _infer(client, {**REQUEST, "id": "q1"})
        assert status == 200, doc
        told = client.post("/v2/models/g/feedback", json={"id": "q1", "reward": 1.0})
        assert told.status_code == 200, told.text
        assert told.json() == {"id": "q1", "stored": True, "nodes_told": 1,
                               "nodes_failed": {"r": "RuntimeError: bandit store down"}}
        graph_ = plane.models["g"].graph
        assert graph_ is not None and graph_.nodes["c"].obj.rewards == [1.0]
        again = client.post("/v2/models/g/feedback", json={"id": "q1", "reward": 1.0})
        assert again.status_code == 409  # stored once: the 200 told the client so


TEXT_NODES_GRAPHS = [
    {"name": "r", "type": "ROUTER", "implementation": "nodes.py:Route", "children": ["MODEL"]},
    {"name": "c", "type": "COMBINER", "implementation": "nodes.py:First", "children": ["MODEL"]},
    {"name": "o", "type": "OUTPUT_TRANSFORMER", "implementation": "nodes.py:Same", "children": ["MODEL"]},
]


@pytest.mark.parametrize("above", TEXT_NODES_GRAPHS, ids=["router", "combiner", "output-transformer"])
def test_a_registered_model_below_routers_combiners_and_output_transformers_gets_the_named_tensors(
        tmp_path: Path, settings: Settings, above: dict[str, Any]) -> None:
    # The model got the request's one tensor as a bare array: a model of a one-column frame (a text pipeline) refused
    # it with a 422 blaming the client, and a tensor of another name or datatype reached the model unchecked.
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from skyloop.registry import log_model

    frame = pd.DataFrame({"text": ["good movie", "bad movie", "great film", "awful film"]})
    clf = make_pipeline(ColumnTransformer([("t", TfidfVectorizer(), "text")]), LogisticRegression())
    clf.fit(frame, [1, 0, 1, 0])
    log_model(clf, "sent", input_example=frame, settings=settings)
    graph = {**above, "children": [{"name": "sent", "type": "MODEL", "model_uri": "models:/sent/1"}]}
    for client, _ in _client(tmp_path / "g", settings, graph):
        text = ["good film", "awful movie"]
        status, doc = _infer(client, {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": text}]})
        assert status == 200, doc
        assert doc["outputs"][0]["data"] == clf.predict(pd.DataFrame({"text": text})).tolist()
        status, doc = _infer(client, {"inputs": [{"name": "zzz", "shape": [2], "datatype": "BYTES", "data": text}]})
        assert (status, doc) == (422, {"error": "model node 'sent': unknown input 'zzz'; the model takes text"})


def test_a_registered_model_below_a_router_checks_the_datatype(tmp_path: Path, settings: Settings,
                                                              iris_uri: str) -> None:
    graph = {"name": "r", "type": "ROUTER", "implementation": "nodes.py:Route", "children": [IRIS]}
    for client, _ in _client(tmp_path / "g", settings, graph):
        status, doc = _infer(client)
        assert status == 200 and doc["outputs"][0]["data"] == [0, 1], doc
        status, doc = _infer(client, {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "BYTES",
                                                  "data": ["a"] * 8}]})
        assert (status, doc) == (422, {"error": "model node 'logreg': input 'input-0' must be FP64, got BYTES"})
        # Values the model refuses in the request's own tensors (NaN, which only binary data carries): still the
        # client's fault.
        header = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                           "parameters": {"binary_data_size": 32}}]})
        response = client.post("/v2/models/g/infer", content=header + np.array([np.nan, 1, 2, 3]).tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
        assert response.status_code == 422, response.text
        assert response.json()["error"].startswith("model 'logreg' refused the input: ")
