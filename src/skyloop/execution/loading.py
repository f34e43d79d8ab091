"""Find step and pipeline functions by reference: an importable module or a `.py` file."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from skyloop.errors import SpecError
from skyloop.spec.files import format_validation
from skyloop.spec.pipeline import StepRef

__all__ = ["load_file_module", "module_ref", "resolve"]


def _module_name_for(path: Path) -> str:
    # Stable per file so that every process (and pickle by reference) agrees on the name.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"skyloop_user_{path.stem}_{digest}"


def load_file_module(path: str | Path) -> ModuleType:
    """Import a `.py` file as a module (once per process)."""
    file = Path(path).resolve()
    name = _module_name_for(file)
    if name in sys.modules:
        return sys.modules[name]
    if not file.is_file():
        raise SpecError(f"file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Let the file import its neighbours, as `python file.py` would.
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except ValidationError as exc:  # e.g. Resources(memory="5Gbb") at import time
        del sys.modules[name]
        raise SpecError(f"cannot load {str(path)!r}: {format_validation(exc, exc.title)}") from exc
    except Exception as exc:  # a syntax error, a failed import, or the file's own code raising
        del sys.modules[name]
        raise SpecError(f"cannot load {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        del sys.modules[name]
        raise
    return module


def module_ref(module_name: str) -> str | None:
    """How another process finds `module_name`: itself, its file path, or None (e.g. `__main__`)."""
    module = sys.modules.get(module_name)
    if module_name.startswith("skyloop_user_") and module is not None and module.__file__:
        return module.__file__
    if module_name == "__main__" or module is None:
        return None
    return module_name


def resolve(ref: StepRef) -> Any:
    """The object `ref` names."""
    try:
        module = load_file_module(ref.module) if ref.module.endswith(".py") else importlib.import_module(ref.module)
    except SpecError:
        raise
    except ImportError as exc:
        raise SpecError(f"cannot import {ref.module!r} for step {ref.path!r}: {exc}") from exc
    obj: Any = module
    for part in ref.qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"{ref.module!r} has no {ref.qualname!r} (from {ref.path!r})") from None
    return obj
