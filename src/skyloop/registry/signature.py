"""Signatures inferred from sample data: numpy arrays, pandas frames, dicts of arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from skyloop.errors import SpecError
from skyloop.registry.package import Datatype, Signature, TensorSpec

__all__ = ["check_signature", "datatype_of", "infer_signature", "tensor_specs"]

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


def _rows(value: object) -> int | None:
    """How many rows (the batch) a sample holds, when it says: a dict's first value's, an array's first axis."""
    if isinstance(value, Mapping):
        return _rows(next(iter(value.values()))) if value else None
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    return len(value) if isinstance(value, list | tuple) else None


def _is_batch(value: object, rows: int | None) -> bool:
    """Whether `value` is an array-like (not a scalar or a string) of `rows` rows."""
    if isinstance(value, str | bytes) or rows is None:
        return False
    return _rows(value) == rows


def _output_specs(prediction: object, rows: int | None) -> list[TensorSpec]:
    """The outputs of what the model returned for an example of `rows` rows.

    A tuple of arrays of the batch's length is several outputs, `predict_0`, `predict_1`, ... (the server
    splits a tuple answer by the signature's output names in that order); read as one array, its batch
    would be on the second axis.
    """
    if isinstance(prediction, tuple):
        arrays = [part for part in prediction if not np.isscalar(part)]
        if len(prediction) > 1 and all(_is_batch(part, rows) for part in prediction):
            specs = [_batched(f"predict_{i}", part, what="output") for i, part in enumerate(prediction)]
            _check_unique([s.name for s in specs], "output")
            return specs
        if arrays and len(prediction) != rows:  # a tuple of one array per row is one output
            raise SpecError(f"output: the model returned a tuple of {len(prediction)} values for an example of "
                            f"{rows if rows is not None else 'some'} rows, not one array per output with a row "
                            "each; return an array, a tuple of arrays of one row per input row, or a dict of "
                            "them by name")
    elif isinstance(prediction, list) and len(prediction) > 1 and len(prediction) != rows and all(
            isinstance(part, np.ndarray) and _is_batch(part, rows) for part in prediction):
        raise SpecError(f"output: the model returned a list of {len(prediction)} arrays of {rows} rows for an "
                        f"example of {rows} rows; return several outputs as a tuple or a dict by name")
    return tensor_specs(prediction, "predict", "output")


def infer_signature(example: object, prediction: object | None = None) -> Signature:
    """A signature from a sample input and, when given, what the model returned for it."""
    inputs = tensor_specs(example, "input-0")
    outputs = _output_specs(prediction, _rows(example)) if prediction is not None else []
    return Signature(inputs=inputs, outputs=outputs, frame=True if _is_frame(example) else None)


def check_signature(signature: Signature) -> Signature:
    """`signature`, or a SpecError naming the first tensor a request could not name or shape.

    Pydantic checks the fields' types only: two tensors of one name could not both be sent (the server
    would take one for the other), and a shape must have a dimension, each a size >= 1 or -1 (any).
    """
    for what, specs in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        names = [spec.name for spec in specs]
        for i, spec in enumerate(specs):
            where = f"signature.{what}[{i}]"
            if not spec.name.strip():
                raise SpecError(f"{where}.name is empty; give each tensor a name")
            if spec.name in names[:i]:
                raise SpecError(f"{where}.name: {spec.name!r} appears more than once in signature.{what}; give "
                                "each tensor a distinct name")
            if not spec.shape or any(d == 0 or d < -1 for d in spec.shape):
                raise SpecError(f"{where}.shape: {spec.shape} ({spec.name!r}) is not a shape; give at least one "
                                "dimension (the batch first), each a size >= 1 or -1 for any size")
    return signature
