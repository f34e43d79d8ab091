"""Open Inference Protocol points: one answer however a request is encoded, binary outputs, exact datatypes, ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from starlette.testclient import TestClient

from skyloop.config import Settings
from skyloop.errors import SignatureMismatch
from skyloop.registry.package import TensorSpec

ROW = [5.1, 3.5, 1.4, 0.2]


def _infer(client: TestClient, **doc: Any) -> Any:
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}], **doc}
    return client.post("/v2/models/iris/infer", json=body)


@pytest.mark.integration
def test_bytes_reach_the_model_alike_as_json_and_as_binary(serve: Any, settings: Settings, nodes_dir: Path) -> None:
    # tritonclient sends binary data by default: BYTES elements reached the model as bytes where JSON gave it str, so
    # a model trained on strings took b"red" for an unknown colour, and answered wrongly with a 200.
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from sklearn.tree import DecisionTreeClassifier

    from skyloop.registry import log_model

    frame = pd.DataFrame({"color": ["red", "blue"] * 20, "x": [0.0, 1.0] * 20})
    clf = make_pipeline(ColumnTransformer([("c", OneHotEncoder(handle_unknown="ignore"), ["color"])]),
                        DecisionTreeClassifier(random_state=0)).fit(frame, [1, 0] * 20)
    log_model(clf, "colors", input_example=frame, settings=settings)
    (nodes_dir / "echo.yaml").write_text("name: echo\ngraph: {name: echo, implementation: nodes.py:Echo}\n")
    with serve(settings, "models:/colors/1", str(nodes_dir / "echo.yaml")) as (_, port):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            answers = []
            for binary in (False, True):
                color = triton.InferInput("color", [3], "BYTES")
                color.set_data_from_numpy(np.array(["red", "blue", "héllo"], dtype=object), binary_data=binary)
                x = triton.InferInput("x", [3], "FP64")
                x.set_data_from_numpy(np.zeros(3), binary_data=binary)
                colors = client.infer("colors", [color, x]).as_numpy("predict")
                text = triton.InferInput("text", [2], "BYTES")
                text.set_data_from_numpy(np.array(["hello", "héllo"], dtype=object), binary_data=binary)
                echo = client.infer("echo", [text]).as_numpy("predict")
                answers.append((colors.tolist(), echo.tolist()))
            assert answers[0] == answers[1]
            assert answers[0][0][:2] == [1, 0] and answers[0][1] == [b"HELLO", "HÉLLO".encode()]
        finally:
            client.close()


def test_listed_outputs_without_binary_data_follow_binary_data_output(client: TestClient) -> None:
    # Once the request listed its outputs, binary_data_output was ignored: every output came back as JSON.
    response = _infer(client, parameters={"binary_data_output": True}, outputs=[{"name": "predict"}])
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    result = triton.InferResult.from_response_body(response.content, header_length=length)
    assert result.as_numpy("predict").tolist() == [0]
    assert "data" not in orjson.loads(response.content[:length])["outputs"][0]
    # The output's own binary_data overrides it.
    response = _infer(client, parameters={"binary_data_output": True},
                      outputs=[{"name": "predict", "parameters": {"binary_data": False}}])
    assert "inference-header-content-length" not in response.headers
    assert response.json()["outputs"][0]["data"] == [0]


@pytest.mark.parametrize(("tensor", "message"), [
    ({"datatype": "BOOL", "data": [True, False, True, True]}, "input 'input-0' must be FP64, got BOOL"),
    ({"datatype": "INT64", "data": [2**53 + 1, 0, 0, 0]},
     "input 'input-0' must be FP64, got INT64 with a value beyond 2**53 in magnitude, which FP64 cannot hold "
     "exactly; send FP64 values"),
    ({"datatype": "UINT64", "data": [2**64 - 1, 0, 0, 0]},
     "input 'input-0' must be FP64, got UINT64 with a value beyond 2**53 in magnitude"),
])
def test_a_datatype_is_converted_only_where_no_value_changes(client: TestClient, tensor: dict[str, Any],
                                                             message: str) -> None:
    # numpy's "safe" casting let True become 1.0, and 2**53 + 1 become 2**53, with a 200.
    response = client.post("/v2/models/iris/infer", json={"inputs": [{"name": "input-0", "shape": [1, 4], **tensor}]})
    assert response.status_code == 422 and response.json()["error"].startswith(message), response.text
    # Integers that FP64 holds exactly are still taken.
    for datatype in ("INT64", "INT32", "UINT8"):
        response = client.post("/v2/models/iris/infer", json={"inputs": [{"name": "input-0", "shape": [1, 4],
                                                                          "datatype": datatype, "data": [5, 3, 1, 0]}]})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(("sent", "want", "fits"), [
    (np.array([True]), "INT8", False),
    (np.array([1], dtype=np.int8), "FP16", True),
    (np.array([2**24 + 1], dtype=np.int32), "FP32", False),
    (np.array([2**24], dtype=np.int32), "FP32", True),
    (np.array([-(2**53)], dtype=np.int64), "FP64", True),
    (np.array([1], dtype=np.uint32), "INT64", True),
    (np.array([1], dtype=np.uint64), "INT64", False),
    (np.array([1], dtype=np.int64), "UINT64", False),
    (np.array([1.5], dtype=np.float64), "FP32", False),
    (np.array([1.5], dtype=np.float16), "FP64", True),
    (np.array([1.5], dtype=">f8"), "FP64", True),
    (np.array(["a"]), "BYTES", True),
])
def test_the_widening_table(sent: np.ndarray[Any, Any], want: str, fits: bool) -> None:
    from skyloop.serving.signature import check_inputs

    spec = TensorSpec(name="x", datatype=want, shape=[-1])  # type: ignore[arg-type]
    if fits:
        got = check_inputs({"x": sent}, [spec])["x"]
        assert got.tolist() == sent.tolist() and (got.dtype.kind == "O" or got.dtype.isnative)
    else:
        with pytest.raises(SignatureMismatch, match=f"input 'x' must be {want}"):
            check_inputs({"x": sent}, [spec])


def test_an_empty_outputs_list_is_every_output(client: TestClient) -> None:
    # The answer carried no tensor at all.
    response = _infer(client, outputs=[])
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [0], response.text


def test_an_empty_id_is_refused(client: TestClient) -> None:
    # It was replaced by a new id the client did not ask for; echoed, feedback could never name it.
    response = _infer(client, id="")
    assert (response.status_code, response.json()) == (400, {"error": "field 'id' is empty; give the inference a "
                                                                      "non-empty id, or leave 'id' out and the server "
                                                                      "chooses one"})
    assert _infer(client, id="a").json()["id"] == "a"
