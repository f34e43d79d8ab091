"""The V2 codec: JSON and binary tensors in, numpy out, and back; every malformed request named precisely."""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from skyloop.errors import InvalidRequest, OutputError
from skyloop.serving.protocol import (
    Tensor,
    decode_feedback,
    decode_request,
    encode_response,
    header_length,
    output_tensor,
)


def _body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def test_flat_and_nested_data_decode_row_major() -> None:
    flat = decode_request(_body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}))
    nested = decode_request(_body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}))
    for request in (flat, nested):
        (tensor,) = request.inputs
        assert tensor.data.dtype == np.float32
        np.testing.assert_array_equal(tensor.data, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"])
def test_every_datatype_round_trips_through_json_and_binary(datatype: str) -> None:
    values = {"BOOL": [True, False, True, True], "BYTES": ["a", "béta", "", "d"]}.get(datatype, [1, 0, 7, 100])
    request = decode_request(_body({"name": "x", "shape": [2, 2], "datatype": datatype, "data": values}))
    tensor = request.inputs[0]
    assert tensor.shape == [2, 2]
    for binary in (False, True):
        body, header = encode_response("m", "1", "id-1", [tensor], binary={"x"} if binary else None)
        if binary:
            assert header is not None
            doc = orjson.loads(body[:header])
            out = doc["outputs"][0]
            size = out["parameters"]["binary_data_size"]
            assert len(body) == header + size
            # Decode it again as if it were a request: the binary layout is the same both ways.
            request_header = orjson.dumps({"inputs": [{"name": "x", "shape": out["shape"], "datatype": datatype,
                                                       "parameters": {"binary_data_size": size}}]})
            again = decode_request(request_header + body[header:], header_length=len(request_header))
            got = again.inputs[0].data  # BYTES too: the same str values as from JSON
            assert [type(v) for v in got.reshape(-1)] == [type(v) for v in tensor.data.reshape(-1)]
            np.testing.assert_array_equal(got, tensor.data)
        else:
            assert header is None
            doc = orjson.loads(body)
            assert doc["id"] == "id-1" and doc["model_version"] == "1"
            assert doc["outputs"][0]["data"] == [v if datatype != "FP16" else float(v) for v in values]


def test_binary_bytes_elements_are_length_prefixed() -> None:
    payload = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0) + struct.pack("<I", 2) + b"\xff\xfe"
    header = orjson.dumps({"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(payload)}}]})
    tensor = decode_request(header + payload, len(header)).inputs[0]
    # UTF-8 elements are str, as JSON strings are; only bytes that are no text stay bytes.
    assert list(tensor.data) == ["abc", "", b"\xff\xfe"]


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (_body(), "'inputs' is empty"),
    (_body({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}), "needs 4 values, 'data' has 3"),
    (_body({"name": "x", "shape": [2], "datatype": "FP33", "data": [1, 2]}), "unknown datatype 'FP33'"),
    (_body({"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}), "non-negative integers"),
    (_body({"name": "x", "shape": [0, 4], "datatype": "FP64", "data": []}), r"shape \[0, 4\] holds no values"),
    (_body({"name": "x", "shape": [0, 2**62, 2**62], "datatype": "FP64", "data": []}), "a dimension over"),
    (_body({"name": "x", "shape": [2], "datatype": "FP32", "data": [1e300, 1]}), "outside the range of FP32"),
    (_body({"name": "x", "shape": [1], "datatype": "FP16", "data": [1e10]}), "outside the range of FP16"),
    (_body({"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}), "must be numbers, got string"),
    (_body({"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}), "must be integers"),
    (_body({"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}), "outside the range of UINT8"),
    (_body({"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}), "BOOL data must be true/false"),
    (_body({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}), "not a regular"),
    (_body({"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}), "BYTES data must be strings"),
    (_body({"name": "x", "shape": [1], "datatype": "FP32"}), "has no 'data'"),
    (_body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
           {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}), "given twice"),
    (_body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, id=5), "'id' must be a string"),
    (_body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, outputs="y"), "'outputs' must be a list"),
    (_body({"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}),
     "no Inference-Header-Content-Length"),
])
def test_malformed_requests_are_named(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_request(body)


def test_binary_sizes_must_match_the_shape_and_the_body() -> None:
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 8}}]})
    with pytest.raises(InvalidRequest, match="runs past the body"):
        decode_request(header + b"\0" * 4, len(header))
    with pytest.raises(InvalidRequest, match="no input claims"):
        decode_request(header + b"\0" * 12, len(header))
    bad = orjson.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 8}}]})
    with pytest.raises(InvalidRequest, match="needs 12 bytes"):
        decode_request(bad + b"\0" * 8, len(bad))
    with pytest.raises(InvalidRequest, match="outside the body"):
        decode_request(header, len(header) + 10)


def test_requested_outputs_and_binary_output_flag() -> None:
    request = decode_request(_body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                                   outputs=[{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}],
                                   parameters={"binary_data_output": True}))
    assert [(o.name, o.binary) for o in request.outputs or []] == [("a", True), ("b", None)]
    assert request.binary_output
    # An output named without its own binary_data follows binary_data_output; its own setting overrides it.
    assert request.binary("a") and request.binary("b")
    request = decode_request(_body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                                   outputs=[{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
                                   parameters={"binary_data_output": True}))
    assert not request.binary("a") and request.binary("b")


def test_non_utf8_bytes_output_needs_binary() -> None:
    tensor = Tensor("b", "BYTES", np.array([b"\xff"], dtype=object))
    with pytest.raises(OutputError, match="model 'm' returned bytes that are not UTF-8 in output 'b', which JSON "
                                          "cannot carry; ask for it as binary data"):
        encode_response("m", None, None, [tensor])
    body, header = encode_response("m", None, None, [tensor], binary={"b"})
    assert header is not None and body[header:] == struct.pack("<I", 1) + b"\xff"


@pytest.mark.parametrize("raw", ["-1", "+12", "1_0", " 12", "\u00b9", "\u0661\u0662", "12.0", ""])
def test_a_header_length_is_ascii_digits_only(raw: str) -> None:
    # int() takes all of these but the first digits-only check; a replica and the gateway must refuse them alike.
    with pytest.raises(InvalidRequest, match="must be a number of bytes"):
        header_length(raw)


def test_a_header_length_of_digits_is_taken() -> None:
    assert (header_length(None), header_length("0"), header_length("120")) == (None, 0, 120)


def test_feedback_decodes_to_its_kinds() -> None:
    both = decode_feedback(b'{"id": "a", "truth": [[1, 2]], "reward": 1}')
    assert (both.id, both.truth, both.reward, both.kinds) == ("a", [[1, 2]], 1.0, {"truth", "reward"})
    assert both.plain_truth.shape == (1, 2)
    assert decode_feedback(b'{"id": "a", "reward": 0}').kinds == {"reward"}
    assert decode_feedback(b'{"id": "a", "reward": -1e12}').reward == -1e12


@pytest.mark.parametrize("reward", ["1e308", "-1.5e12", "true", '"1"', "[1]"])
def test_a_reward_that_is_not_a_bounded_number_is_refused(reward: str) -> None:
    with pytest.raises(InvalidRequest, match=r"'reward' must be a number between -1e\+12 and 1e\+12"):
        decode_feedback(b'{"id": "a", "reward": ' + reward.encode() + b"}")


@pytest.mark.parametrize(("datatype", "data"), [
    ("UINT64", [1, 2**64 - 1]),
    ("UINT64", [[0, 2**63], [2**64 - 1, 7]]),
    ("INT64", [-(2**63), 2**63 - 1]),
    ("INT64", [[1, 0] * 40, [0, 1] * 40]),  # many values that could have been booleans: each is looked at
])
def test_integer_data_decodes_exactly_as_its_datatype(datatype: str, data: list[Any]) -> None:
    shape = [len(data), len(data[0])] if isinstance(data[0], list) else [len(data)]
    (tensor,) = decode_request(_body({"name": "x", "shape": shape, "datatype": datatype, "data": data})).inputs
    assert tensor.data.dtype == np.dtype(datatype.lower())
    assert tensor.data.tolist() == data


@pytest.mark.parametrize(("datatype", "data", "message"), [
    ("INT64", [-1, 2**63], r"a value is outside the range of INT64 \[-9223372036854775808, 9223372036854775807\]"),
    ("UINT64", [[2**64 - 1], [-1]], r"a value is outside the range of UINT64 \[0, 18446744073709551615\]"),
    ("UINT64", [2**64 - 1, 0.5], "UINT64 data must be integers, got floating-point values"),
    ("INT16", [True, False], "INT16 data must be integers, got boolean values"),
])
def test_integer_data_that_does_not_fit_is_named(datatype: str, data: list[Any], message: str) -> None:
    shape = [len(data), len(data[0])] if isinstance(data[0], list) else [len(data)]
    with pytest.raises(InvalidRequest, match=f"input 'x': {message}"):
        decode_request(_body({"name": "x", "shape": shape, "datatype": datatype, "data": data}))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_go_out_only_as_binary_data(value: float) -> None:
    tensor = Tensor("y", "FP32", np.array([1.0, value], dtype=np.float32))
    with pytest.raises(OutputError, match="model 'm' returned NaN or infinity in output 'y', which JSON cannot carry; "
                                          "ask for it as binary data"):
        encode_response("m", None, None, [tensor])
    body, header = encode_response("m", None, None, [tensor], binary={"y"})
    assert header is not None
    np.testing.assert_array_equal(np.frombuffer(body[header:], "<f4"), tensor.data)


@pytest.mark.parametrize(("dtype", "datatype"), [(">f8", "FP64"), (">i2", "INT16"), (">u8", "UINT64"),
                                                 ("<f4", "FP32"), ("|b1", "BOOL"), (">U3", "BYTES")])
def test_outputs_of_either_byte_order_take_their_datatype(dtype: str, datatype: str) -> None:
    tensor = output_tensor("m", "y", np.array([1, 0, 1]).astype(dtype))
    assert tensor.datatype == datatype
    body, _ = encode_response("m", None, None, [tensor])
    expected = ["1", "0", "1"] if datatype == "BYTES" else [True, False, True] if datatype == "BOOL" else [1, 0, 1]
    assert orjson.loads(body)["outputs"][0]["data"] == expected


@pytest.mark.parametrize("dtype", ["complex64", "datetime64[s]", "timedelta64[ms]"])
def test_an_output_with_no_datatype_is_an_output_error(dtype: str) -> None:
    with pytest.raises(OutputError, match=f"model 'm' returned output 'y' of dtype {re.escape(dtype)}, which no V2 "
                                          "datatype carries"):
        output_tensor("m", "y", np.zeros(2, dtype=dtype))
