"""`log_model(reference=...)`: the stored reference has the signature's columns, each with its own data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from skyloop import Settings
from skyloop.errors import SpecError
from skyloop.registry import load_model, log_model

RNG = np.random.RandomState(0)
FRAME = pd.DataFrame({"a": RNG.rand(50), "b": RNG.rand(50) * 100, "c": RNG.rand(50) * 1000})
FRAME_MODEL = LogisticRegression().fit(FRAME, (FRAME.a > 0.5).astype(int))


def _stored(uri: str, settings: Settings) -> pd.DataFrame:
    return pd.read_parquet(load_model(uri, settings=settings).path / "reference.parquet")


def test_a_named_reference_is_matched_by_name_not_position(settings: Settings) -> None:
    reordered = FRAME[["c", "b", "a"]]
    info = log_model(FRAME_MODEL, "byname", input_example=FRAME.head(), reference=reordered, settings=settings)
    stored = _stored(info.uri, settings)
    assert stored.columns.tolist() == ["a", "b", "c"]
    pd.testing.assert_frame_equal(stored.sort_values("a").reset_index(drop=True),
                                  FRAME.sort_values("a").reset_index(drop=True))


def test_a_reference_lacking_a_named_input_is_refused_naming_it(settings: Settings) -> None:
    renamed = FRAME[["c", "b", "a"]].rename(columns={"a": "a_v2"})  # as many columns, one renamed
    with pytest.raises(SpecError, match=r"reference lacks the signature's input column 'a' \(it has 'c', 'b', "
                                        r"'a_v2'\); give a frame with the columns the model takes"):
        log_model(FRAME_MODEL, "renamed", input_example=FRAME.head(), reference=renamed, settings=settings)


def test_a_reference_with_the_label_for_a_2d_input_is_refused(settings: Settings) -> None:
    X = FRAME.to_numpy()
    model = LogisticRegression().fit(X, (X[:, 0] > 0.5).astype(int))
    train = FRAME.assign(target=(FRAME.a > 0.5).astype(int))
    with pytest.raises(SpecError, match=r"reference has 4 columns, the signature's input 'input-0' 3; give the "
                                        "model's inputs only"):
        log_model(model, "label", input_example=X[:5], reference=train, settings=settings)
    info = log_model(model, "nolabel", input_example=X[:5], reference=FRAME, settings=settings)
    assert _stored(info.uri, settings).columns.tolist() == ["input-0_0", "input-0_1", "input-0_2"]


@pytest.mark.parametrize("as_frame", [True, False])
def test_a_reference_with_integer_column_labels_is_stored_as_the_signature_names_them(
        as_frame: bool, settings: Settings) -> None:
    X = FRAME.to_numpy()
    model = LogisticRegression().fit(X, (X[:, 0] > 0.5).astype(int))
    # A frame built from numpy (or read with header=None): its columns are 0, 1, 2, named "0", "1", "2".
    info = log_model(model, "ints", input_example=pd.DataFrame(X[:5]),
                     reference=pd.DataFrame(X) if as_frame else X, settings=settings)  # was a raw KeyError
    stored = _stored(info.uri, settings)
    assert stored.columns.tolist() == ["0", "1", "2"]
    np.testing.assert_allclose(np.sort(stored.to_numpy(), axis=0), np.sort(X, axis=0))


def test_an_unnamed_reference_is_taken_in_order_when_it_has_as_many_columns(settings: Settings) -> None:
    info = log_model(FRAME_MODEL, "numpy", input_example=FRAME.head(), reference=FRAME.to_numpy(), settings=settings)
    assert _stored(info.uri, settings).columns.tolist() == ["a", "b", "c"]
    with pytest.raises(SpecError, match=r"reference has 4 unnamed columns, the signature 3 inputs \(a, b, c\)"):
        log_model(FRAME_MODEL, "numpy", input_example=FRAME.head(),
                  reference=np.column_stack([FRAME.to_numpy(), np.zeros(50)]), settings=settings)
