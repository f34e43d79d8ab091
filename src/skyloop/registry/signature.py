"""Signatures inferred from sample data: numpy arrays, pandas frames, dicts of arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from skyloop.errors import SpecError
from skyloop.registry.package import Datatype, Signature, TensorSpec

__all__ = ["datatype_of", "infer_signature", "tensor_specs"]

_BY_NAME: dict[str, Datatype] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}


def datatype_of(dtype: Any, column: str | None = None) -> Datatype:
    """The V2 datatype of a numpy (or pandas) dtype; text, bytes and objects are BYTES.

    A pandas categorical takes its categories' datatype (strings: BYTES), a pandas string dtype is BYTES.
    `column` names the column at fault in the error when there is no V2 datatype.
    """
    where = f"column {column!r}: " if column is not None else ""
    categories = getattr(dtype, "categories", None)
    if categories is not None and hasattr(dtype, "ordered"):  # pandas CategoricalDtype
        return datatype_of(categories.dtype, column)
    if getattr(dtype, "name", None) == "string" or type(dtype).__name__ == "StringDtype":
        return "BYTES"
    try:
        dt = np.dtype(dtype) if not hasattr(dtype, "numpy_dtype") else np.dtype(dtype.numpy_dtype)
    except TypeError as exc:
        raise SpecError(f"{where}dtype {dtype} has no V2 datatype; cast the sample to a numeric, bool or "
                        "string type") from exc
    if dt.kind in ("O", "U", "S"):
        return "BYTES"
    found = _BY_NAME.get(dt.name)
    if found is None:
        raise SpecError(f"{where}dtype {dt} has no V2 datatype; cast the sample to a numeric, bool or string type")
    return found


def _batched(name: str, value: Any, dtype: Any = None) -> TensorSpec:
    # The first dimension is the batch: any number of rows may come.
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"input {name!r}: the example is not one rectangular array ({exc})") from exc
    shape = [-1, *array.shape[1:]] if array.ndim >= 1 else [-1]
    datatype = datatype_of(array.dtype if dtype is None else dtype)
    return TensorSpec(name=name, datatype=datatype, shape=[int(d) for d in shape])


def _is_frame(value: object) -> bool:
    return hasattr(value, "columns") and hasattr(value, "dtypes") and hasattr(value, "to_numpy")


def tensor_specs(value: object, default_name: str) -> list[TensorSpec]:
    """The tensors that `value` stands for (a frame is one 1-D tensor per column, named as the column)."""
    if isinstance(value, Mapping):
        return [_batched(str(k), v) for k, v in value.items()]
    if _is_frame(value):
        # Column by column, whatever their types: the server rebuilds the frame with these names, which
        # models that select columns by name (a ColumnTransformer) need.
        frame = cast(Any, value)
        return [TensorSpec(name=str(col), datatype=datatype_of(frame[col].dtype, str(col)), shape=[-1])
                for col in frame.columns]
    if hasattr(value, "to_numpy") and hasattr(value, "name"):  # a pandas Series
        series = cast(Any, value)
        name = str(series.name) if series.name is not None else default_name
        return [_batched(name, series.to_numpy(), series.dtype)]
    return [_batched(default_name, value)]


def infer_signature(example: object, prediction: object | None = None) -> Signature:
    """A signature from a sample input and, when given, what the model returned for it."""
    inputs = tensor_specs(example, "input-0")
    outputs = tensor_specs(prediction, "predict") if prediction is not None else []
    return Signature(inputs=inputs, outputs=outputs, frame=True if _is_frame(example) else None)
