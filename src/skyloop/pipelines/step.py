"""`@step`: mark a function as a pipeline step with resources, retries, timeout and caching."""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import hashlib
import inspect
import logging
import math
import sysconfig
import textwrap
import types
import typing
from collections.abc import Callable
from numbers import Real
from typing import Any, Generic, NamedTuple, ParamSpec, TypeVar, overload

from skyloop.errors import SpecError
from skyloop.execution.loading import module_ref
from skyloop.pipelines.types import type_str
from skyloop.spec.pipeline import NAME_RULE, CacheSpec, OutputDecl, RetrySpec, StepRef, is_name
from skyloop.spec.resources import Resources

__all__ = ["UNCACHEABLE", "Step", "code_hash", "step"]

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("skyloop.pipelines")

UNCACHEABLE = "nocache-"
"""How the code hash of a function starts when a value it closes over has no digest that is the same in every
process: `skyloop.execution.cache.cache_key` gives such code a key no other attempt has."""


def _is_namedtuple(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields")


@functools.cache
def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to untyped
        return {}


def code_hash(fn: Callable[..., Any]) -> str:
    """sha256 of what makes a cached result of a function stale: where it lives, its source (without its
    `@step(...)` line: scheduling options do not change results), and the values it closes over and its
    defaults. Starts with `UNCACHEABLE` when one of those values has no digest stable across processes."""
    ident = _located_code(fn)
    try:
        values = _values_digest(fn, (id(fn),))
    except _NoDigest as exc:
        _warn_uncacheable(fn, str(exc))
        return UNCACHEABLE + hashlib.sha256(ident.encode()).hexdigest()[len(UNCACHEABLE):]
    if values:  # a function with neither keeps the hash it had before values were part of it
        ident += "\n" + values
    return hashlib.sha256(ident.encode()).hexdigest()


@functools.cache
def _located_code(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}\n{_code_text(fn)}"


@functools.cache
def _code_text(fn: Callable[..., Any]) -> str:
    """The function's source without its `@step` decorator; with no source (`python -`, `-c`, `exec`), a
    digest of its code object: bytecode, constants, names and nested code, but not line numbers."""
    try:
        return _without_step_decorator(inspect.getsource(fn))
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return "code " + _code_digest(code, ()) if isinstance(code, types.CodeType) else ""


def _without_step_decorator(source: str) -> str:
    # Only `@step`/`@x.step`: another decorator may change what the function computes.
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:  # e.g. a lambda's line
        return source
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return source
    drop: set[int] = set()
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else ""
        if name == "step":
            drop.update(range(deco.lineno - 1, (deco.end_lineno or deco.lineno)))
    return "".join(line for i, line in enumerate(source.splitlines(keepends=True)) if i not in drop)


class _NoDigest(Exception):
    """A value with no digest that is the same in every process."""


def _values_digest(fn: Callable[..., Any], seen: tuple[int, ...]) -> str:
    """The values a function closes over, its defaults and the module-level values and functions it reads
    (`_globals_digest`), or "" when it has none."""
    parts = []
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    names = code.co_freevars if isinstance(code, types.CodeType) else ()
    for name, cell in zip(names, cells, strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # not assigned (yet)
            parts.append(f"{name}=<empty>")
            continue
        try:
            parts.append(f"{name}={_digest(value, seen)}")
        except _NoDigest as exc:
            raise _NoDigest(f"the value of {name!r} in its closure is {exc}") from None
    for label, value in (("defaults", getattr(fn, "__defaults__", None)),
                         ("kwdefaults", getattr(fn, "__kwdefaults__", None))):
        if value:
            try:
                parts.append(f"{label}={_digest(value, seen)}")
            except _NoDigest as exc:
                raise _NoDigest(f"a default value of a parameter is {exc}") from None
    if used := _globals_digest(fn, seen):
        parts.append(f"globals={used}")
    return ";".join(parts)


def _globals_digest(fn: Callable[..., Any], seen: tuple[int, ...]) -> str:
    """The module-level values and functions a function reads by name, or "": plain values (a factor, a list of
    columns) and functions of the user's own code (the helpers a step calls, and theirs), so that editing one
    makes cached results stale. Modules, classes, library functions and objects with no stable digest (a
    logger, a client, a frame loaded at import) are left out: they never make a step uncacheable."""
    code = getattr(fn, "__code__", None)
    scope = getattr(fn, "__globals__", None)
    if not isinstance(code, types.CodeType) or not isinstance(scope, dict):
        return ""
    parts = []
    for name in sorted(_global_names(code)):
        value = scope.get(name, _MISSING)
        if isinstance(value, Step):
            value = value.fn
        if isinstance(value, types.FunctionType):
            if id(value) in seen or not _users_own(value, fn):
                continue
            try:
                parts.append(f"{name}=function:{_function_digest(value, (*seen, id(value)))}")
            except _NoDigest:  # a helper closing over an object: its code still counts
                parts.append(f"{name}=function:{_located_code(value)}")
        elif value is not _MISSING and not callable(value) and not isinstance(value, types.ModuleType | type):
            try:
                parts.append(f"{name}={_digest(value, seen)}")
            except _NoDigest:
                continue
    return ";".join(parts)


_MISSING = object()


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object (and the code nested in it: comprehensions, lambdas) looks up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _users_own(helper: types.FunctionType, step_fn: Callable[..., Any]) -> bool:
    """Whether `helper` is the user's code: of the step's own module, or of a file outside the standard library,
    the installed packages and skyloop."""
    if helper.__module__ == getattr(step_fn, "__module__", None):
        return True
    module = helper.__module__ or ""
    if module == "skyloop" or module.startswith("skyloop."):
        return False
    return not helper.__code__.co_filename.startswith(_LIBRARY_PATHS)


_LIBRARY_PATHS = tuple(sorted({p for key in ("stdlib", "platstdlib", "purelib", "platlib")
                               if (p := sysconfig.get_paths().get(key))}))


_FLAT = (type(None), bool, int, float, complex, str, bytes)


def _digest(value: object, seen: tuple[int, ...]) -> str:
    """A text that names `value` alike in every process: no addresses, no hash-seeded order, types kept
    (1, 1.0 and True differ). Raises `_NoDigest` for a value it cannot spell so (most objects: their repr
    may leave state out or hold an address)."""
    kind = type(value)
    if kind in _FLAT or value is Ellipsis:
        return f"{kind.__qualname__}:{value!r}"
    if id(value) in seen:
        return "<cycle>"
    if len(seen) > 64:
        raise _NoDigest("nested too deeply")
    inner = (*seen, id(value))
    # Exact types: a subclass (an OrderedDict, a Counter) may hold or mean more than its items.
    if isinstance(value, tuple | list) and kind in (tuple, list):
        return f"{kind.__qualname__}(" + ",".join(_digest(v, inner) for v in value) + ")"
    if isinstance(value, tuple) and _is_namedtuple(kind) and kind.__mro__[1] is tuple:
        return f"namedtuple:{kind.__module__}:{kind.__qualname__}" + _digest(tuple(value), inner)
    if isinstance(value, dict) and kind is dict:
        return "dict(" + ",".join(f"{_digest(k, inner)}:{_digest(v, inner)}" for k, v in value.items()) + ")"
    if isinstance(value, set | frozenset) and kind in (set, frozenset):  # iteration order follows the hash seed
        return f"{kind.__qualname__}(" + ",".join(sorted(_digest(v, inner) for v in value)) + ")"
    if isinstance(value, bytearray) and kind is bytearray:
        return f"bytearray:{bytes(value)!r}"
    if isinstance(value, Step):
        return "step:" + _function_digest(value.fn, inner)
    if isinstance(value, types.FunctionType):
        return "function:" + _function_digest(value, inner)
    if isinstance(value, types.CodeType):
        return "code:" + _code_digest(value, inner)
    if isinstance(value, types.BuiltinFunctionType) and (value.__self__ is None
                                                         or isinstance(value.__self__, types.ModuleType)):
        return f"builtin:{value.__module__}:{value.__qualname__}"
    if isinstance(value, types.ModuleType):
        return f"module:{value.__name__}"
    if isinstance(value, type):  # by name, as a global it refers to would be
        return f"class:{value.__module__}:{value.__qualname__}"
    if isinstance(value, enum.Enum):
        return f"enum:{kind.__module__}:{kind.__qualname__}.{value.name}"
    if isinstance(value, functools.partial):
        return ("partial(" + _digest(value.func, inner) + "," + _digest(value.args, inner) + ","
                + _digest(value.keywords, inner) + ")")
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        fields.update(getattr(value, "__dict__", {}))
        spelled = ",".join(f"{k}={_digest(v, inner)}" for k, v in sorted(fields.items()))
        return f"dataclass:{kind.__module__}:{kind.__qualname__}({spelled})"
    array: Any = value  # an array or a scalar of numpy, when it is one: by its bytes, not its (short) repr
    if kind.__module__ == "numpy" and hasattr(array, "tobytes") and not getattr(array.dtype, "hasobject", True):
        data = hashlib.sha256(array.tobytes()).hexdigest()
        return f"numpy:{kind.__qualname__}:{array.dtype.str}:{array.shape}:{data}"
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    raise _NoDigest(f"a {module}{kind.__qualname__}")


def _function_digest(fn: Callable[..., Any], seen: tuple[int, ...]) -> str:
    return f"{_located_code(fn)}\n{_values_digest(fn, seen)}"


def _code_digest(code: types.CodeType, seen: tuple[int, ...]) -> str:
    # Not marshal.dumps: its bytes depend on reference counts (which objects it writes as back-references)
    # and hold the file name and line numbers, so the same code could differ between processes or after a
    # line was added above it.
    fields = (code.co_name, code.co_qualname, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
              code.co_flags, code.co_code.hex(), code.co_exceptiontable.hex(), code.co_names, code.co_varnames,
              code.co_freevars, code.co_cellvars)
    return repr(fields) + "consts(" + ",".join(_digest(c, seen) for c in code.co_consts) + ")"


_warned: set[tuple[str, str, str]] = set()


def _warn_uncacheable(fn: Callable[..., Any], why: str) -> None:
    key = (fn.__module__, fn.__qualname__, why)
    if key in _warned:  # once per process: the hash is taken for each run and each estimate
        return
    _warned.add(key)
    log.warning("step function %s.%s: %s, which has no digest that is the same in every process, so the "
                "step's results are never taken from the cache; pass the value as a step input or a "
                "pipeline parameter instead (or give the step cache=False)", fn.__module__, fn.__qualname__, why)


class Step(Generic[P, R]):
    """A function marked as a pipeline step. Calling it inside a `@pipeline` body adds a task;
    calling it anywhere else just runs the function."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        resources: Resources | None = None,
        retries: int = 0,
        retry_delay: float = 0.0,
        retry_backoff: float = 1.0,
        timeout: float | None = None,
        cache: bool = True,
        cache_version: str = "",
        priority: int = 0,
        pool: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not is_name(self.name):
            raise SpecError(f"@step {self.name!r}: a step name must {NAME_RULE}")
        if pool is not None and not is_name(pool):
            raise SpecError(f"@step {self.name!r}: pool {pool!r} is not a valid pool name; a pool name must "
                            f"{NAME_RULE}")
        _check_numbers(self.name, retries=retries, retry_delay=retry_delay, retry_backoff=retry_backoff,
                       timeout=timeout, priority=priority)
        try:
            self.resources = resources or Resources()
            self.retry = RetrySpec(retries=retries, delay=retry_delay, backoff=retry_backoff)
            self.cache = CacheSpec(enabled=cache, version=cache_version)
        except ValueError as exc:
            raise SpecError(f"@step {self.name!r}: {exc}") from exc
        self.timeout = timeout
        self.priority = priority
        self.pool = pool
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        from skyloop.pipelines.builder import current_builder

        builder = current_builder()
        if builder is None:
            return self.fn(*args, **kwargs)
        return builder.add_task(self, args, kwargs, mapped=False)  # type: ignore[return-value]

    def map(self, *args: Any, **kwargs: Any) -> Any:
        """Fan out: one call per element of every list argument (zipped); results come back as a list.

        Wrap an argument in `unmapped(...)` to pass it whole to every call.
        """
        from skyloop.pipelines.builder import current_builder

        builder = current_builder()
        if builder is None:
            return _map_now(self.fn, args, kwargs)
        return builder.add_task(self, args, kwargs, mapped=True)

    def with_options(self, **options: Any) -> Step[P, R]:
        """A copy of this step with some options changed (e.g. `name=`, `retries=`)."""
        current: dict[str, Any] = {
            "name": self.name, "resources": self.resources, "retries": self.retry.retries,
            "retry_delay": self.retry.delay, "retry_backoff": self.retry.backoff, "timeout": self.timeout,
            "cache": self.cache.enabled, "cache_version": self.cache.version, "priority": self.priority,
            "pool": self.pool,
        }
        unknown = set(options) - set(current)
        if unknown:
            raise SpecError(f"with_options got unknown option(s) {sorted(unknown)}; known: {sorted(current)}")
        return Step(self.fn, **{**current, **options})

    @property
    def ref(self) -> StepRef:
        """How another process finds this step's function."""
        where = module_ref(self.fn.__module__)
        return StepRef(module=where or self.fn.__module__, qualname=self.fn.__qualname__)

    @property
    def importable(self) -> bool:
        """Whether another process can import the function by reference."""
        return module_ref(self.fn.__module__) is not None and "<locals>" not in self.fn.__qualname__

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        """The wrapped function's signature."""
        return inspect.signature(self.fn)

    @functools.cached_property
    def input_types(self) -> dict[str, Any]:
        """Declared type of each parameter (missing ones are Any)."""
        hints = _hints(self.fn)
        return {name: hints.get(name, Any) for name in self.signature.parameters}

    @functools.cached_property
    def return_type(self) -> Any:
        """The declared return type (Any when missing)."""
        return _hints(self.fn).get("return", Any)

    @functools.cached_property
    def output_types(self) -> dict[str, Any]:
        """Name -> type of each output: the fields of a NamedTuple return, else one `output`."""
        ret = self.return_type
        if _is_namedtuple(ret):
            field_types = typing.get_type_hints(ret)
            return {f: field_types.get(f, Any) for f in ret._fields}
        return {"output": ret}

    @functools.cached_property
    def multi_output(self) -> bool:
        """Whether the step returns a NamedTuple of named outputs."""
        return _is_namedtuple(self.return_type)

    def output_decls(self) -> list[OutputDecl]:
        """Outputs as declared in a spec."""
        return [OutputDecl(name=n, type=type_str(t)) for n, t in self.output_types.items()]

    def __repr__(self) -> str:
        return f"<step {self.name} ({self.fn.__module__}.{self.fn.__qualname__})>"


def _check_numbers(name: str, *, retries: object, retry_delay: object, retry_backoff: object, timeout: object,
                   priority: object) -> None:
    """A wrong option named with what it takes, not a TypeError from comparing it (or a pydantic report)."""
    def at_least(value: object, low: float, whole: bool = False, above: bool = False, finite: bool = False) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, int):  # as it is: a float would round a large one
            return value > low if above else value >= low
        if finite and isinstance(value, Real) and not math.isfinite(float(value)):
            return False
        return not whole and isinstance(value, Real) and (float(value) > low if above else float(value) >= low)

    wrong = (
        ("retries", retries, at_least(retries, 0, whole=True),
         "a whole number greater than or equal to 0, e.g. retries=2"),
        ("retry_delay", retry_delay, at_least(retry_delay, 0, finite=True),
         "a finite number of seconds greater than or equal to 0, e.g. retry_delay=5"),
        ("retry_backoff", retry_backoff, at_least(retry_backoff, 1, finite=True),
         "a finite number greater than or equal to 1 (it multiplies the delay after each retry), "
         "e.g. retry_backoff=2"),
        ("timeout", timeout, timeout is None or at_least(timeout, 0, above=True),
         "> 0: a number of seconds, e.g. timeout=60 for a minute (or None for no limit)"),
        ("priority", priority, at_least(priority, -math.inf, whole=True), "a whole number, e.g. priority=5"),
    )
    for option, value, ok, takes in wrong:
        if not ok:
            raise SpecError(f"@step {name!r}: {option} must be {takes}; got {value!r}")


class unmapped(NamedTuple):
    """Pass a value whole to every call of a `.map`."""

    value: Any


def _map_now(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    mapped = {k: v for k, v in bound.arguments.items() if not isinstance(v, unmapped)}
    lengths = {len(v) for v in mapped.values()}
    if len(lengths) > 1:
        raise SpecError(f"map arguments have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    fixed = {k: v.value for k, v in bound.arguments.items() if isinstance(v, unmapped)}
    return [fn(**fixed, **{k: v[i] for k, v in mapped.items()}) for i in range(n)]


@overload
def step(fn: Callable[P, R], /) -> Step[P, R]: ...


@overload
def step(
    *,
    name: str | None = None,
    resources: Resources | None = None,
    retries: int = 0,
    retry_delay: float = 0.0,
    retry_backoff: float = 1.0,
    timeout: float | None = None,
    cache: bool = True,
    cache_version: str = "",
    priority: int = 0,
    pool: str | None = None,
) -> Callable[[Callable[P, R]], Step[P, R]]: ...


def step(fn: Callable[P, R] | None = None, /, **options: Any) -> Step[P, R] | Callable[[Callable[P, R]], Step[P, R]]:
    """Mark a function as a step: `@step` or `@step(resources=Resources(cpus=2), retries=2, timeout=60)`.

    `priority` orders steps inside a run's priority class; `pool` names a concurrency pool whose limit
    (settings `execution.pools`) holds across all runs.
    """
    if fn is not None:
        return Step(fn, **options)

    def wrap(f: Callable[P, R]) -> Step[P, R]:
        return Step(f, **options)

    return wrap
