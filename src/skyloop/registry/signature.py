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


def _batched(name: str, value: Any, dtype: Any = None, what: str = "input") -> TensorSpec:
    # The first dimension is the batch: any number of rows may come.
    if dtype is None and hasattr(value, "toarray") and hasattr(value, "dtype"):  # a scipy sparse matrix
        dtype, shape = value.dtype, [-1, *value.shape[1:]]
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as exc:
            sample = "the example" if what == "input" else "what the model returned for the example"
            raise SpecError(f"{what} {name!r}: {sample} is not one rectangular array ({exc}); give arrays of "
                            "one shape, or signature=") from exc
        dtype = array.dtype if dtype is None else dtype
        shape = [-1, *array.shape[1:]] if array.ndim >= 1 else [-1]
    return TensorSpec(name=name, datatype=datatype_of(dtype), shape=[int(d) for d in shape])


def _is_frame(value: object) -> bool:
    return hasattr(value, "columns") and hasattr(value, "dtypes") and hasattr(value, "to_numpy")


def tensor_specs(value: object, default_name: str, what: str = "input") -> list[TensorSpec]:
    """The tensors that `value` stands for (a frame is one 1-D tensor per column, named as the column)."""
    if isinstance(value, Mapping):
        specs = [_batched(str(k), v, what=what) for k, v in value.items()]
    elif _is_frame(value):
        # Column by column, whatever their types: the server rebuilds the frame with these names, which
        # models that select columns by name (a ColumnTransformer) need.
        frame = cast(Any, value)
        _check_unique([str(col) for col in frame.columns], what)  # before frame[col], a frame if repeated
        specs = [TensorSpec(name=str(col), datatype=datatype_of(frame.dtypes.iloc[j], str(col)), shape=[-1])
                 for j, col in enumerate(frame.columns)]
    elif hasattr(value, "to_numpy") and hasattr(value, "name"):  # a pandas Series
        series = cast(Any, value)
        name = str(series.name) if series.name is not None else default_name
        specs = [_batched(name, series.to_numpy(), series.dtype, what)]
    else:
        specs = [_batched(default_name, value, what=what)]
    _check_unique([s.name for s in specs], what)
    return specs


def _check_unique(names: list[str], what: str) -> None:
    # A request names its tensors: two of one name could not both be given.
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SpecError(f"{what} {repeated[0]!r} appears more than once in the example (as a column or key); "
                        "give each column a distinct name")


def infer_signature(example: object, prediction: object | None = None) -> Signature:
    """A signature from a sample input and, when given, what the model returned for it."""
    inputs = tensor_specs(example, "input-0")
    outputs = tensor_specs(prediction, "predict", "output") if prediction is not None else []
    return Signature(inputs=inputs, outputs=outputs, frame=True if _is_frame(example) else None)
