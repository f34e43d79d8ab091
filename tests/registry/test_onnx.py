"""The onnx flavor on a real onnxruntime: the graphs are written here byte by byte (no `onnx` package needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skyloop import Settings
from skyloop.registry import load_model, log_model

pytest.importorskip("onnxruntime")


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _float_input(name: str, width: int) -> bytes:
    """A ValueInfoProto: a float32 tensor of shape [N, width]."""
    dims = _field(1, _field(2, b"N")) + _field(1, _field(1, width))
    return _field(1, name.encode()) + _field(2, _field(1, _field(1, 1) + _field(2, dims)))


def _graph(op: str, inputs: list[tuple[str, int]], width: int) -> bytes:
    """A ModelProto whose one node computes `op(*inputs)` into a float32 [N, width] output `y`."""
    node = b"".join(_field(1, n.encode()) for n, _ in inputs) + _field(2, b"y") + _field(4, op.encode())
    declared = dict(inputs)  # each graph input once, however often the node reads it
    graph = (_field(1, node) + _field(2, b"g") + b"".join(_field(11, _float_input(n, w)) for n, w in declared.items())
             + _field(12, _float_input("y", width)))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 13))  # IR 8, opset 13


@pytest.fixture
def doubler(tmp_path: Path) -> Path:
    path = tmp_path / "double.onnx"
    path.write_bytes(_graph("Add", [("x", 2), ("x", 2)], 2))  # x + x over a float32 [N, 2]
    return path


def test_float64_lists_and_frames_reach_a_float32_graph(doubler: Path, settings: Settings) -> None:
    X = np.array([[1.0, 2.0], [3.0, 4.5]])  # numpy's float64, as every user has it
    info = log_model(doubler, "double", input_example=X, settings=settings)  # predicts on it: no dtype error
    assert info.flavor == "onnx"
    assert info.manifest.signature is not None and info.manifest.signature.outputs[0].datatype == "FP32"
    model = load_model(info.uri, settings=settings)
    for data in (X, X.tolist(), pd.DataFrame(X), X.astype(np.float32), {"x": X}):
        got = model.predict(data)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, 2 * X)
    np.testing.assert_array_equal(model.predict([[1, 2]]), [[2.0, 4.0]])  # ints: the same kind of number


def test_a_frame_feeds_a_graph_of_one_input_per_column(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "sum.onnx"
    path.write_bytes(_graph("Add", [("a", 1), ("b", 1)], 1))  # skl2onnx's shape for a frame: one [N, 1] per column
    info = log_model(path, "sum", settings=settings)
    frame = pd.DataFrame({"b": [10.0, 20.0], "a": [1.0, 2.0]})
    np.testing.assert_array_equal(load_model(info.uri, settings=settings).predict(frame), [[11.0], [22.0]])
