"""Logged inferences given to a model again, as the server gave them: the gate of the closed loop scores the
champion and the challenger on held-out logged rows, and must see each model's answers as live quality saw them.

The payload log keeps a request's tensors as columns (`feature_rows`: a 1-D tensor is a column, an [n, k] one the
columns `NAME_0` ... `NAME_{k-1}`) in whatever order clients sent them, and an answer as the rows of its first
output. A model is given the tensors its signature names, in its order and datatypes (a frame with its column
names where it was fitted on one, `model_features`), and its answer is named and cut into rows as the server and
the log do; without a signature, it gets the logged columns as they are.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from skyloop.errors import SpecError
from skyloop.monitoring.payloads import feature_column, input_name, predictions
from skyloop.registry.package import Signature, TensorSpec

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["answered_rows", "logged_inputs"]


def logged_inputs(rows: pd.DataFrame, signature: Signature | None, model: str) -> Any:
    """The X that a model of `signature` (`model`, for the errors) is given for the logged `rows`."""
    from skyloop.serving.protocol import DTYPES
    from skyloop.serving.signature import model_features

    if signature is None or not signature.inputs:
        return rows.rename(columns=input_name)
    tensors = {}
    for spec in signature.inputs:
        values = _tensor_columns(rows, spec, model)
        try:
            tensors[spec.name] = values.astype(DTYPES[spec.datatype])
        except (TypeError, ValueError) as exc:  # a NaN for an integer input, text for a number
            raise SpecError(f"the logged values of input {spec.name!r} are not {spec.datatype}, which {model} "
                            f"takes: {exc}") from None
    return model_features(signature, tensors)


def _tensor_columns(rows: pd.DataFrame, spec: TensorSpec, model: str) -> np.ndarray[Any, Any]:
    """Input `spec`'s tensor for `rows`, from the columns `feature_rows` made of it."""
    if len(spec.shape) <= 1:
        for column in (feature_column(spec.name), feature_column(f"{spec.name}_0")):  # (the latter: sent as [n, 1])
            if column in rows:
                return rows[column].to_numpy()
        columns = [feature_column(spec.name)]
    else:
        inner, prefix = spec.shape[1:], f"{spec.name}_"
        width = math.prod(inner) if all(d > 0 for d in inner) else \
            sum(1 for c in map(input_name, rows.columns) if c.startswith(prefix) and c[len(prefix):].isdigit())
        columns = [feature_column(f"{spec.name}_{j}") for j in range(width)]
    missing = [c for c in columns if c not in rows]
    if missing or not columns:
        raise SpecError(f"the payload log has no column {input_name(missing[0]) if missing else spec.name!r} of "
                        f"input {spec.name!r}, which {model} takes: it cannot be scored on these rows")
    flat = rows[columns].to_numpy()
    return flat if len(spec.shape) <= 2 else flat.reshape(len(rows), *(d if d > 0 else -1 for d in spec.shape[1:]))


def answered_rows(result: Any, signature: Signature | None, rows: int, model: str) -> list[Any]:
    """A model's answer for `rows` logged rows as the payload log would hold it: the rows of its first output."""
    from skyloop.serving.graph import named_answer

    first = next(iter(named_answer(result, signature, model).values()), None)
    return predictions(None if first is None else [{"data": first.tolist()}], rows)
