"""Type-aware serializers: each artifact records which one wrote it."""

from __future__ import annotations

import decimal
import functools
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RAW", "SERIALIZERS", "Serializer", "deserialize", "is_plain", "serialize", "type_name"]

_PLAIN = (str, int, float, bool, type(None))

RAW = "bytes"
"""What the artifact row of a file stored as it is (a registered model's) names as its serializer: no value
is read back from it. Equal bytes are one artifact, so a value's serializer wins over it (see
`skyloop.store.hotpath.UPSERT_ARTIFACT`)."""


def type_name(value: object) -> str:
    """`numpy.ndarray`, `int`, `pandas.core.frame.DataFrame` -> readable type of a value."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def is_plain(value: object, nan: bool = False, depth: int = 0) -> bool:
    """Whether JSON spells `value` unlike any other value: exact plain types, lists, and dicts with string keys;
    not a tuple or an int subclass. NaN too with `nan` (its text is its own, but it does not come back equal)."""
    if depth > 64:
        return False
    if type(value) in _PLAIN:
        return nan or not (type(value) is float and value != value)
    if type(value) is list:
        return all(is_plain(v, nan, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_plain(v, nan, depth + 1) for k, v in value.items())
    return False


def _json_dump(value: Any) -> bytes:
    # Keys keep their order (code downstream may build columns from it); equal dicts in another order
    # are other bytes, so at worst a cache miss.
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()


def _json_load(data: bytes) -> Any:
    return json.loads(data)


def _is_ndarray(value: object) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False
    # Any object inside (also as a field of a structured dtype) needs pickle: that is joblib's job.
    return type(value) is np.ndarray and not value.dtype.hasobject


def _npy_dump(value: Any) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> Any:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def _is_dataframe(value: object) -> bool:
    cls = type(value)
    if cls.__module__.split(".")[0] != "pandas" or cls.__name__ != "DataFrame":
        return False
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    # Parquet needs string column names; other frames fall back to joblib.
    return all(isinstance(c, str) for c in value.columns)  # type: ignore[attr-defined]


def _parquet_dump(value: Any) -> bytes:
    buf = io.BytesIO()
    value.to_parquet(buf, engine="pyarrow", index=True)
    data = buf.getvalue()
    # Parquet quietly changes some frames (list cells come back as arrays, tuple labels as a MultiIndex,
    # datetime64[s] as [ms], int categories as ints): like a tuple for JSON, those go to joblib instead.
    if not _same_frame(_parquet_load(data), value):
        raise ValueError("the frame does not come back from parquet as itself")
    return data


def _same_frame(back: Any, value: Any) -> bool:
    import pandas as pd

    try:
        pd.testing.assert_frame_equal(back, value, check_exact=True)
    except AssertionError:
        return False
    # assert_frame_equal compares object cells loosely (a list equals an array, None equals NaN).
    labels = [(back.index, value.index), (back.columns, value.columns)]
    cells = [(back.iloc[:, i], value.iloc[:, i]) for i in range(value.shape[1]) if value.dtypes.iloc[i] == "O"]
    pairs = [(x, y) for x, y in [*labels, *cells] if y.dtype == "O"]
    return all(type(a) is type(b) and (type(b) in _FLAT or _same_cell(a, b))
               for x, y in pairs for a, b in zip(x, y, strict=True))


_FLAT = (str, bytes, int, float, bool, type(None))
"""Cells with nothing inside: the same type is the same cell (most cells of an object column are strings)."""


def _same_cell(back: Any, value: Any, depth: int = 0) -> bool:
    """Whether a cell came back as itself, inside too: arrow types a column of dicts as a struct, whose fields
    share one type and one order (`{'a': 1}` beside `{'a': 1.5}` comes back as `{'a': 1.0}`), and a decimal
    column has one scale (`Decimal('1.10')` beside `Decimal('2.345')` comes back as `Decimal('1.100')`)."""
    if type(back) is not type(value) or depth > 64:
        return False
    if isinstance(value, dict):
        return list(back) == list(value) and all(_same_cell(back[k], value[k], depth + 1) for k in value)
    if isinstance(value, list | tuple):
        return len(back) == len(value) and all(_same_cell(b, v, depth + 1) for b, v in zip(back, value, strict=True))
    if isinstance(value, decimal.Decimal):
        return bool(back.as_tuple() == value.as_tuple())
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":  # list cells come back as these
        return bool(back.dtype == value.dtype and back.shape == value.shape)
    return True


def _parquet_load(data: bytes) -> Any:
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data), engine="pyarrow")


def _joblib_dump(value: Any) -> bytes:
    try:
        pickler = _joblib_pickler()
    except ImportError:  # pragma: no cover - joblib is a dependency
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    buf = io.BytesIO()
    pickler(buf).dump(value)  # what `joblib.dump(value, buf)` does, with the pickler below
    return buf.getvalue()


@functools.cache
def _joblib_pickler() -> Any:
    from joblib.numpy_pickle import NumpyPickler

    class Pickler(NumpyPickler):  # type: ignore[misc]
        """joblib's pickler, except that a `numpy.matrix` is pickled as numpy pickles it: joblib's own format
        gives it back as a plain ndarray under numpy 2 (whose `*` multiplies element-wise, not as matrices); and
        a set is pickled in a canonical order (see `_canonical_set`): in its own order, which follows its items'
        hashes and so changes with every process for strings, bytes, tuples of them, datetimes..., it gave each
        run of its step a new digest, and every step after it a cache miss. An array of objects holding sets is
        pickled by this pickler too (joblib hands such arrays to the plain `pickle`, which knows no such order)."""

        def save(self, obj: Any, save_persistent_id: bool = True) -> None:
            if self.np is not None and (type(obj) is self.np.matrix or (
                    type(obj) is self.np.ndarray and obj.dtype.hasobject and _holds_set_cell(obj))):
                pickle._Pickler.save(self, obj, save_persistent_id)  # type: ignore[attr-defined]
                return
            if _canonical_set(self, obj):
                return
            super().save(obj)

    return Pickler


def _canonical_set(pickler: Any, obj: Any) -> bool:
    """Pickle a set or frozenset of several items as `type(sorted items)` with `pickler`; False for anything else.

    Strings sort as themselves (the order, and so the digests, sets of strings already had), other items by
    their own pickled bytes, themselves canonical when they hold sets (a set of numbers gets new bytes once).
    Items that will not pickle on their own keep the set's order: the whole value then fails (or pickles) as it
    did before."""
    if type(obj) not in (set, frozenset) or len(obj) < 2:
        return False
    if all(type(v) is str for v in obj):
        items = sorted(obj)
    else:
        try:
            items = sorted(obj, key=_item_bytes)
        except Exception:
            return False
    pickler.save_reduce(type(obj), (items,), obj=obj)
    return True


def _item_bytes(item: Any) -> bytes:
    """The pickled bytes of a set's item, the same in every process (sets inside sorted as above)."""
    if not _nests_set(item):
        return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    buf = io.BytesIO()
    _KeyPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(item)
    return buf.getvalue()


def _nests_set(item: Any, depth: int = 0) -> bool:
    """Whether a (hashable) set item holds a frozenset: in a tuple, or itself."""
    if type(item) is frozenset:
        return True
    return type(item) is tuple and depth < 64 and any(_nests_set(v, depth + 1) for v in item)


class _KeyPickler(pickle._Pickler):
    """The plain pure-Python pickler, with sets in canonical order: the sort key of an item holding sets."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if not _canonical_set(self, obj):
            pickle._Pickler.save(self, obj, save_persistent_id)  # type: ignore[attr-defined]


def _holds_set_cell(array: Any) -> bool:
    """Whether an array of objects has a set among its cells (a frame's column of sets)."""
    return any(type(v) in (set, frozenset) for v in array.flat)


def _joblib_load(data: bytes) -> Any:
    import joblib

    return joblib.load(io.BytesIO(data))


def _pickle_dump(value: Any) -> bytes:
    buf = io.BytesIO()
    _cloud_pickler()(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)  # as `cloudpickle.dumps`, but:
    return buf.getvalue()


@functools.cache
def _cloud_pickler() -> Any:
    from collections import ChainMap

    import cloudpickle

    def refuse_file(obj: Any) -> Any:
        raise TypeError(f"cannot pickle an open file ({getattr(obj, 'name', '?')!r})")

    class Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
        # cloudpickle stores a text file open for reading as an io.StringIO of what is left to read in it: a
        # value of another type, and no file.
        dispatch_table = ChainMap({io.TextIOWrapper: refuse_file}, cloudpickle.CloudPickler.dispatch_table)

    return Pickler


def _pickle_load(data: bytes) -> Any:
    return pickle.loads(data)


@dataclass(frozen=True)
class Serializer:
    """A named pair of functions that turn a value into bytes and back."""

    name: str
    matches: Callable[[object], bool]
    dump: Callable[[Any], bytes]
    load: Callable[[bytes], Any]


SERIALIZERS: dict[str, Serializer] = {
    s.name: s
    for s in (
        Serializer("json", is_plain, _json_dump, _json_load),
        Serializer("npy", _is_ndarray, _npy_dump, _npy_load),
        Serializer("parquet", _is_dataframe, _parquet_dump, _parquet_load),
        Serializer("joblib", lambda v: True, _joblib_dump, _joblib_load),
        # Not chosen automatically: read-compatibility for values written by cloudpickle.
        Serializer("pickle", lambda v: False, _pickle_dump, _pickle_load),
    )
}


def serialize(value: object) -> tuple[str, bytes]:
    """The first serializer that accepts `value`, and the bytes it writes."""
    for serializer in SERIALIZERS.values():
        if serializer.matches(value):
            try:
                return serializer.name, serializer.dump(value)
            except Exception as exc:
                if serializer.name != "joblib":
                    # Any failure of json, npy or parquet (pyarrow's OverflowError for an int past 64 bits in
                    # an object column, its own ArrowException family...) leaves the value to joblib.
                    continue
                if not isinstance(exc, pickle.PicklingError | TypeError | AttributeError | ValueError |
                                  NotImplementedError):
                    raise
                # Lambdas and local classes: joblib cannot, cloudpickle can.
                try:
                    return "pickle", _pickle_dump(value)
                except Exception:
                    raise TypeError(f"cannot serialize a value of type {type_name(value)}: {exc}") from exc
    raise TypeError(f"no serializer for {type_name(value)}")  # pragma: no cover - joblib matches all


def deserialize(serializer: str, data: bytes) -> Any:
    """The value that `serializer` wrote as `data`."""
    try:
        load = SERIALIZERS[serializer].load
    except KeyError:
        raise ValueError(f"unknown serializer {serializer!r}; known: {sorted(SERIALIZERS)}") from None
    return load(data)
