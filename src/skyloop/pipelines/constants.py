"""What a pipeline spec may hold as a constant: values that come back unchanged from its JSON and YAML."""

from __future__ import annotations

import math
from typing import Any

from skyloop.errors import SpecError

__all__ = ["check_constant"]

_PLAIN = (str, int, float, bool, type(None))


def _loss(value: Any, path: str) -> tuple[str, str, str, str] | None:
    """(where inside `value`, what it is, why JSON changes it, the fix) for the first part JSON would change."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"is {value!r}", " (JSON has no inf or nan)", "compute it inside a step, or use a finite number"
    if isinstance(value, tuple):
        return path, "is a tuple", " (its YAML gives back a list)", "pass a list instead"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _loss(item, f"{path}[{i}]")) is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return path, f"has the key {key!r} ({type(key).__name__})", " (JSON keys are strings)", \
                    "use string keys"
            if (found := _loss(item, f"{path}[{key!r}]")) is not None:
                return found
        return None
    if isinstance(value, _PLAIN):
        return None
    if isinstance(value, set | frozenset):
        return path, f"is a {type(value).__name__}", "", "pass a list instead"
    kind = type(value).__name__
    if type(value).__module__ == "numpy":
        return path, f"is a numpy {kind}", "", "convert it with int(...), float(...) or .tolist()"
    return path, f"is a {kind}", "", "make it a pipeline parameter or have a step produce it"


def check_constant(value: Any, where: str) -> None:
    """Raise a SpecError naming `where` (e.g. "argument 'x' of step 'a'") when `value` would not come back
    unchanged from the spec's YAML: only None, bools, numbers (not inf or nan), strings, lists and dicts with
    string keys do."""
    found = _loss(value, "")
    if found is not None:
        path, problem, why, fix = found
        raise SpecError(f"{where}{path} {problem}, which a pipeline spec cannot hold as a constant{why}; {fix}")
