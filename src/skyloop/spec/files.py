"""Reading spec files: YAML parsing and pydantic errors turned into one-line messages that name the field."""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from skyloop.errors import SpecError

__all__ = ["format_validation", "load_spec_file", "read_yaml", "validate"]

M = TypeVar("M", bound=BaseModel)


def _models_in(annotation: Any) -> list[Any]:
    """The members of a union (`X | None`, a discriminated union), with `Annotated` unwrapped; else `[annotation]`."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for arg in get_args(annotation) for a in _models_in(arg) if a is not type(None)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _tagged(model: type[BaseModel], tag: object) -> bool:
    """Whether one of the model's fields is a `Literal` holding `tag` (a discriminated union's member)."""
    return any(get_origin(f.annotation) is Literal and tag in get_args(f.annotation)
               for f in model.model_fields.values())


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The field names of the model found at `loc` inside `model`, or None where the path cannot be followed."""
    candidates: list[Any] = [model]
    for part in loc:
        members = [m for a in candidates for m in _models_in(a)]
        # A discriminated union's tag (`kind: task`) is a step of the location of its own.
        following: list[Any] = [m for m in members if _is_model(m) and _tagged(m, part)] if len(members) > 1 else []
        for member in members if not following else []:
            origin, args = get_origin(member), get_args(member)
            if _is_model(member) and isinstance(part, str) and part in member.model_fields:
                following.append(member.model_fields[part].annotation)
            elif origin in (list, tuple) and isinstance(part, int) and args:
                following.append(args[0])
            elif origin is dict and isinstance(part, str) and len(args) == 2:
                following.append(args[1])
        if not following:
            return None
        candidates = following
    models = [m for a in candidates for m in _models_in(a) if _is_model(m)]
    return list(models[0].model_fields) if len(models) == 1 else None


def _unknown_field(key: str, allowed: list[str] | None) -> str:
    """`unknown field 'replica'; did you mean 'replicas'?` (or the list of the fields there)."""
    if not allowed:
        return f"unknown field {key!r}; remove it"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown field {key!r}; did you mean {close[0]!r}?"
    return f"unknown field {key!r}; the fields here are {', '.join(allowed)}"


def format_validation(exc: ValidationError, what: str, model: type[BaseModel] | None = None) -> str:
    """`invalid WHAT: tasks.1.timeout: Input should be greater than 0; ...` (the first five problems).

    With the `model` that was validated, an unknown key names the field it was probably meant to be."""
    lines = []
    for err in exc.errors()[:5]:
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch":  # the pattern alone does not say which value broke it
            message = f"{err['input']!r} does not match {err.get('ctx', {}).get('pattern', 'the pattern')!r}"
        if err["type"] == "model_type" and model is not None:  # e.g. an empty file, a list, a bare string
            fields = _fields_at(model, loc)
            if fields:
                given = repr(err["input"])
                got = "nothing" if err["input"] is None else given if len(given) <= 40 else type(err["input"]).__name__
                message = f"must be a mapping with the fields {', '.join(fields)}; got {got}"
        if err["type"] == "extra_forbidden" and loc:
            message = _unknown_field(str(loc[-1]), _fields_at(model, loc[:-1]) if model is not None else None)
        if where and message.startswith(f"{where}: "):  # a validator that already named its field
            message = message[len(where) + 2:]
        if not where and re.match(r"^[\w.]+: ", message):  # a model validator naming the field itself
            lines.append(message)
            continue
        lines.append(f"{where or '(top level)'}: {message}")
    return f"invalid {what}: " + "; ".join(lines)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false, so that keys and values such as
    `on`, `off`, `yes` and `no` stay strings (a loop's `triggers: {on: [...]}` is not `{True: [...]}`); and, as
    YAML requires, a key written twice in one mapping is an error, not a silent choice of the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(path: str | Path) -> Any:
    """The parsed content of a YAML (or JSON) file, or a SpecError saying why it cannot be read."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except OSError as exc:
        raise SpecError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{str(path)!r} is not a text file in UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                        f"{exc.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None


def validate(cls: type[M], data: Any, what: str) -> M:
    """`cls.model_validate(data)`, with a SpecError naming each bad field instead of a ValidationError."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation(exc, what, cls)) from None


def load_spec_file(source: str | Path | dict[str, Any], cls: type[M], what: str, needs: str) -> M:
    """A spec of type `cls` from a YAML file, or an already parsed mapping; a file's folder becomes the spec's
    `base_dir` (where relative `file.py:Class` references are found). `needs` names the top-level keys."""
    if isinstance(source, dict):
        data, label, base = source, "(mapping)", None
    else:
        data, label, base = read_yaml(source), str(source), Path(source).resolve().parent
    if not isinstance(data, dict):
        raise SpecError(f"{what} {label} must be a mapping with {needs}")
    spec = validate(cls, data, f"{what} {label}")
    if base is not None and getattr(spec, "base_dir", base) is None:
        spec = spec.model_copy(update={"base_dir": base})
    return spec
