"""Type-aware serializers: each value comes back as itself, through the serializer meant for it."""

from __future__ import annotations

import decimal
import enum
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from skyloop.store.serializers import deserialize, serialize, type_name


@dataclass
class Point:
    """A user class importable by reference (joblib pickles it by name)."""

    x: float
    y: float


class Color(enum.IntEnum):
    RED = 1


def roundtrip(value: object) -> tuple[str, Any]:
    name, data = serialize(value)
    return name, deserialize(name, data)


@pytest.mark.parametrize("value", [
    None,
    0,
    -3,
    2**70,
    1.5,
    -0.0,
    math.inf,
    True,
    "héllo \u2603",
    [],
    {},
    [1, "two", None, 3.0, [4, [5]]],
    {"a": {"b": [1, 2, {"c": None}]}, "d": True},
])
def test_plain_values_use_json_and_keep_their_types(value: object) -> None:
    name, back = roundtrip(value)
    assert name == "json"
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, float):
        assert math.copysign(1.0, back) == math.copysign(1.0, value)


@pytest.mark.parametrize("value", [
    (1, 2),
    {"pair": (1, 2)},
    [1, (2, 3)],
    {1: "int key"},
    Color.RED,
    b"bytes",
    {1, 2},
])
def test_values_json_would_change_go_to_joblib(value: object) -> None:
    name, back = roundtrip(value)
    assert name == "joblib"
    assert back == value
    assert type(back) is type(value)


def test_a_tuple_is_not_silently_turned_into_a_list() -> None:
    name, back = roundtrip({"shape": (2, 3)})
    assert name == "joblib"
    assert type(back["shape"]) is tuple


@pytest.mark.parametrize("value", [math.nan, [1.0, math.nan], {"loss": math.nan}])
def test_nan_goes_to_joblib(value: object) -> None:
    name, back = roundtrip(value)
    assert name == "joblib"
    assert repr(back) == repr(value)


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.linspace(0, 1, 7, dtype=np.float32),
    np.array([True, False, True]),
    np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
    np.array(["a", "bcd"]),
    np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    np.zeros((2, 0, 3), dtype=np.uint8),
    np.array(3.5),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    np.array([(1, 2.5)], dtype=[("id", "i4"), ("score", "f8")]),
])
def test_numpy_arrays_use_npy(array: np.ndarray[Any, Any]) -> None:
    name, back = roundtrip(array)
    assert name == "npy"
    assert type(back) is np.ndarray
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("array", [
    np.array([{"a": 1}, None], dtype=object),
    np.array([(1, {"a": 1})], dtype=[("id", "i4"), ("meta", "O")]),  # an object hidden in a field
])
def test_arrays_holding_objects_go_to_joblib(array: np.ndarray[Any, Any]) -> None:
    name, back = roundtrip(array)
    assert name == "joblib"
    assert back.dtype == array.dtype
    assert back.tolist() == array.tolist()


def test_dataframes_use_parquet() -> None:
    frame = pd.DataFrame({
        "i": [1, 2, 3],
        "f": [0.5, math.nan, 2.5],
        "s": ["x", "y", None],
        "t": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"], utc=True),
    }, index=pd.Index([10, 20, 30], name="row"))
    name, back = roundtrip(frame)
    assert name == "parquet"
    pd.testing.assert_frame_equal(back, frame)


@pytest.mark.parametrize("frame", [
    pd.DataFrame({0: [1, 2], 1: [3, 4]}),  # parquet wants string column names
    pd.DataFrame([[1, 2]], columns=["a", "a"]),  # ... unique ones
    pd.DataFrame({"a": [1, "x"]}),  # arrow cannot type a mixed column
    pd.DataFrame({"a": [Point(0, 1)]}),  # nor a user object
    pd.DataFrame({"a": [1j, 2j]}),  # nor complex numbers
    pd.DataFrame({"a": [[1, 2], [3]]}),  # list cells would come back as numpy arrays
    pd.DataFrame({"a": [(1, 2), (3, 4)]}),  # tuple cells too
    pd.DataFrame({"a": ["x", math.nan]}),  # NaN in a text column would come back as None
    pd.DataFrame({"a": pd.Series([1, 2], dtype="category")}),  # int categories would come back as ints
    pd.DataFrame({"a": np.array(["2024-01-01"], dtype="datetime64[s]")}),  # seconds would come back as ms
    pd.DataFrame({"a": [1, 2]}, index=pd.date_range("2024-01-01", periods=2, freq="D")),  # the freq would be lost
])
def test_dataframes_parquet_would_change_go_to_joblib(frame: pd.DataFrame) -> None:
    name, back = roundtrip(frame)
    assert name == "joblib"
    pd.testing.assert_frame_equal(back, frame)
    for i in range(frame.shape[1]):
        assert [type(v) for v in back.iloc[:, i]] == [type(v) for v in frame.iloc[:, i]]


@pytest.mark.parametrize("cells", [
    [{"a": 1}, {"a": 1.5}],  # arrow gives the struct field one type: the 1 would come back as 1.0
    [{"a": None}, {"a": 2}],
    [{"a": {"b": 1}}, {"a": {"b": 2.5}}],
    [{"a": 1, "b": 2}, {"b": 3, "a": 4}],  # ... and one order of fields
    [decimal.Decimal("1.10"), decimal.Decimal("2.345")],  # ... and a decimal column one scale: 1.10 -> 1.100
])
def test_frames_whose_cells_parquet_would_change_inside_go_to_joblib(cells: list[Any]) -> None:
    frame = pd.DataFrame({"c": cells})
    name, back = roundtrip(frame)
    assert name == "joblib"
    assert [repr(v) for v in back["c"]] == [repr(v) for v in cells]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_numpy_matrix_stays_a_matrix() -> None:
    # joblib's own format gives a matrix back as an ndarray under numpy 2, whose `*` is element-wise.
    matrix = np.matrix([[1, 2], [3, 4]])
    for value in (matrix, {"m": matrix, "a": np.arange(3)}):
        name, back = roundtrip(value)
        assert name == "joblib"
        m = back if isinstance(back, np.matrix) else back["m"]
        assert type(m) is np.matrix
        np.testing.assert_array_equal(m * m, [[7, 10], [15, 22]])


@pytest.mark.parametrize("value", [
    {"k": (1, 2), 3: {4}},
    np.array([[1, None]], dtype=object),
    [np.zeros(3, dtype="f4"), {"a": np.array(["x"], dtype=object)}],
    pd.DataFrame({0: [1.5]}),
    np.ma.masked_array([1, 2], mask=[0, 1]),
])
def test_values_without_a_matrix_keep_the_bytes_joblib_writes(value: object) -> None:
    import io

    import joblib

    buf = io.BytesIO()
    joblib.dump(value, buf)
    assert serialize(value) == ("joblib", buf.getvalue())  # same bytes, same digest: caches stay valid


def test_a_lambda_keeps_the_bytes_cloudpickle_writes() -> None:
    import pickle

    import cloudpickle

    def offset(v: int) -> int:
        return v + 1

    assert serialize(offset) == ("pickle", cloudpickle.dumps(offset, protocol=pickle.HIGHEST_PROTOCOL))


def test_an_open_file_is_refused_rather_than_stored_as_its_text(tmp_path: Path) -> None:
    # cloudpickle would store a text file open for reading as an io.StringIO of what is left to read.
    path = tmp_path / "data.txt"
    path.write_text("one\ntwo\n")
    with open(path) as fh, pytest.raises(TypeError, match="TextIOWrapper"):
        serialize({"file": fh, "fn": lambda v: v})


@pytest.mark.parametrize("frame", [
    pd.DataFrame(),
    pd.DataFrame({"s": ["x", None], "n": pd.array([1, None], dtype="Int64")}),
    pd.DataFrame({"c": pd.Categorical(["x", "y", "x"])}),
    pd.DataFrame({"d": [{"k": 1}, {"k": 2}]}),
    pd.DataFrame({"a": [1.0]}, index=pd.MultiIndex.from_tuples([(1, "x")], names=["i", "j"])),
])
def test_frames_parquet_keeps_as_they_are_use_parquet(frame: pd.DataFrame) -> None:
    name, back = roundtrip(frame)
    assert name == "parquet"
    pd.testing.assert_frame_equal(back, frame)


def test_a_fitted_sklearn_model_uses_joblib() -> None:
    from sklearn.linear_model import LinearRegression

    x = np.arange(10.0).reshape(-1, 1)
    model = LinearRegression().fit(x, 3 * x.ravel() + 1)
    name, back = roundtrip(model)
    assert name == "joblib"
    assert type(back) is LinearRegression
    np.testing.assert_allclose(back.predict(x), model.predict(x))


def test_a_user_class_uses_joblib() -> None:
    name, back = roundtrip([Point(1.0, 2.0)])
    assert name == "joblib"
    assert back == [Point(1.0, 2.0)]


def test_a_lambda_falls_back_to_cloudpickle() -> None:
    offset = 10
    name, back = roundtrip(lambda v: v + offset)
    assert name == "pickle"
    assert back(5) == 15


def test_a_local_class_falls_back_to_cloudpickle() -> None:
    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

    name, back = roundtrip(Local(7))
    assert name == "pickle"
    assert back.v == 7


def test_a_value_nothing_can_serialize_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"_thread\.lock"):
        serialize({"lock": threading.Lock()})


def test_a_dict_comes_back_with_its_keys_in_their_order() -> None:
    value = {"b": 1, "a": [1, 2], "c": {"y": 2, "x": 1}}
    name, back = roundtrip(value)
    assert name == "json"
    assert list(back) == ["b", "a", "c"] and list(back["c"]) == ["y", "x"]
    # A dict already in key order keeps the bytes (and digest) it had when keys were sorted on the way in.
    ordered = {"a": [1, 2], "b": 1}
    assert serialize(ordered)[1] == json.dumps(ordered, sort_keys=True, separators=(",", ":")).encode()


def test_serializing_twice_gives_the_same_bytes() -> None:
    for value in ({"k": [1.5, "s"]}, np.arange(5), pd.DataFrame({"a": [1, 2]})):
        assert serialize(value) == serialize(value)


def test_unknown_serializer_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="joblib"):
        deserialize("yaml", b"")


@pytest.mark.parametrize(("value", "expected"), [
    (1, "int"),
    ([1], "list"),
    (np.zeros(1), "numpy.ndarray"),
    (pd.DataFrame(), "pandas.core.frame.DataFrame"),
    (Point(0, 0), f"{__name__}.Point"),
])
def test_type_name(value: object, expected: str) -> None:
    assert type_name(value) == expected



_DIGEST_IN_A_NEW_PROCESS = """
import hashlib
from skyloop.store.serializers import deserialize, serialize
words = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"}
name, data = serialize({"tags": words, "frozen": frozenset(words)})
assert deserialize(name, data) == {"tags": words, "frozen": frozenset(words)}
assert type(deserialize(name, data)["frozen"]) is frozenset
print(hashlib.sha256(data).hexdigest())
"""


def test_a_set_of_strings_has_one_digest_in_every_process() -> None:
    # A set's order follows its strings' hashes, which change with every process (PYTHONHASHSEED): before, a
    # step returning one got a new digest at each run, and every step after it missed the cache.
    import os
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", _DIGEST_IN_A_NEW_PROCESS], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "3", "4")}
    assert len(digests) == 1, digests


@pytest.mark.parametrize("big", [2**63, 2**70, -2**64])
def test_a_frame_with_an_int_past_64_bits_in_an_object_column_goes_to_joblib(big: int) -> None:
    # pyarrow raised OverflowError, which no serializer caught: the step failed instead of falling back to joblib.
    frame = pd.DataFrame({"id": pd.Series([big, 1], dtype=object), "x": [1.5, 2.5]})
    name, back = roundtrip(frame)
    assert name == "joblib"
    pd.testing.assert_frame_equal(back, frame)
    assert back["id"].tolist() == [big, 1]


_SETS_IN_A_NEW_PROCESS = """
import datetime, hashlib
import numpy as np, pandas as pd
from skyloop.store.serializers import deserialize, serialize
values = {
    "tuples": {("alpha", 1), ("beta", 2), ("gamma", 3), ("delta", 4)},
    "bytes": {b"alpha", b"beta", b"gamma", b"delta", b"epsilon"},
    "frozensets": {frozenset({"a", "b"}), frozenset({"c"}), frozenset({"d", "e", "f"})},
    "mixed": {"alpha", "beta", 1, 2, "gamma", None},
    "datetimes": {datetime.datetime(2024, 1, d) for d in range(1, 9)},
    "numpy strings": {np.str_("alpha"), np.str_("beta"), np.str_("gamma")},
    "nested": {("k", frozenset({"x", "y", "z"})), ("j", frozenset({"u", "v"}))},
    "frame of sets": pd.DataFrame({"s": [{"alpha", "beta", "gamma"}, {b"x", b"y", b"z"}]}),
}
for label, value in values.items():
    name, data = serialize(value)
    back = deserialize(name, data)
    assert back.equals(value) if isinstance(value, pd.DataFrame) else back == value and type(back) is type(value)
    print(label, hashlib.sha256(data).hexdigest())
# Out at once: a native library's threads sometimes abort the interpreter's teardown ("terminate called without
# an active exception", SIGABRT) in a test run's environment, after every digest above was printed.
import os, sys
sys.stdout.flush()
os._exit(0)
"""


def test_sets_of_any_items_have_one_digest_in_every_process() -> None:
    # Only sets of exactly `str` were pickled in a fixed order: a set of tuples, bytes, datetimes... followed its
    # items' hashes, so a new digest in every process (PYTHONHASHSEED), and a cache miss for every step after it.
    import os
    import subprocess
    import sys

    outputs = [subprocess.run([sys.executable, "-c", _SETS_IN_A_NEW_PROCESS], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout.splitlines()
               for seed in ("1", "2", "3")]
    assert len(outputs[0]) == 8
    for lines in zip(*outputs, strict=True):
        assert len(set(lines)) == 1, lines
