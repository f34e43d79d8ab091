"""Validate pipeline parameters against the spec's declared types."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from skyloop.errors import SpecError
from skyloop.pipelines.types import accepts_str, only_strings, parse_type, strings_or_none
from skyloop.spec.pipeline import PipelineSpec

__all__ = ["parse_cli_params", "resolve_params"]


def resolve_params(spec: PipelineSpec, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and each value checked against its declared type."""
    declared = {p.name: p for p in spec.params}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise SpecError(f"pipeline {spec.name!r} has no parameter {unknown[0]!r}; parameters are {sorted(declared)}")
    values: dict[str, Any] = {}
    for name, decl in declared.items():
        if name not in given:
            if decl.required:
                raise SpecError(f"parameter {name!r} ({decl.type}) is required; pass it with -p {name}=VALUE")
            values[name] = _as_declared(decl.type, decl.default)
            continue
        try:
            values[name] = TypeAdapter(parse_type(decl.type)).validate_python(given[name])
        except ValidationError as exc:
            raise SpecError(f"parameter {name!r} expects {decl.type}, got {given[name]!r}: "
                            f"{exc.errors()[0]['msg']}") from None
        try:
            # allow_nan=False: a float parameter takes "nan" and "inf" as text (-p x=nan), which JSON cannot store.
            json.dumps(values[name], allow_nan=False)
        except ValueError:
            _not_finite(name)("NaN or Infinity")
        except TypeError:
            raise SpecError(f"parameter {name!r} must be JSON-like (numbers, strings, lists, dicts)") from None
    return values


def _as_declared(type_text: str, default: Any) -> Any:
    """A default as a given value of that type becomes (`x: float = 2` gives 2.0, as `-p x=2` does): else the
    run, and its cache key, would depend on whether the value was given. Checked when the pipeline compiled."""
    if default is None:
        return None
    try:
        return TypeAdapter(parse_type(type_text)).validate_python(default)
    except Exception:  # a type pydantic cannot check (a class of the user's): as it is
        return default


def parse_cli_params(spec: PipelineSpec, pairs: list[str]) -> dict[str, Any]:
    """`["n=3", "name=x"]` -> values: JSON where it parses, else the plain string (then type-checked).

    A string-typed parameter keeps its text (`tag: str | None` given `2024` is '2024'; `null` is None), and one
    that may be a string keeps it where the JSON value does not fit (`int | str` given `true` is 'true').
    """
    declared = {p.name: p.type for p in spec.params}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise SpecError(f"parameter {pair!r} must look like NAME=VALUE")
        wanted = parse_type(declared.get(name, "Any"))
        if only_strings(wanted):
            values[name] = raw
            continue
        if strings_or_none(wanted):  # `tag: str | None`: text as `str` keeps it, but `null` is None
            values[name] = None if raw == "null" else raw
            continue
        try:
            values[name] = json.loads(raw, parse_constant=_not_finite(name))
        except json.JSONDecodeError:
            values[name] = raw
            continue
        if accepts_str(wanted) and not _fits(wanted, values[name]):
            values[name] = raw  # `float | str` given `[1, 2]`, `Literal[1, 'true']` given `true`: the text
    return values


def _fits(tp: Any, value: Any) -> bool:
    try:
        TypeAdapter(tp).validate_python(value)
    except ValidationError:
        return False
    return True


def _not_finite(name: str) -> Any:
    def refuse(constant: str) -> Any:
        raise SpecError(f"parameter {name!r}: {constant} is not a value a run can store (its parameters are "
                        "JSON); give a finite number")

    return refuse
