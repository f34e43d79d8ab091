"""Signatures inferred from what users pass as examples: frames, dicts, sparse matrices, model outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from skyloop.errors import SpecError
from skyloop.registry.signature import infer_signature


def test_a_frame_with_a_repeated_column_is_a_spec_error_naming_it() -> None:
    frame = pd.DataFrame([[1.0, 2.0, 3.0]], columns=["a", "b", "a"])
    with pytest.raises(SpecError, match="input 'a' appears more than once"):  # not pandas' AttributeError
        infer_signature(frame)
    with pytest.raises(SpecError, match="output '1' appears more than once"):  # keys equal once named
        infer_signature(np.zeros((1, 2)), {1: [0.0], "1": [1.0]})


def test_a_sparse_matrix_example_has_its_dtype_and_width() -> None:
    # A TF-IDF pipeline's input or output: not one opaque BYTES object.
    signature = infer_signature(scipy.sparse.csr_matrix(np.eye(3, dtype=np.float32)),
                                scipy.sparse.csr_matrix(np.eye(3)))
    assert [(t.datatype, t.shape) for t in signature.inputs] == [("FP32", [-1, 3])]
    assert [(t.datatype, t.shape) for t in signature.outputs] == [("FP64", [-1, 3])]


def test_a_ragged_prediction_is_named_as_the_output() -> None:
    with pytest.raises(SpecError, match=r"output 'predict': what the model returned .* or signature="):
        infer_signature(np.zeros((2, 2)), [[1, 2], [3]])


def test_dtypes_of_numpy_lists_and_nullable_columns() -> None:
    frame = pd.DataFrame({"n": pd.array([1, None], dtype="Int64"), "ok": pd.array([True, None], dtype="boolean"),
                          "f": np.array([1.0, 2.0], dtype=np.float32), "s": ["x", "y"]})
    assert [(t.name, t.datatype, t.shape) for t in infer_signature(frame).inputs] == [
        ("n", "INT64", [-1]), ("ok", "BOOL", [-1]), ("f", "FP32", [-1]), ("s", "BYTES", [-1])]
    signature = infer_signature([[1, 2], [3, 4]], [True, False])
    assert [(t.datatype, t.shape) for t in signature.inputs + signature.outputs] == [
        ("INT64", [-1, 2]), ("BOOL", [-1])]
    assert infer_signature(np.zeros((2, 3, 4), dtype=np.uint8)).inputs[0].shape == [-1, 3, 4]
