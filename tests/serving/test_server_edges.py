"""Answers at the edges of the protocol: outputs it cannot carry, integers past int64, columns of one table."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from starlette.testclient import TestClient
from tests_support import post, write

from skyloop.config import Settings
from skyloop.serving import DataPlane, create_app, load_serve_spec

NODES = '''
import numpy as np


class Returns:
    """MODEL that answers its input converted to `dtype` (and `fill`, if given, in every place)."""

    def __init__(self, dtype="float64", fill=None):
        self.dtype, self.fill = dtype, fill

    def predict(self, X):
        X = np.asarray(X)
        return np.full(X.shape, self.fill, dtype=self.dtype) if self.fill is not None else X.astype(self.dtype)


class Echo:
    """MODEL that answers its input as it came."""

    def predict(self, X):
        return np.asarray(X)
'''

MODELS = {
    "complex": {"implementation": "nodes.py:Returns", "parameters": {"dtype": "complex128"}},
    "datetime": {"implementation": "nodes.py:Returns", "parameters": {"dtype": "datetime64[D]"}},
    "longdouble": {"implementation": "nodes.py:Returns", "parameters": {"dtype": "longdouble"}},
    "big-endian": {"implementation": "nodes.py:Returns", "parameters": {"dtype": ">f8"}},
    "big-endian-ints": {"implementation": "nodes.py:Returns", "parameters": {"dtype": ">i4"}},
    "nan": {"implementation": "nodes.py:Returns", "parameters": {"fill": "nan"}},
    "inf": {"implementation": "nodes.py:Returns", "parameters": {"dtype": "float32", "fill": "-inf"}},
    "echo": {"implementation": "nodes.py:Echo"},
}


@pytest.fixture
def client(tmp_path: Path, settings: Settings) -> Iterator[TestClient]:
    """The serving app over one served model per entry of MODELS, loaded."""
    write(tmp_path / "graph" / "nodes.py", NODES)
    specs = []
    for name, node in MODELS.items():
        path = tmp_path / "graph" / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "graph": {"name": "model", **node}}))
        specs.append(load_serve_spec(path))
    with TestClient(create_app(DataPlane(specs, settings))) as client:
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/v2/health/ready").json()
            time.sleep(0.02)
        yield client


def _infer(client: TestClient, model: str, data: list[Any], datatype: str = "FP64", binary: bool = False) -> Any:
    body = {"inputs": [{"name": "x", "shape": [len(data)], "datatype": datatype, "data": data}]}
    if binary:
        body["parameters"] = {"binary_data_output": True}
    return client.post(f"/v2/models/{model}/infer", json=body)


@pytest.mark.parametrize(("model", "dtype"), [
    ("complex", "complex128"), ("datetime", "datetime64[D]"),
    pytest.param("longdouble", str(np.dtype(np.longdouble)), marks=pytest.mark.skipif(
        np.dtype(np.longdouble).itemsize == 8, reason="long double is float64 on this platform")),
])
@pytest.mark.parametrize("binary", [False, True])
def test_an_output_no_datatype_carries_is_a_server_error_naming_the_model(client: TestClient, model: str, dtype: str,
                                                                          binary: bool) -> None:
    response = _infer(client, model, [1.0, 2.0], binary=binary)
    assert response.status_code == 500
    assert response.json() == {"error": f"model {model!r} returned output 'predict' of dtype {dtype}, which no V2 "
                                        "datatype carries; return booleans, integers, floats (16, 32 or 64 bits) or "
                                        "strings"}
    assert _infer(client, "echo", [1.0]).status_code == 200  # and the server keeps serving


@pytest.mark.parametrize(("model", "datatype", "data", "packed"), [
    ("big-endian", "FP64", [1.5, -2.0], struct.pack("<2d", 1.5, -2.0)),
    ("big-endian-ints", "INT32", [1, -2], struct.pack("<2i", 1, -2)),
])
def test_a_big_endian_output_is_sent_as_its_datatype(client: TestClient, model: str, datatype: str,
                                                     data: list[Any], packed: bytes) -> None:
    response = _infer(client, model, data)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0] == {"name": "predict", "shape": [2], "datatype": datatype, "data": data}
    binary = _infer(client, model, data, binary=True)
    length = int(binary.headers["inference-header-content-length"])
    assert orjson.loads(binary.content[:length])["outputs"][0]["datatype"] == datatype
    assert binary.content[length:] == packed  # little-endian on the wire, as the extension says


@pytest.mark.parametrize(("model", "value", "packed"), [
    ("nan", "NaN", struct.pack("<d", float("nan"))), ("inf", "-Infinity", struct.pack("<f", float("-inf"))),
])
def test_nan_or_infinity_in_a_json_output_is_a_server_error_and_binary_carries_it(
        client: TestClient, model: str, value: str, packed: bytes) -> None:
    response = _infer(client, model, [1.0, 2.0])
    assert response.status_code == 500
    error = response.json()["error"]
    assert error.startswith(f"model {model!r} returned NaN or infinity in output 'predict', which JSON cannot carry; "
                            "ask for it as binary data")
    binary = _infer(client, model, [1.0, 2.0], binary=True)
    assert binary.status_code == 200
    length = int(binary.headers["inference-header-content-length"])
    assert binary.content[length:] == packed * 2


@pytest.mark.parametrize(("datatype", "data"), [
    ("UINT64", [1, 2**64 - 1]), ("UINT64", [0, 2**63]), ("INT64", [-1, 2**63 - 1, -(2**63)]),
])
def test_integers_past_int64_reach_the_model_exactly(client: TestClient, datatype: str, data: list[int]) -> None:
    response = _infer(client, "echo", data, datatype)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == data
    assert response.json()["outputs"][0]["datatype"] == datatype


@pytest.mark.parametrize(("datatype", "data", "message"), [
    ("INT64", [-1, 2**63], "a value is outside the range of INT64 [-9223372036854775808, 9223372036854775807]"),
    ("UINT64", [-1, 2**64 - 1], "a value is outside the range of UINT64 [0, 18446744073709551615]"),
    ("UINT64", [2**64 - 1, 1.5], "UINT64 data must be integers, got floating-point values"),
])
def test_integers_that_do_not_fit_are_named(client: TestClient, datatype: str, data: list[Any],
                                            message: str) -> None:
    response = _infer(client, "echo", data, datatype)
    assert (response.status_code, response.json()) == (400, {"error": f"input 'x': {message}"})


@pytest.mark.integration
def test_a_model_that_selects_columns_by_name_is_served_from_a_frame_of_one_dtype(serve: Any,
                                                                                   settings: Settings) -> None:
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skyloop.registry import log_model

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=50), "b": rng.normal(size=50), "c": rng.normal(size=50)})
    pipe = make_pipeline(ColumnTransformer([("s", StandardScaler(), ["a", "b"])]), LogisticRegression())
    pipe.fit(frame, (frame.a > 0).astype(int))
    log_model(pipe, "ct", input_example=frame.head(5), reference=frame, settings=settings)
    # And a single column: still a frame for the model, not a bare 1-D array.
    one = make_pipeline(ColumnTransformer([("s", StandardScaler(), ["a"])]), LogisticRegression())
    log_model(one.fit(frame[["a"]], (frame.a > 0).astype(int)), "one", input_example=frame[["a"]].head(2),
              settings=settings)
    rows = frame.head(4)
    with serve(settings, "models:/ct/1", "models:/one/1") as (_, port):
        status, doc = post(f"http://127.0.0.1:{port}/v2/models/ct/infer", orjson.dumps({"inputs": [
            {"name": c, "shape": [4], "datatype": "FP64", "data": rows[c].tolist()} for c in "abc"]}))
        assert status == 200, doc
        assert doc["outputs"][0]["data"] == pipe.predict(rows).tolist()
        status, doc = post(f"http://127.0.0.1:{port}/v2/models/one/infer", orjson.dumps({"inputs": [
            {"name": "a", "shape": [4], "datatype": "FP64", "data": rows["a"].tolist()}]}))
        assert status == 200, doc
        assert doc["outputs"][0]["data"] == one.predict(rows[["a"]]).tolist()
    # Drift compares payload columns (one per input) with the reference: the same names.
    reference = pd.read_parquet(settings.home / "models" / "ct" / "1" / "reference.parquet")
    assert reference.columns.tolist() == ["a", "b", "c"]


@pytest.mark.integration
def test_columns_of_different_lengths_are_refused_naming_both(serve: Any, settings: Settings) -> None:
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model

    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "b": [1, 0, 1, 0]})
    log_model(LogisticRegression().fit(frame, [0, 1, 0, 1]), "cols", input_example=frame.head(2), settings=settings)

    def infer(a: list[float], b: list[int]) -> tuple[int, Any]:
        return post(f"http://127.0.0.1:{port}/v2/models/cols/infer", orjson.dumps({"inputs": [
            {"name": "a", "shape": [len(a)], "datatype": "FP64", "data": a},
            {"name": "b", "shape": [len(b)], "datatype": "INT64", "data": b}]}))

    with serve(settings, "models:/cols/1") as (_, port):
        status, doc = infer([0.0, 1.0], [1, 0])
        assert status == 200 and len(doc["outputs"][0]["data"]) == 2
        assert infer([0.0, 1.0], [1, 0, 1]) == (422, {
            "error": "inputs 'a' and 'b' are columns of one table and need the same length; 'a' has 2 values, "
                     "'b' has 3"})
        status, doc = infer([2.0, 3.0, 1.0], [1, 0, 0])  # and the server keeps serving
        assert status == 200 and len(doc["outputs"][0]["data"]) == 3
