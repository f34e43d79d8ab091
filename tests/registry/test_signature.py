"""Signatures inferred from what users pass as examples: frames, dicts, sparse matrices, model outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from sklearn.linear_model import LogisticRegression

from skyloop import Settings
from skyloop.errors import SpecError
from skyloop.registry import log_model
from skyloop.registry.package import Signature
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


def test_a_tuple_prediction_is_one_output_per_array() -> None:
    # Two rows: read as one array, the batch (2) would be the second axis of a tensor of 2 "rows".
    signature = infer_signature(np.zeros((2, 3)), (np.zeros(2), np.ones(2, dtype=np.int64)))
    assert [(t.name, t.datatype, t.shape) for t in signature.outputs] == [
        ("predict_0", "FP64", [-1]), ("predict_1", "INT64", [-1])]
    assert [t.shape for t in infer_signature(np.zeros((3, 2)), (0, 1, 2)).outputs] == [[-1]]  # a row each
    with pytest.raises(SpecError, match=r"output: the model returned a tuple of 2 values for an example of 4 rows"):
        infer_signature(np.zeros((4, 3)), (np.zeros(3), np.ones(3)))
    with pytest.raises(SpecError, match=r"a list of 2 arrays of 4 rows .* as a tuple or a dict by name"):
        infer_signature(np.zeros((4, 3)), [np.zeros(4), np.ones(4)])


@pytest.mark.parametrize(("signature", "message"), [
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1]}] * 2},
     r"signature.inputs\[1\].name: 'x' appears more than once in signature.inputs"),
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 2]}],
      "outputs": [{"name": "y", "datatype": "FP64", "shape": [-1]}] * 2},
     r"signature.outputs\[1\].name: 'y' appears more than once"),
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": []}]}, r"signature.inputs\[0\].shape: \[\] \('x'\)"),
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 0]}]}, r"signature.inputs\[0\].shape: \[-1, 0\]"),
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [-2]}]}, r"signature.inputs\[0\].shape: \[-2\]"),
    ({"inputs": [{"name": "", "datatype": "FP64", "shape": [-1]}]}, r"signature.inputs\[0\].name is empty"),
])
@pytest.mark.parametrize("as_object", [False, True])
def test_a_given_signature_with_a_repeated_name_or_no_shape_is_refused(signature: dict[str, Any], message: str,
                                                                       as_object: bool, settings: Settings) -> None:
    model = LogisticRegression().fit(np.eye(2), [0, 1])
    given = Signature.model_validate(signature) if as_object else signature
    with pytest.raises(SpecError, match=message):
        log_model(model, "sig", signature=given, settings=settings)
