"""`@step`: mark a function as a pipeline step with resources, retries, timeout and caching."""

from __future__ import annotations

import functools
import hashlib
import inspect
import typing
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, ParamSpec, TypeVar, overload

from skyloop.errors import SpecError
from skyloop.execution.loading import module_ref
from skyloop.pipelines.types import type_str
from skyloop.spec.pipeline import NAME_RULE, CacheSpec, OutputDecl, RetrySpec, StepRef, is_name
from skyloop.spec.resources import Resources

__all__ = ["Step", "code_hash", "step"]

P = ParamSpec("P")
R = TypeVar("R")


def _is_namedtuple(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields")


@functools.cache
def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to untyped
        return {}


@functools.cache
def code_hash(fn: Callable[..., Any]) -> str:
    """sha256 of where a function lives and its source: what makes a cached result stale."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = getattr(getattr(fn, "__code__", None), "co_code", b"").hex()
    ident = f"{fn.__module__}:{fn.__qualname__}\n{source}"
    return hashlib.sha256(ident.encode()).hexdigest()


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
        try:
            self.resources = resources or Resources()
            self.retry = RetrySpec(retries=retries, delay=retry_delay, backoff=retry_backoff)
            self.cache = CacheSpec(enabled=cache, version=cache_version)
        except ValueError as exc:
            raise SpecError(f"@step {self.name!r}: {exc}") from exc
        if timeout is not None and timeout <= 0:
            raise SpecError(f"@step {self.name!r}: timeout must be > 0 seconds, got {timeout}")
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
