"""Feedback on a real `skyloop serve`: each answer takes one truth and one reward, held by the DB across
worker processes and restarts, and never counted twice."""

from __future__ import annotations

import urllib.request
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests_support import at_once, post

from skyloop.config import Settings
from skyloop.store.feedback import list_feedback
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration


def _post(port: int, path: str, doc: Any) -> tuple[int, Any]:
    return post(f"http://127.0.0.1:{port}{path}", orjson.dumps(doc))


def _answer(port: int, X: np.ndarray[Any, Any]) -> str:
    status, doc = _post(port, "/v2/models/iris/infer", {"inputs": [
        {"name": "input-0", "shape": list(X.shape), "datatype": "FP64", "data": X.reshape(-1).tolist()}]})
    assert status == 200, doc
    return str(doc["id"])


def _feedback_counted(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["kind"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "skyloop_feedback_total" and s.labels.get("model") == "iris"}


def test_each_answer_takes_one_truth_and_one_reward(serve: Any, settings: Settings, iris_uri: str,
                                                    iris: tuple[Any, Any]) -> None:
    _, X = iris
    feedback = "/v2/models/iris/feedback"
    with serve(settings, iris_uri, workers=2) as (_, port):
        first = _answer(port, X[:1])
        assert _post(port, feedback, {"id": first, "truth": 0})[0] == 200
        for repeat in ({"id": first, "truth": 0}, {"id": first, "truth": 2}, {"id": first, "truth": 1, "reward": 1}):
            status, doc = _post(port, feedback, repeat)
            assert (status, doc) == (409, {"error": f"feedback for inference id {first!r} was already recorded; "
                                                    "each answer takes one truth"}), repeat
        # A reward is a separate signal (a click now, a label later): it may come once, apart from the truth.
        assert _post(port, feedback, {"id": first, "reward": 1.0})[0] == 200
        status, doc = _post(port, feedback, {"id": first, "reward": 0.0})
        assert (status, doc) == (409, {"error": f"feedback for inference id {first!r} was already recorded; "
                                                "each answer takes one reward"})

        # Posted at the same moment, to either worker process: one is taken, the others are refused.
        second = _answer(port, X[60:61])
        statuses = at_once(8, lambda _: _post(port, feedback, {"id": second, "truth": 1})[0])
        assert sorted(statuses) == [200] + [409] * 7
        assert _feedback_counted(port) == {"truth": 2.0, "reward": 1.0}  # summed over the workers

    # The DB holds the rule across a restart (the answers themselves are forgotten).
    with serve(settings, iris_uri) as (_, port):
        status, doc = _post(port, feedback, {"id": second, "truth": 2})
        assert status == 409 and "each answer takes one truth" in doc["error"]
        assert _post(port, feedback, {"id": second, "reward": 0.5})[0] == 200
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            rows = {(row.inference_id, row.truth, row.reward) for row in list_feedback(session, "iris")}
    finally:
        workspace.close()
    assert rows == {(first, 0, 1.0), (second, 1, 0.5)}
