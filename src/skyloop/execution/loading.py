"""Find step and pipeline functions by reference: an importable module or a `.py` file.

A `.py` file is imported as a module of its own, and imported again once it has changed: a long-lived
process (`skyloop agent` and its warm workers) then runs the code the file holds now, as a new process
would. Installed modules are imported once per process, as Python does.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import linecache
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from skyloop.errors import SpecError
from skyloop.spec.files import format_validation
from skyloop.spec.pipeline import StepRef

__all__ = ["load_file_module", "module_ref", "resolve", "why_import_failed"]

_RACY_NS = 2 * 10**9
"""A file changed this close to when it was read can change again without its stat changing (file times
are coarse, down to seconds on some filesystems): until then its content is compared as well."""


@dataclass
class _Loaded:
    """A `.py` file as this process imported it last."""

    file: Path
    module: ModuleType
    stamp: tuple[int, int, int, int]
    """What `os.stat` said of the file then: mtime, ctime, size, inode."""
    digest: bytes
    """sha256 of the source it ran."""
    racy: bool
    """Whether the file was read too soon after a change for its stamp alone to tell the next one."""


_loaded: dict[str, _Loaded] = {}  # module name -> the file it was imported from
_names: dict[str, str] = {}  # absolute path as given -> module name (saves resolving symlinks per call)
_lock = threading.RLock()


def _module_name_for(path: Path) -> str:
    # Stable per file so that every process (and pickle by reference) agrees on the name.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"skyloop_user_{path.stem}_{digest}"


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


def load_file_module(path: str | Path) -> ModuleType:
    """Import a `.py` file as a module, and again whenever the file has changed since.

    An unchanged file costs one `stat` (a file changed in the last seconds: a read and a hash too).
    """
    given = os.fspath(path)
    key = given if os.path.isabs(given) else os.path.abspath(given)
    name = _names.get(key)
    loaded = _loaded.get(name) if name is not None else None
    if loaded is not None and sys.modules.get(loaded.module.__name__) is loaded.module and _unchanged(loaded):
        return loaded.module
    with _lock:
        return _load(given, key)


def _unchanged(loaded: _Loaded) -> bool:
    try:
        st = os.stat(loaded.file)
    except OSError:
        return False
    if _stamp(st) != loaded.stamp:
        return False
    if not loaded.racy:
        return True
    now = time.time_ns()
    try:
        same = hashlib.sha256(loaded.file.read_bytes()).digest() == loaded.digest
    except OSError:
        return False
    loaded.racy = same and st.st_mtime_ns >= now - _RACY_NS
    return same


def _load(given: str, key: str) -> ModuleType:
    file = Path(key).resolve()
    name = _module_name_for(file)
    if not file.is_file():
        raise SpecError(f"file {given!r} does not exist")
    try:
        with open(file, "rb") as fh:
            st = os.fstat(fh.fileno())  # before reading: a change made during the read shows next time
            now = time.time_ns()
            source = fh.read()
    except OSError as exc:
        raise SpecError(f"cannot read {given!r}: {exc}") from exc
    digest = hashlib.sha256(source).digest()
    racy = st.st_mtime_ns >= now - _RACY_NS
    _names[key] = name
    loaded = _loaded.get(name)
    if loaded is not None and loaded.digest == digest and sys.modules.get(name) is loaded.module:
        loaded.stamp, loaded.racy = _stamp(st), racy  # touched, or reached by another path: same code
        return loaded.module
    module = _execute(given, name, file, source, st)
    _loaded[name] = _Loaded(file, module, _stamp(st), digest, racy)
    return module


def _execute(given: str, name: str, file: Path, source: bytes, st: os.stat_result) -> ModuleType:
    """Run `source` (the file's content) as a fresh module `name`; on failure the previous one stays."""
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {given!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    # Let the file import its neighbours, as `python file.py` would.
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # `inspect.getsource` (and with it a step's code hash) reads through linecache, which trusts the
    # file's size and mtime: give it the lines that run, not ones it read before a same-size edit.
    try:
        lines = importlib.util.decode_source(source).splitlines(keepends=True)
    except (SyntaxError, UnicodeDecodeError) as exc:  # not UTF-8, nor in the encoding its coding line names
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise SpecError(f"cannot load {given!r}: it is not Python source in UTF-8 (or in the encoding its "
                        f"coding line names): {exc}") from None
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[str(file)] = (len(source), st.st_mtime, lines, str(file))
    try:
        # Compiled from the bytes read above, not by the loader: its bytecode cache trusts the size and
        # the whole second of the mtime, and would run the old code after a quick same-size edit.
        exec(compile(source, str(file), "exec", dont_inherit=True), module.__dict__)
    except BaseException as exc:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        if isinstance(exc, ValidationError):  # e.g. Resources(memory="5Gbb") at import time
            raise SpecError(f"cannot load {given!r}: {format_validation(exc, exc.title)}") from exc
        if isinstance(exc, Exception):  # a syntax error, a failed import, or the file's own code raising
            raise SpecError(f"cannot load {given!r}: {type(exc).__name__}: {exc}") from exc
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


def why_import_failed(exc: Exception) -> str:
    """Why an import failed, in one line: the message of an import error, else the exception's type too."""
    return str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"


def resolve(ref: StepRef) -> Any:
    """The object `ref` names."""
    try:
        module = load_file_module(ref.module) if ref.module.endswith(".py") else importlib.import_module(ref.module)
    except SpecError:
        raise
    except Exception as exc:  # the module's own code raising (as for a `.py` file), or `..steps`: a relative name
        raise SpecError(f"cannot import {ref.module!r} for step {ref.path!r}: {why_import_failed(exc)}") from exc
    obj: Any = module
    for part in ref.qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"{ref.module!r} has no {ref.qualname!r} (from {ref.path!r})") from None
    return obj
