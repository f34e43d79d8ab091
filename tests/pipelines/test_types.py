"""Type names in specs, and which types may feed which: unions, literals, what `.map` can fan out over, and
which values a declared type admits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, NamedTuple, NewType, Optional, Protocol, TypedDict, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import TypeAdapter, ValidationError

from skyloop.pipelines.types import can_map, compatible, fits, only_strings, parse_type, type_str

# `Optional[...]` on purpose: users still write it, and its spec text differs from `X | None`'s.
OPT_STR = Optional[str]  # noqa: UP045
OPT_INT = Optional[int]  # noqa: UP045
OPT_LITERAL = Optional[Literal["x"]]  # noqa: UP045


class _Sized(Protocol):
    def size(self) -> int: ...


class _Row(TypedDict):
    a: int


@pytest.mark.parametrize("tp", [OPT_STR, int | None, OPT_INT, list[float] | None, int | str | None])
def test_a_union_fits_the_same_union(tp: Any) -> None:
    assert compatible(tp, tp)
    assert compatible(parse_type(type_str(tp)), tp)


@pytest.mark.parametrize(("produced", "wanted", "fits"), [
    (int, int | None, True),
    (type(None), int | None, True),
    (int | None, int, False),  # None may come out: refused
    (int | None, float | None, True),  # each arm fits some arm
    (int | str, int | None, False),
    (Literal["a", "b"], str, True),
    (Literal["a", 1], str, False),
    (Annotated[int, "meta"], int | None, True),
])
def test_union_and_literal_compatibility(produced: Any, wanted: Any, fits: bool) -> None:
    assert compatible(produced, wanted) is fits


@pytest.mark.parametrize("tp", [Literal["a", "1"], Literal[1, 2], Annotated[int, "positive"], OPT_LITERAL])
def test_literal_and_annotated_parse_back(tp: Any) -> None:
    assert parse_type(type_str(tp)) == tp


def test_a_literal_parameter_is_validated() -> None:
    adapter = TypeAdapter(parse_type(type_str(Literal["a", "1"])))
    assert adapter.validate_python("1") == "1"
    with pytest.raises(ValidationError):
        adapter.validate_python("zzz")


@pytest.mark.parametrize(("tp", "strings"), [
    (str, True), (Literal["a", "1"], True), (Literal["a"] | str, True), (Annotated[str, "x"], True),
    (Literal["a", 1], False), (int, False), (OPT_STR, False), (Any, False), (list[str], False),
])
def test_only_strings(tp: Any, strings: bool) -> None:
    assert only_strings(tp) is strings


@pytest.mark.parametrize(("tp", "mappable"), [
    (list[float], True), (tuple[int, ...], True), (list[int] | None, True), (Sequence[int], True), (Any, True),
    (object, True), (float, False), (int, False), (str, False), (dict[str, int], False), (Literal["a"], False),
    (float | None, False),
])
def test_what_map_can_fan_out_over(tp: Any, mappable: bool) -> None:
    assert can_map(tp) is mappable


class _Shape(NamedTuple):
    rows: int


@pytest.mark.parametrize(("value", "tp", "ok"), [
    ("seven", int, False),
    (7, int, True),
    (np.int64(7), int, True),  # numpy numbers are the Python numbers they stand for
    (np.float32(0.5), float, True),
    (7, float, True),  # an int is a float
    (1j, float, False),
    (np.bool_(True), bool, True),
    (None, int | None, True),
    (None, int, False),
    (None, type(None), True),
    (3, type(None), False),
    ((1, 2), list[int], False),
    ([1, "x"], list[int], True),  # items are not checked
    (np.zeros(2), list[float], False),
    (np.zeros(2), npt.NDArray[np.float64], True),
    ({"a": 1}, Mapping[str, int], True),
    ("b", Literal["a", "b"], True),
    ("c", Literal["a", "b"], False),
    (True, Literal[1], False),
    (_Shape(1), tuple[int, ...], True),
    (3, Annotated[int, "positive"], True),
    ("x", Annotated[int, "positive"], False),
    (3, Any, True),
    (3, TypeVar("T"), True),
    (3, _Sized, True),  # a protocol isinstance cannot check
    ({"a": 1}, _Row, True),  # a TypedDict, likewise
    (3, NewType("UserId", int), True),
])
def test_fits(value: object, tp: Any, ok: bool) -> None:
    assert fits(value, tp) is ok
