"""Inference graphs with real user classes and a registered model, through the in-process app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from starlette.testclient import TestClient

from skyloop.config import Settings
from skyloop.errors import SpecError
from skyloop.serving import DataPlane, create_app, load_serve_spec
from skyloop.serving.graph import load_graph


def _spec(folder: Path, doc: dict[str, Any]) -> Path:
    path = folder / "graph.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _client(spec_file: Path, settings: Settings) -> Iterator[tuple[TestClient, DataPlane]]:
    plane = DataPlane([load_serve_spec(spec_file)], settings)
    with TestClient(create_app(plane)) as client:
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/v2/health/ready").json()
            time.sleep(0.02)
        yield client, plane


def _infer(client: TestClient, name: str, rows: np.ndarray[Any, Any], **extra: Any) -> Any:
    body = {"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64",
                        "data": rows.reshape(-1).tolist()}], **extra}
    return client.post(f"/v2/models/{name}/infer", json=body)


ENSEMBLE = {
    "name": "ensemble",
    "graph": {"name": "scale", "type": "TRANSFORMER", "implementation": "nodes.py:Scale",
              "parameters": {"factor": 1.0},
              "children": [{"name": "vote", "type": "COMBINER", "implementation": "nodes.py:Vote", "children": [
                  {"name": "logreg", "type": "MODEL", "model_uri": "models:/iris@champion"},
                  {"name": "also-logreg", "type": "MODEL", "model_uri": "models:/iris/1"},
                  {"name": "always-two", "type": "MODEL", "implementation": "nodes.py:Constant",
                   "parameters": {"label": 2}}]}]},
}


def test_transformer_combiner_and_models_answer_like_in_process(
        nodes_dir: Path, settings: Settings, iris_uri: str, iris: tuple[Any, Any]) -> None:
    clf, X = iris
    for client, _ in _client(_spec(nodes_dir, ENSEMBLE), settings):
        response = _infer(client, "ensemble", X[:40], id="req-7")
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["id"] == "req-7" and doc["model_name"] == "ensemble"
        # Two of three voters are the registered model, so the vote is its answer.
        assert doc["outputs"][0]["data"] == clf.predict(X[:40]).tolist()
        assert response.headers["skyloop-model-version"] == "ensemble/1"
        metrics = client.get("/metrics").text
        for node in ("scale", "vote", "logreg", "also-logreg", "always-two"):
            assert f'skyloop_graph_node_seconds_count{{model="ensemble",node="{node}"}} 1.0' in metrics


COLUMN_NODES = '''
import numpy as np


class ScaleColumns:
    """TRANSFORMER: scales every column of the request (a mapping of named columns)."""

    def __init__(self, factor=1.0):
        self.factor = factor

    def transform_input(self, X):
        return {name: np.asarray(values) * self.factor for name, values in X.items()}


class Mean:
    """COMBINER: the mean of its children's answers."""

    def aggregate(self, answers):
        return np.mean([np.asarray(a, dtype=float) for a in answers], axis=0)
'''


def test_a_model_of_a_table_below_a_transformer_gets_the_columns_as_its_frame(
        tmp_path: Path, settings: Settings) -> None:
    # The README's graph, with a model logged from a DataFrame: the transformer at the root gets the request's
    # columns as a mapping and passes one on. The models below got that mapping, which scikit-learn refused
    # ("Expected 2D array, got scalar array"), blaming the client with a 422.
    import pandas as pd
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    from skyloop.registry import log_model

    frame, y = load_iris(return_X_y=True, as_frame=True)
    logreg = LogisticRegression(max_iter=500).fit(frame, y)
    tree = DecisionTreeClassifier(random_state=0).fit(frame, y)
    log_model(logreg, "iris-frame", input_example=frame.head(3), settings=settings)
    log_model(tree, "iris-frame-tree", input_example=frame.head(3), settings=settings)
    (tmp_path / "cols.py").write_text(COLUMN_NODES)
    doc = {"name": "ensemble", "graph": {
        "name": "scale", "type": "TRANSFORMER", "implementation": "cols.py:ScaleColumns", "parameters": {"factor": 2.0},
        "children": [{"name": "mean", "type": "COMBINER", "implementation": "cols.py:Mean", "children": [
            {"name": "logreg", "type": "MODEL", "model_uri": "models:/iris-frame/1"},
            {"name": "tree", "type": "MODEL", "model_uri": "models:/iris-frame-tree/1"}]}]}}
    rows = frame.iloc[[0, 60, 120]]
    for client, _ in _client(_spec(tmp_path, doc), settings):
        body = {"inputs": [{"name": c, "shape": [3], "datatype": "FP64", "data": rows[c].tolist()}
                           for c in frame.columns]}
        response = client.post("/v2/models/ensemble/infer", json=body)
        assert response.status_code == 200, response.text
        scaled = pd.DataFrame(rows.to_numpy() * 2.0, columns=frame.columns)
        expected = (logreg.predict(scaled) + tree.predict(scaled)) / 2
        assert response.json()["outputs"][0]["data"] == pytest.approx(expected.tolist())
        # A column the transformer did not pass on is named, with the node that missed it and the model below it:
        # what one node of the graph made for another is the graph's fault (a 500), not the client's.
        body["inputs"] = body["inputs"][1:]
        response = client.post("/v2/models/ensemble/infer", json=body)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error.startswith("node 'logreg' failed: what node 'scale' gave it does not fit"), error
        assert "sepal length (cm)" in error


def test_router_sends_to_one_child_and_feedback_reaches_it(nodes_dir: Path, settings: Settings) -> None:
    doc = {"name": "routed", "graph": {
        "name": "pick", "type": "ROUTER", "implementation": "nodes.py:Pick", "parameters": {"child": 1},
        "children": [{"name": "zero", "implementation": "nodes.py:Constant", "parameters": {"label": 0}},
                     {"name": "one", "type": "OUTPUT_TRANSFORMER", "implementation": "nodes.py:Label",
                      "children": [{"name": "inner", "implementation": "nodes.py:Constant",
                                    "parameters": {"label": 1}}]}]}}
    for client, plane in _client(_spec(nodes_dir, doc), settings):
        response = _infer(client, "routed", np.ones((3, 4)))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["outputs"] == [{"name": "label", "shape": [3], "datatype": "BYTES",
                                    "data": ["versicolor"] * 3}]
        assert body["parameters"]["routing"] == {"pick": 1}
        told = client.post("/v2/models/routed/feedback", json={"id": body["id"], "reward": 1.0})
        assert told.status_code == 200 and told.json()["nodes_told"] == 1
        graph = plane.models["routed"].graph
        assert graph is not None and graph.nodes["pick"].obj.rewards == [(1, 1.0)]
        from skyloop.store.feedback import list_feedback
        from skyloop.store.workspace import Workspace

        workspace = Workspace.open(settings)
        try:
            with workspace.db.read() as session:
                stored = list_feedback(session, "routed")
        finally:
            workspace.close()
        assert [(f.inference_id, f.reward, f.truth) for f in stored] == [(body["id"], 1.0, None)]


def test_a_failing_user_node_is_a_500_with_its_message_and_the_next_request_works(
        nodes_dir: Path, settings: Settings) -> None:
    doc = {"name": "boom", "graph": {"name": "boom", "implementation": "nodes.py:Boom"}}
    for client, _ in _client(_spec(nodes_dir, doc), settings):
        bad = _infer(client, "boom", -np.ones((1, 2)))
        assert bad.status_code == 500
        assert bad.json() == {"error": "node 'boom' failed: ValueError: negative features are not allowed"}
        good = _infer(client, "boom", np.ones((2, 2)))
        assert good.status_code == 200 and good.json()["outputs"][0]["data"] == [2.0, 2.0]


def test_bytes_in_and_out_through_a_user_model(nodes_dir: Path, settings: Settings) -> None:
    doc = {"name": "echo", "graph": {"name": "echo", "implementation": "nodes.py:Echo"}}
    for client, _ in _client(_spec(nodes_dir, doc), settings):
        body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["héllo", "v2"]}]}
        response = client.post("/v2/models/echo/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0] == {"name": "predict", "shape": [2], "datatype": "BYTES",
                                                 "data": ["HÉLLO", "V2"]}


@pytest.mark.parametrize(("graph", "message"), [
    ({"name": "t", "type": "TRANSFORMER", "implementation": "nodes.py:Constant"},
     "a TRANSFORMER needs a transform_input"),
    ({"name": "m", "implementation": "nodes.py:Nope"}, "has no 'Nope'"),
    ({"name": "m", "implementation": "missing.py:Nope"}, "does not exist"),
    ({"name": "m", "implementation": "nodes.py:Scale", "type": "TRANSFORMER", "parameters": {"bad": 1}},
     "failed to start: TypeError"),
])
def test_broken_nodes_are_refused_at_load(nodes_dir: Path, settings: Settings, graph: dict[str, Any],
                                          message: str) -> None:
    spec = load_serve_spec(_spec(nodes_dir, {"name": "g", "graph": graph}))
    with pytest.raises(SpecError, match=message):
        load_graph(spec, settings)


@pytest.mark.parametrize(("doc", "message"), [
    ({"name": "g", "graph": {"name": "m"}}, "says nothing to run"),
    ({"name": "g", "graph": {"name": "c", "type": "COMBINER", "implementation": "x.py:C"}}, "needs children"),
    ({"name": "g", "graph": {"name": "t", "type": "TRANSFORMER", "implementation": "x.py:T", "children": [
        {"name": "a", "implementation": "x.py:A"}, {"name": "b", "implementation": "x.py:B"}]}},
     "put a COMBINER or ROUTER above them"),
    ({"name": "g", "graph": {"name": "a", "type": "COMBINER", "implementation": "x.py:C", "children": [
        {"name": "a", "implementation": "x.py:A"}]}}, "'a' appears more than once"),
    ({"name": "g", "graph": {"name": "m", "model_uri": "models:/x", "implementation": "x.py:A"}}, "not both"),
    ({"name": "g", "graph": {"name": "m", "implementation": "x.py:A"}, "batching": {"max_batch_time": "soon"}},
     "max_batch_time"),
    ({"name": "g", "graph": {"name": "m", "type": "MODLE", "implementation": "x.py:A"}}, "graph.type"),
    ({"name": "g", "version": "iris/1", "graph": {"name": "m", "implementation": "x.py:A"}},
     "version: 'iris/1' cannot be named in a /v2/models/NAME/versions/VERSION path"),
])
def test_invalid_specs_name_the_field_and_the_fix(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_serve_spec(_spec(tmp_path, doc))
