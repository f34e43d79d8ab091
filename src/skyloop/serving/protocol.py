"""The Open Inference Protocol (V2) codec: request bytes to numpy tensors and back. No HTTP here.

Both encodings are spoken: plain JSON (`"data": [...]`, nested or flat, row-major) and the binary
tensor extension that `tritonclient` uses by default, where a JSON header of
`Inference-Header-Content-Length` bytes is followed by each binary tensor's raw little-endian bytes
(BYTES elements as a 4-byte little-endian length and the bytes). A BYTES element reaches the model as a `str`
either way: binary elements are decoded as UTF-8, as JSON strings are, so that a model gets the same values
however the client encoded them; only an element that is not UTF-8 stays `bytes`.

A request that breaks the protocol is the client's fault (`InvalidRequest`); an answer that the protocol
cannot carry (a dtype with no V2 datatype; NaN, infinity or non-UTF-8 bytes in JSON) is the model's
(`OutputError`, a server error).

The gateway forwards requests it has only read the header of: it checks them with the same functions
(`header_length`, `request_header`, `decode_feedback`), so that it refuses what a replica refuses, in the same words.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from skyloop.errors import InvalidRequest, OutputError

__all__ = [
    "DTYPES",
    "MAX_ID_LENGTH",
    "MAX_REWARD",
    "FeedbackRequest",
    "InferenceRequest",
    "RequestedOutput",
    "Tensor",
    "datatype_of_array",
    "decode_feedback",
    "decode_request",
    "encode_response",
    "header_length",
    "output_tensor",
    "request_header",
]

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
"""V2 datatype -> the numpy dtype a tensor of it becomes (BYTES: an object array of `str`/`bytes`)."""

MAX_REWARD = 1e12
"""The largest reward (in absolute value) feedback may carry: far beyond any score or amount of money, and far
enough below the float limit that sums of rewards never overflow to infinity (two of 1e308 did)."""

MAX_ID_LENGTH = 200
"""The longest inference id a request or feedback may give: the DB's column holds no more (PostgreSQL refused a
longer one with a server error), and ids are kept in memory (answers remembered for feedback) by the thousand."""

_BY_DTYPE = {dt: name for name, dt in DTYPES.items() if name != "BYTES"}


@dataclass
class Tensor:
    """One named tensor of a request or a response."""

    name: str
    datatype: str
    data: np.ndarray[Any, Any]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        """The tensor's shape."""
        return [int(d) for d in self.data.shape]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool | None = None
    """Its `binary_data` parameter; None when not given: the request's `binary_data_output` decides."""


@dataclass
class InferenceRequest:
    """A decoded inference request."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None
    """None (or an empty list in the request): every output."""
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        """Whether outputs not named in `outputs`, or named without `binary_data`, come back as binary data
        (`binary_data_output`)."""
        return bool(self.parameters.get("binary_data_output", False))

    def binary(self, output: str) -> bool:
        """Whether `output` comes back as binary data: its own `binary_data` overrides `binary_data_output`."""
        for requested in self.outputs or ():
            if requested.name == output and requested.binary is not None:
                return requested.binary
        return self.binary_output


def _datatype(dtype: np.dtype[Any]) -> str | None:
    if dtype.kind in ("O", "U", "S"):
        return "BYTES"
    # Byte order is no part of a datatype: a big-endian float64 is FP64 (and is sent little-endian).
    return _BY_DTYPE.get(dtype) or _BY_DTYPE.get(dtype.newbyteorder("="))


def datatype_of_array(array: np.ndarray[Any, Any]) -> str:
    """The V2 datatype of a numpy array (strings, bytes and objects are BYTES); OutputError if none fits."""
    name = _datatype(array.dtype)
    if name is None:
        raise OutputError(f"an array of dtype {array.dtype} has no V2 datatype")
    return name


def output_tensor(model: str, name: str, array: np.ndarray[Any, Any]) -> Tensor:
    """Output `name` of `model` as a V2 tensor (numbers in native byte order).

    An array no V2 datatype carries (complex, datetime64, float128, ...) is an `OutputError` naming both.
    """
    datatype = _datatype(array.dtype)
    if datatype is None:
        raise OutputError(f"model {model!r} returned output {name!r} of dtype {array.dtype}, which no V2 datatype "
                          "carries; return booleans, integers, floats (16, 32 or 64 bits) or strings")
    if datatype != "BYTES" and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return Tensor(name, datatype, array)


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidRequest(f"{where}: field {key!r} must be a {expected}, got {type(value).__name__}")
    return value


_MAX_DIM = 2**31 - 1
"""The largest dimension a shape may give (numpy's own limit is reached long before memory is)."""
_MAX_NDIM = 32
"""The most dimensions a shape may give: numpy 1's limit (numpy 2 takes 64), so that no install of numpy fails a
request that another takes; past it numpy raises a ValueError that would be a server error."""


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise InvalidRequest(f"{where}: 'shape' must be a list of non-negative integers, got {raw!r}")
    if len(raw) > _MAX_NDIM:
        raise InvalidRequest(f"{where}: shape has {len(raw)} dimensions; a tensor has at most {_MAX_NDIM}")
    if any(d > _MAX_DIM for d in raw):
        raise InvalidRequest(f"{where}: shape {raw} has a dimension over {_MAX_DIM}")
    if 0 in raw:
        raise InvalidRequest(f"{where}: shape {raw} holds no values; send at least one")
    return tuple(raw)


def _json_values(name: str, datatype: str, data: Any, shape: tuple[int, ...],
                 booleans: bool = True) -> np.ndarray[Any, Any]:
    """`data` as a `datatype` array of `shape`. `booleans=False` promises that no JSON true/false is in it."""
    where = f"input {name!r}"
    if not isinstance(data, list):
        data = [data]
    target = DTYPES[datatype]
    try:
        raw = np.array(data, dtype=object if datatype == "BYTES" else None)
    except ValueError as exc:  # ragged nesting
        raise InvalidRequest(f"{where}: 'data' is not a regular (row-major) array: {exc}") from None
    count = math.prod(shape)
    if raw.size != count:
        raise InvalidRequest(f"{where}: shape {list(shape)} needs {count} values, 'data' has {raw.size}")
    kind = raw.dtype.kind
    # numpy types [true, 2] as integers and [true, 1.5] as floats: a boolean among numbers would become 1 unseen,
    # where booleans alone are refused below.
    if booleans and kind in "iuf" and datatype not in ("BOOL", "BYTES") and _holds_boolean(data, raw.ndim):
        noun = "integers" if target.kind in "iu" else "numbers"
        raise InvalidRequest(f"{where}: {datatype} data must be {noun}, got boolean values")
    if datatype == "BYTES":
        flat = raw.reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidRequest(f"{where}: BYTES data must be strings")
        return flat.reshape(shape)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidRequest(f"{where}: BOOL data must be true/false, got {raw.dtype.name} values")
    elif target.kind in "iu":
        info = np.iinfo(target)
        if kind not in "iu":  # numpy fell back to float or object: look at each value (e.g. -1 next to 2**63)
            return _exact_integers(where, datatype, data, raw.shape, info).reshape(shape)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidRequest(f"{where}: a value is outside the range of {datatype} [{info.min}, {info.max}]")
    elif kind not in "iuf":
        raise InvalidRequest(f"{where}: {datatype} data must be numbers, got {_kind_name(kind)} values")
    with np.errstate(over="ignore"):  # an overflow is refused just below, by name
        values = raw.astype(target, copy=False).reshape(shape)
    if target.kind == "f" and not np.isfinite(values).all():  # JSON has no inf/NaN: a value overflowed
        top = float(np.finfo(target).max)
        raise InvalidRequest(f"{where}: a value is outside the range of {datatype} [{-top:g}, {top:g}]")
    return values


def _kind_name(kind: str) -> str:
    return {"b": "boolean", "U": "string", "O": "mixed", "f": "floating-point"}.get(kind, kind)


def _holds_boolean(data: list[Any], ndim: int) -> bool:
    return any(type(value) is bool for value in _flat(data, ndim))


def _flat(data: list[Any], ndim: int) -> Iterable[Any]:
    """The Python values of regular nested lists `ndim` deep, row-major."""
    values: Iterable[Any] = data
    for _ in range(ndim - 1):
        values = itertools.chain.from_iterable(values)
    return values


def _exact_integers(where: str, datatype: str, data: list[Any], nesting: tuple[int, ...],
                    info: np.iinfo[Any]) -> np.ndarray[Any, Any]:
    """Integer data that numpy could not type at once, checked value by value and built as `datatype`."""
    values = list(_flat(data, len(nesting)))
    for value in values:
        if type(value) is not int:  # bool is an int subclass, and is refused here
            kind = {bool: "boolean", float: "floating-point", str: "string"}.get(type(value), "mixed")
            raise InvalidRequest(f"{where}: {datatype} data must be integers, got {kind} values")
    if min(values) < info.min or max(values) > info.max:
        raise InvalidRequest(f"{where}: a value is outside the range of {datatype} [{info.min}, {info.max}]")
    return np.array(values, dtype=info.dtype)


def _text(element: bytes) -> str | bytes:
    """A binary BYTES element as the `str` its JSON form gives; `bytes` only when it is not UTF-8."""
    try:
        return element.decode()
    except UnicodeDecodeError:
        return element


def _binary_values(name: str, datatype: str, chunk: bytes, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    where = f"input {name!r}"
    count = math.prod(shape)
    if datatype == "BYTES":
        items: list[str | bytes] = []
        offset = 0
        while offset < len(chunk):
            if offset + 4 > len(chunk):
                raise InvalidRequest(f"{where}: binary BYTES data ends inside an element's length")
            (size,) = struct.unpack_from("<I", chunk, offset)
            offset += 4
            if offset + size > len(chunk):
                raise InvalidRequest(f"{where}: binary BYTES element runs past the data")
            items.append(_text(chunk[offset:offset + size]))
            offset += size
        if len(items) != count:
            raise InvalidRequest(f"{where}: shape {list(shape)} needs {count} values, binary data has {len(items)}")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = DTYPES[datatype].newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise InvalidRequest(f"{where}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
                             f"binary data has {len(chunk)}")
    return np.frombuffer(chunk, dtype=dtype).astype(DTYPES[datatype], copy=False).reshape(shape)


def header_length(raw: str | None) -> int | None:
    """The value of an `Inference-Header-Content-Length` header (None when there is none).

    Only ASCII digits are a length: `int()` would also take signs, underscores, spaces and other scripts' digits.
    """
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidRequest(f"Inference-Header-Content-Length must be a number of bytes, got {raw!r}")
    return int(raw)


def request_header(body: bytes, header_length: int | None = None) -> dict[str, Any]:
    """The JSON header of a V2 inference request (all of `body` without a binary part), with a string 'id' if any."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise InvalidRequest(f"Inference-Header-Content-Length {header_length} is outside the body "
                             f"({len(body)} bytes)")
    header = body if header_length is None else body[:header_length]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object with an 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("field 'id' must be a string")
    if request_id == "":  # echoed, it could never be named by feedback; replaced, the client would not know it
        raise InvalidRequest("field 'id' is empty; give the inference a non-empty id, or leave 'id' out and the "
                             "server chooses one")
    if request_id is not None and len(request_id) > MAX_ID_LENGTH:
        raise InvalidRequest(f"field 'id' is {len(request_id)} characters long; an inference id has at most "
                             f"{MAX_ID_LENGTH}")
    return doc


def decode_request(body: bytes, header_length: int | None = None) -> InferenceRequest:
    """Decode a V2 inference request (JSON, or JSON header + binary tensors when `header_length` is given)."""
    doc = request_header(body, header_length)
    request_id = doc.get("id")
    raw_inputs = _field(doc, "inputs", list, "request")
    if not raw_inputs:
        raise InvalidRequest("request: 'inputs' is empty; send at least one input tensor")
    binary = body[header_length:] if header_length is not None else b""
    # Without a true or false anywhere in the JSON no tensor holds a boolean: the common case skips looking
    # at each value (a byte search is ~100x quicker than a loop over the values).
    header = body if header_length is None else body[:header_length]
    booleans = b"true" in header or b"false" in header
    offset = 0
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidRequest(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = _field(raw, "name", str, f"inputs[{i}]")
        if name in seen:
            raise InvalidRequest(f"input {name!r} is given twice")
        seen.add(name)
        datatype = _field(raw, "datatype", str, f"input {name!r}")
        if datatype not in DTYPES:
            raise InvalidRequest(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DTYPES)}")
        shape = _shape(raw.get("shape"), f"input {name!r}")
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidRequest(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise InvalidRequest(f"input {name!r} has binary_data_size but the request has no "
                                     "Inference-Header-Content-Length header")
            if isinstance(size, bool) or not isinstance(size, int):  # true would be taken as 1 byte
                raise InvalidRequest(f"input {name!r}: binary_data_size must be a number of bytes, got {size!r}")
            if size < 0 or offset + size > len(binary):
                raise InvalidRequest(f"input {name!r}: binary_data_size {size!r} runs past the body")
            data = _binary_values(name, datatype, binary[offset:offset + size], shape)
            offset += size
        else:
            if "data" not in raw:
                raise InvalidRequest(f"input {name!r} has no 'data'")
            data = _json_values(name, datatype, raw["data"], shape, booleans)
        inputs.append(Tensor(name, datatype, data, {k: v for k, v in params.items() if k != "binary_data_size"}))
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data follow the header that no input claims")
    outputs = _requested_outputs(doc.get("outputs"))
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("field 'parameters' must be an object")
    _flag(parameters, "binary_data_output", "parameter")
    return InferenceRequest(request_id, inputs, outputs, parameters)


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool:
    """A boolean parameter (False when absent). Anything else is refused: `bool("no")` would be True."""
    return bool(_optional_flag(params, key, where))


def _optional_flag(params: Mapping[str, Any], key: str, where: str) -> bool | None:
    """A boolean parameter, None when absent."""
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{where} {key!r} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class FeedbackRequest:
    """A decoded feedback body: a `truth` and/or a `reward` for the answered inference `id`."""

    id: str
    truth: Any
    reward: float | None
    plain_truth: Any
    """`truth` with lists as a numpy array, for the graph's nodes."""

    @property
    def kinds(self) -> frozenset[str]:
        """What it gives: 'truth', 'reward' or both."""
        return frozenset(k for k, v in (("truth", self.truth), ("reward", self.reward)) if v is not None)

    def check_rows(self, rows: int | None) -> None:
        """Refuse a `truth` that is not one value per row of the answer (`rows`; None when unknown).

        The truth is shaped like the output: a list with one value per row, or for an answer of one row
        also the bare value. Anything else could not be joined to the answer's rows, and would count for
        nothing (or for the wrong rows) in the accuracy of rollouts and of the closed loop.
        """
        if self.truth is None or rows is None:
            return
        if isinstance(self.truth, list):
            if len(self.truth) == rows:
                return
            got = f"a list of {len(self.truth)}"
        elif rows == 1:
            return
        else:
            got = "a single value"
        row_s = "row" if rows == 1 else "rows"
        value_s = "value" if rows == 1 else "values"
        raise InvalidRequest(f"answer {self.id!r} has {rows} {row_s}, so 'truth' must be a list of {rows} "
                             f"{value_s}, one per row like the output; got {got}")


def decode_feedback(body: bytes) -> FeedbackRequest:
    """Decode a feedback body, `{"id": ..., "truth": ...}` and/or `"reward": <number>`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the feedback body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest('feedback must be a JSON object like {"id": "...", "truth": 1} or '
                             '{"id": "...", "reward": 0.5}')
    unknown = sorted(set(doc) - {"id", "truth", "reward"})
    if unknown:
        raise InvalidRequest(f"unknown feedback field {unknown[0]!r}; use id, truth and reward")
    inference_id = doc.get("id")
    if not isinstance(inference_id, str) or not inference_id:
        raise InvalidRequest("feedback needs the 'id' of the inference it is about (the response's id)")
    if len(inference_id) > MAX_ID_LENGTH:
        raise InvalidRequest(f"field 'id' is {len(inference_id)} characters long; an inference id has at most "
                             f"{MAX_ID_LENGTH}")
    truth, reward = doc.get("truth"), doc.get("reward")
    if truth is None and reward is None:
        raise InvalidRequest("feedback needs a 'truth' (the right answer) or a 'reward' (a number)")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)
                               or not abs(reward) <= MAX_REWARD):
        raise InvalidRequest(f"'reward' must be a number between -{MAX_REWARD:.0e} and {MAX_REWARD:.0e}, "
                             f"got {reward!r}")
    try:
        plain_truth = np.asarray(truth) if isinstance(truth, list) else truth
    except ValueError:
        raise InvalidRequest("'truth' must be a value or a regular (rectangular) array, like the output") from None
    return FeedbackRequest(inference_id, truth, None if reward is None else float(reward), plain_truth)


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None or raw == []:  # the protocol's "not specified": every output (none at all is no answer)
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("field 'outputs' must be a list of {\"name\": ...} objects")
    found = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequest(f"outputs[{i}] must be an object with a name")
        name = _field(item, "name", str, f"outputs[{i}]")
        if name in seen:  # the answer would carry it twice, as an input given twice is refused
            raise InvalidRequest(f"output {name!r} is asked for twice")
        seen.add(name)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidRequest(f"output {name!r}: 'parameters' must be an object")
        found.append(RequestedOutput(name, _optional_flag(params, "binary_data", f"output {name!r}: parameter")))
    return found


def _bytes_element(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _json_data(model: str, tensor: Tensor) -> Any:
    array = tensor.data
    if tensor.datatype == "BYTES":
        flat = array.reshape(-1)
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError:
            raise OutputError(f"model {model!r} returned bytes that are not UTF-8 in output {tensor.name!r}, which "
                              "JSON cannot carry; ask for it as binary data") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # orjson would write null: a silent wrong answer. The binary encoding carries NaN and infinity.
        raise OutputError(f"model {model!r} returned NaN or infinity in output {tensor.name!r}, which JSON cannot "
                          "carry; ask for it as binary data (the binary tensor extension: the requested output's "
                          'parameter "binary_data": true, or the request\'s "binary_data_output": true)')
    return np.ascontiguousarray(array.reshape(-1))


def _binary_data(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in map(_bytes_element, tensor.data.reshape(-1)))
    return np.ascontiguousarray(tensor.data, dtype=tensor.data.dtype.newbyteorder("<")).tobytes()


def encode_response(model_name: str, model_version: str | None, request_id: str | None, outputs: Iterable[Tensor],
                    parameters: Mapping[str, Any] | None = None,
                    binary: set[str] | None = None) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some outputs (named in `binary`) are binary."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype}
        params = dict(tensor.parameters)
        if binary and tensor.name in binary:
            chunk = _binary_data(tensor)
            chunks.append(chunk)
            params["binary_data_size"] = len(chunk)
        else:
            entry["data"] = _json_data(model_name, tensor)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
