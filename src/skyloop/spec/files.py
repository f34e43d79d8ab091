"""Reading spec files: YAML parsing and pydantic errors turned into one-line messages that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from skyloop.errors import SpecError

__all__ = ["format_validation", "load_spec_file", "read_yaml", "validate"]

M = TypeVar("M", bound=BaseModel)


def format_validation(exc: ValidationError, what: str) -> str:
    """`invalid WHAT: tasks.1.timeout: Input should be greater than 0; ...` (the first five problems)."""
    lines = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
    return f"invalid {what}: " + "; ".join(lines)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false, so that keys and values such as
    `on`, `off`, `yes` and `no` stay strings (a loop's `triggers: {on: [...]}` is not `{True: [...]}`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(path: str | Path) -> Any:
    """The parsed content of a YAML (or JSON) file, or a SpecError saying why it cannot be read."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except OSError as exc:
        raise SpecError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None


def validate(cls: type[M], data: Any, what: str) -> M:
    """`cls.model_validate(data)`, with a SpecError naming each bad field instead of a ValidationError."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation(exc, what)) from None


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
