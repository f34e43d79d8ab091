"""Fitting named tensors to a registered model's signature: datatypes, shapes, and the X the model takes.

Plain Python, no HTTP. A tensor whose datatype differs from the signature's is converted only where every value
keeps its exact value (`WIDENINGS`, and integers to floats whose mantissa holds them); anything else is refused
with `SignatureMismatch`, naming the input and what it should be.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from skyloop.errors import SignatureMismatch
from skyloop.registry.package import Signature, TensorSpec
from skyloop.serving.protocol import DTYPES

__all__ = ["WIDENINGS", "check_inputs", "model_features"]

WIDENINGS: dict[str, frozenset[str]] = {
    "BOOL": frozenset(),  # True is no number: a BOOL tensor is taken only where the signature says BOOL
    "UINT8": frozenset({"UINT16", "UINT32", "UINT64", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}),
    "UINT16": frozenset({"UINT32", "UINT64", "INT32", "INT64", "FP32", "FP64"}),
    "UINT32": frozenset({"UINT64", "INT64", "FP64"}),
    "UINT64": frozenset(),
    "INT8": frozenset({"INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}),
    "INT16": frozenset({"INT32", "INT64", "FP32", "FP64"}),
    "INT32": frozenset({"INT64", "FP64"}),
    "INT64": frozenset(),
    "FP16": frozenset({"FP32", "FP64"}),
    "FP32": frozenset({"FP64"}),
    "FP64": frozenset(),
    "BYTES": frozenset(),
}
"""Datatype sent -> the datatypes it is converted to whatever its values: the same kind with more bits, an
unsigned integer to a wider signed one, and an integer to a float whose mantissa holds every value of its type.
Other integers go to a float only when each value sent is exact in it (INT64 to FP64 up to 2**53); numpy's "safe"
casting would also turn BOOL into numbers and INT64 beyond 2**53 into rounded floats."""

_MANTISSA = {"FP16": 11, "FP32": 24, "FP64": 53}
"""Bits of a float's significand: every integer up to 2**bits in magnitude is exact in it."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _datatype(array: np.ndarray[Any, Any]) -> str:
    """The V2 datatype of an array (its numpy dtype's name where none fits, for the message)."""
    dtype = array.dtype
    if dtype.kind in "OUS":
        return "BYTES"
    if not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    return _NAMES.get(dtype) or str(dtype.name)


def _exact_in_float(array: np.ndarray[Any, Any], datatype: str) -> bool:
    limit = 2 ** _MANTISSA[datatype]
    return array.size == 0 or (int(array.min()) >= -limit and int(array.max()) <= limit)


def _converted(spec: TensorSpec, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """`array` as `spec.datatype`, where that changes no value; `SignatureMismatch` otherwise."""
    want = DTYPES[spec.datatype]
    got = _datatype(array)
    if array.dtype == want or (got == "BYTES" and spec.datatype == "BYTES" and array.dtype.kind == "O"):
        return array
    if got == spec.datatype or spec.datatype in WIDENINGS.get(got, frozenset()):
        return array.astype(want)  # a fixed-width string array to objects, a big-endian array, or a widening
    if got in WIDENINGS and got[0] in "IU" and spec.datatype in _MANTISSA:
        if _exact_in_float(array, spec.datatype):
            return array.astype(want)
        bits = _MANTISSA[spec.datatype]
        raise SignatureMismatch(f"input {spec.name!r} must be {spec.datatype}, got {got} with a value beyond "
                                f"2**{bits} in magnitude, which {spec.datatype} cannot hold exactly; send "
                                f"{spec.datatype} values")
    raise SignatureMismatch(f"input {spec.name!r} must be {spec.datatype}, got {got}")


def check_inputs(inputs: Mapping[str, np.ndarray[Any, Any]],
                 specs: list[TensorSpec]) -> dict[str, np.ndarray[Any, Any]]:
    """The inputs as the signature types them (converted only where no value changes, see `WIDENINGS`).

    Tensors that do not fit are refused, naming the input and what it should be; columns of one table
    (see `_columns`) must have the same length.
    """
    checked: dict[str, np.ndarray[Any, Any]] = {}
    expected = {s.name: s for s in specs}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise SignatureMismatch(f"unknown input {unknown[0]!r}; the model takes {', '.join(expected)}")
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            raise SignatureMismatch(f"missing input {spec.name!r} ({spec.datatype} {spec.shape})")
        array = _converted(spec, array)
        if len(array.shape) != len(spec.shape) or any(
                w != -1 and w != a for w, a in zip(spec.shape, array.shape, strict=True)):
            raise SignatureMismatch(f"input {spec.name!r} must have shape {spec.shape} (-1: any), "
                                    f"got {list(array.shape)}")
        checked[spec.name] = array
    if _columns(specs):
        lengths = {name: len(array) for name, array in checked.items()}
        first = specs[0].name
        for spec in specs[1:]:
            if lengths[spec.name] != lengths[first]:
                raise SignatureMismatch(f"inputs {first!r} and {spec.name!r} are columns of one table and need the "
                                        f"same length; {first!r} has {lengths[first]} values, {spec.name!r} has "
                                        f"{lengths[spec.name]}")
    return checked


def model_features(signature: Signature | None, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Any:
    """The X a model of `signature` takes for these named tensors (already passed through `check_inputs`):
    a frame for the columns of a table, the one array of a single input, else the mapping."""
    specs = signature.inputs if signature else []
    if specs:
        if _columns(specs) or (signature is not None and signature.frame):
            try:
                import pandas as pd
            except ImportError:
                return dict(inputs)
            return pd.DataFrame({s.name: inputs[s.name] for s in specs})
        if len(specs) == 1:
            return inputs[specs[0].name]
        return {s.name: inputs[s.name] for s in specs}
    return next(iter(inputs.values())) if len(inputs) == 1 else dict(inputs)


def _columns(specs: list[TensorSpec]) -> bool:
    """Whether a signature lists the columns of one table (several 1-D inputs: the model takes a frame)."""
    return len(specs) > 1 and all(len(s.shape) == 1 for s in specs)
