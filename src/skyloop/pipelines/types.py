"""Readable type names for specs, and the compatibility check between connected steps."""

from __future__ import annotations

import ast
import builtins
import numbers
import types
import typing
from collections import abc
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "ACCEPTED_TYPES", "accepts_str", "can_map", "compatible", "element_type", "fits", "only_strings", "parse_type",
    "strings_or_none", "type_str", "unreadable_type",
]

_NUMERIC_WIDENING = {(int, float), (int, complex), (float, complex), (bool, int), (bool, float)}


def type_str(tp: Any) -> str:
    """`int`, `list[float]`, `pandas.core.frame.DataFrame`, `Any`."""
    if tp is Any or tp is None or tp is typing.Any:
        return "Any" if tp is not None else "None"
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
    text = repr(tp)
    return text.replace("typing.", "").replace("NoneType", "None")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _bare(tp: Any) -> Any:
    """`tp` without `Annotated[...]` metadata, which says nothing about what values fit."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def compatible(produced: Any, wanted: Any) -> bool:
    """Whether a value typed `produced` may be passed where `wanted` is declared (lenient on generics)."""
    produced, wanted = _bare(produced), _bare(wanted)
    if produced in (Any, None) or wanted in (Any, None) or isinstance(wanted, typing.TypeVar):
        return True
    if isinstance(produced, typing.TypeVar):
        return True
    # A union produced fits when each of its arms does; only then look for an arm of a union wanted
    # (the other order refuses `int | None` -> `int | None`: neither arm alone fits the whole union).
    if _is_union(produced):
        return all(compatible(arm, wanted) for arm in typing.get_args(produced))
    if _is_union(wanted):
        return any(compatible(produced, arm) for arm in typing.get_args(wanted))
    if typing.get_origin(produced) is typing.Literal:
        return all(compatible(type(value), wanted) for value in typing.get_args(produced))
    p_origin = typing.get_origin(produced) or produced
    w_origin = typing.get_origin(wanted) or wanted
    if not isinstance(p_origin, type) or not isinstance(w_origin, type):
        return True  # a Literal wanted, protocols: not worth refusing a pipeline over
    if (p_origin, w_origin) in _NUMERIC_WIDENING:
        return True
    try:
        if not issubclass(p_origin, w_origin):
            return False
    except TypeError:
        return True
    p_args, w_args = typing.get_args(produced), typing.get_args(wanted)
    if p_args and w_args and len(p_args) == len(w_args) and Ellipsis not in p_args + w_args:
        return all(compatible(p, w) for p, w in zip(p_args, w_args, strict=True))
    return True


# What a value of a numeric type may be (PEP 484's numeric tower; numpy registers its scalars in `numbers`).
_NUMERIC_VALUES: dict[type, type] = {int: numbers.Integral, float: numbers.Real, complex: numbers.Complex}


def fits(value: object, tp: Any) -> bool:
    """Whether `value` may be what `tp` declares, as far as `isinstance` tells (lenient like `compatible`).

    Only a container's own type is checked, not its items; an int fits `float`, a numpy number the Python
    number it stands for; what `isinstance` cannot check (protocols, `TypedDict`, `NewType`) fits.
    """
    tp = _bare(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    if tp is None or tp is type(None):
        return value is None
    if _is_union(tp):
        return any(fits(value, arm) for arm in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in typing.get_args(tp))
    origin = typing.get_origin(tp) or tp
    if not isinstance(origin, type):
        return True
    if origin in _NUMERIC_VALUES:
        return isinstance(value, _NUMERIC_VALUES[origin])
    if origin is bool and type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return True
    try:
        return isinstance(value, origin)
    except TypeError:
        return True


def element_type(tp: Any) -> Any:
    """The item type of a list-like type (what `.map` hands each call), else Any."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, set, frozenset) or (isinstance(origin, type) and args):
        return args[0] if args else Any
    return Any


def can_map(tp: Any) -> bool:
    """Whether a value typed `tp` may be a list or tuple, which is what `.map` fans out over.

    Lenient like `compatible`: unknown types, `Any`, `Sequence[...]` and `object` may all hold a list.
    """
    tp = _bare(tp)
    if tp in (Any, None) or isinstance(tp, typing.TypeVar):
        return True
    if _is_union(tp):
        return any(can_map(arm) for arm in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return False  # literals are strings, numbers, bools, enums or None
    origin = typing.get_origin(tp) or tp
    if not isinstance(origin, type):
        return True
    try:
        return issubclass(origin, list | tuple) or issubclass(list, origin)
    except TypeError:
        return True


def only_strings(tp: Any) -> bool:
    """Whether every value `tp` allows is a string: `str`, `Literal['a', 'b']`, or a union of those.

    A command-line parameter of such a type keeps its text as given (`-p mode=1` is the string '1').
    """
    return _strings(tp, all)


def strings_or_none(tp: Any) -> bool:
    """Whether `tp` is a union of string-only types and None: `str | None`, `Optional[Literal['a', 'b']]`."""
    tp = _bare(tp)
    if not _is_union(tp):
        return False
    arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
    return bool(arms) and all(only_strings(arm) for arm in arms)


def accepts_str(tp: Any) -> bool:
    """Whether some value `tp` allows is a string: `str`, `str | None`, `int | str`, `Literal['a', 1]`."""
    return _strings(tp, any)


def _strings(tp: Any, combine: Callable[[Iterable[bool]], bool]) -> bool:
    """Whether the values `tp` allows are strings, `combine` (all or any) over its literals and union arms."""
    tp = _bare(tp)
    if tp is str:
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return combine(isinstance(arg, str) for arg in args)
    if _is_union(tp):
        return combine(_strings(arm, combine) for arm in args)
    return False


# `typing` and `collections.abc` spellings of the containers pydantic can check (and `type_str` writes back as
# `List[float]` or `collections.abc.Sequence[float]`). `Iterable`, `Collection` and the like are left out on
# purpose: pydantic either cannot check them or hands back a one-shot iterator that a run cannot store.
_TYPING_CONTAINERS: dict[str, Any] = {
    "List": typing.List, "Dict": typing.Dict, "Tuple": typing.Tuple, "Set": typing.Set,  # noqa: UP006
    "FrozenSet": typing.FrozenSet, "AbstractSet": typing.AbstractSet,  # noqa: UP006
    "Sequence": typing.Sequence, "MutableSequence": typing.MutableSequence, "Mapping": typing.Mapping,
    "MutableMapping": typing.MutableMapping, "MutableSet": typing.MutableSet,
}
_ABC_CONTAINERS = types.SimpleNamespace(
    Sequence=abc.Sequence, MutableSequence=abc.MutableSequence, Mapping=abc.Mapping,
    MutableMapping=abc.MutableMapping, Set=abc.Set, MutableSet=abc.MutableSet,
)
_PARSE_NAMES: dict[str, Any] = {
    "Any": Any, "None": type(None), "int": int, "float": float, "str": str, "bool": bool,
    "bytes": bytes, "list": list, "dict": dict, "tuple": tuple, "set": set, "frozenset": frozenset,
    "Optional": typing.Optional, "Union": typing.Union, "Literal": typing.Literal, "Annotated": typing.Annotated,
    **_TYPING_CONTAINERS,
    "typing": types.SimpleNamespace(Any=Any, Optional=typing.Optional, Union=typing.Union, Literal=typing.Literal,
                                    Annotated=typing.Annotated, **_TYPING_CONTAINERS),
    "collections": types.SimpleNamespace(abc=_ABC_CONTAINERS),
}

# Names a spec may hold that `parse_type` leaves unchecked (Any): what `type_str` writes for other `typing`
# forms (`Callable[[int], int]`) and builtin classes (`object`, `complex`). Anything else bare is a typo.
_READABLE_NAMES = (set(_PARSE_NAMES) | set(typing.__all__)
                   | {name for name, value in vars(builtins).items() if isinstance(value, type)})

ACCEPTED_TYPES = ("int, float, str, bool, bytes, None, Any, list[int], dict[str, float], tuple[int, ...], set[str], "
                  "List/Dict/Tuple/Set/Sequence/Mapping[...], Optional[...] or X | None, Union[...], "
                  "Literal['a', 'b'], or a class written package.module.Class")
"""What a spec's type string may be, for error messages."""


def parse_type(text: str) -> Any:
    """Turn a spec's type string back into a type for parameter validation (Any when unknown)."""
    try:
        return eval(text, {"__builtins__": {}}, dict(_PARSE_NAMES))
    except Exception:
        return Any


def unreadable_type(text: str) -> str | None:
    """Why a spec's type string names no type (`lst[int]`: a typo), or None when it reads.

    Lenient where `type_str` itself writes what `parse_type` cannot read back: a dotted class name
    (`pandas.core.frame.DataFrame`), other `typing` forms, TypeVars (`~T`), `Annotated` metadata and the
    reprs of local classes or enum literals (`<locals>`, `<Color.RED: 1>`).
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None if "<" in text else "it is not a type expression"
    unknown = _unknown_names(tree.body)
    return f"{unknown[0]!r} is no type skyloop knows" if unknown else None


def _unknown_names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Name):
        return [] if node.id in _READABLE_NAMES else [node.id]
    if isinstance(node, ast.Subscript):
        base = node.value
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if isinstance(base, ast.Name) and base.id == "Literal":
            args = []  # values, not types
        elif isinstance(base, ast.Name) and base.id == "Annotated":
            args = args[:1]  # metadata (`Gt(gt=0)`) says nothing about the type
        return [name for part in (base, *args) for name in _unknown_names(part)]
    if isinstance(node, ast.BinOp):
        return _unknown_names(node.left) + _unknown_names(node.right)
    if isinstance(node, ast.List | ast.Tuple):
        return [name for part in node.elts for name in _unknown_names(part)]
    return []  # a dotted class name, a constant, a TypeVar (`~T`), metadata: nothing to refuse
