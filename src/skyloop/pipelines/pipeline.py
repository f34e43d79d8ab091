"""`@pipeline`: a function whose body wires steps into a DAG; `compile()` turns it into a spec."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from pydantic import ValidationError

from skyloop.errors import SpecError
from skyloop.execution.loading import module_ref
from skyloop.pipelines.builder import Built, PipelineBuilder
from skyloop.pipelines.constants import check_constant
from skyloop.pipelines.refs import OutputRef, ParamRef, Ref
from skyloop.pipelines.types import type_str
from skyloop.pipelines.validate import validate_spec
from skyloop.spec.files import format_validation
from skyloop.spec.pipeline import NAME_RULE, PipelineSpec, StepRef, TaskInput, is_name
from skyloop.spec.pipeline import ParamSpec as ParamDecl

if TYPE_CHECKING:
    from skyloop.execution.run import Run

__all__ = ["CompiledPipeline", "Pipeline", "pipeline"]

P = ParamSpec("P")
R = TypeVar("R")


class CompiledPipeline:
    """A spec together with the step objects it came from (so notebook-defined steps still run)."""

    def __init__(self, spec: PipelineSpec, steps: dict[str, Any]) -> None:
        self.spec = spec
        self.steps = steps


def _outputs(result: Any) -> dict[str, TaskInput]:
    if result is None:
        return {}
    if isinstance(result, Ref):
        if not isinstance(result, OutputRef):
            raise SpecError("a pipeline returns step outputs, not its own parameters")
        return {"output": result.binding()}
    if isinstance(result, dict):
        items = list(result.items())
    elif isinstance(result, tuple):
        fields = getattr(result, "_fields", None) or [f"output_{i}" for i in range(len(result))]
        items = list(zip(fields, result, strict=True))
    else:
        raise SpecError(f"a pipeline body returns step outputs (one, a tuple or a dict), not "
                        f"{type(result).__name__}")
    outputs: dict[str, TaskInput] = {}
    for name, value in items:
        if not isinstance(value, OutputRef):
            raise SpecError(f"pipeline output {name!r} must be a step output, got {type(value).__name__}")
        outputs[str(name)] = value.binding()
    return outputs


def _check_kind(pipeline: str, param: inspect.Parameter) -> None:
    """Parameters are given by name (`-p n=3`, `params={"n": 3}`): refuse those that cannot be."""
    name, kind = param.name, param.kind
    example = f"{name}: list[int] = []` for a list"
    if kind is inspect.Parameter.VAR_POSITIONAL:
        what = f"*{name}"
    elif kind is inspect.Parameter.VAR_KEYWORD:
        what, example = f"**{name}", f"{name}: dict[str, int] = {{}}` for a mapping"
    elif kind is inspect.Parameter.POSITIONAL_ONLY:
        what = f"{name} (positional-only, before `/`)"
    else:
        return
    raise SpecError(f"pipeline {pipeline!r} takes parameter {what}, but pipeline parameters are given by name "
                    f"and each needs its own declaration; declare one named parameter per value "
                    f"(e.g. `{example})")


class Pipeline(Generic[P, R]):
    """A function marked as a pipeline. Nothing runs until it is compiled or run."""

    def __init__(self, fn: Callable[P, R], *, name: str | None = None, description: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not is_name(self.name):
            raise SpecError(f"@pipeline {self.name!r}: a pipeline name must {NAME_RULE}")
        self.description = description if description is not None else inspect.getdoc(fn) or ""
        functools.update_wrapper(self, fn)

    def params(self) -> list[ParamDecl]:
        """The pipeline's parameters with their types and defaults."""
        try:
            hints = typing.get_type_hints(self.fn)
        except Exception:
            hints = {}
        decls = []
        for name, param in inspect.signature(self.fn).parameters.items():
            _check_kind(self.name, param)
            required = param.default is inspect.Parameter.empty
            default = None if required else param.default
            check_constant(default, f"the default of parameter {name!r} of pipeline {self.name!r}")
            decls.append(ParamDecl(name=name, type=type_str(hints.get(name, Any)), default=default,
                                   required=required))
        return decls

    def build(self) -> CompiledPipeline:
        """Run the body with placeholders and return the spec plus its step objects."""
        try:
            hints = typing.get_type_hints(self.fn)
        except Exception:
            hints = {}
        decls = self.params()
        refs = {d.name: ParamRef(d.name, hints.get(d.name, Any)) for d in decls}
        builder = PipelineBuilder(self.name)
        with builder.active():
            result = cast(Callable[..., Any], self.fn)(**refs)
        built: Built = builder.built()
        if not built.tasks:
            raise SpecError(f"pipeline {self.name!r} calls no step")
        where = module_ref(self.fn.__module__)
        try:
            spec = PipelineSpec(
                name=self.name, description=self.description,
                source=StepRef(module=where, qualname=self.fn.__qualname__) if where else None,
                params=decls, tasks=built.tasks, outputs=_outputs(result),
            )
        except ValidationError as exc:
            raise SpecError(format_validation(exc, f"pipeline {self.name!r}")) from None
        validate_spec(spec, built.steps)
        return CompiledPipeline(spec, built.steps)

    def compile(self) -> PipelineSpec:
        """The declarative spec of this pipeline."""
        return self.build().spec

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Run:
        """Run the pipeline with these parameters on the default backend and return the finished run."""
        from skyloop.execution.api import run

        params = inspect.signature(self.fn).bind(*args, **kwargs).arguments
        return run(self, params=dict(params))

    def __repr__(self) -> str:
        return f"<pipeline {self.name}>"


@overload
def pipeline(fn: Callable[P, R], /) -> Pipeline[P, R]: ...


@overload
def pipeline(
    *, name: str | None = None, description: str | None = None
) -> Callable[[Callable[P, R]], Pipeline[P, R]]: ...


def pipeline(fn: Callable[P, R] | None = None, /, *, name: str | None = None,
             description: str | None = None) -> Pipeline[P, R] | Callable[[Callable[P, R]], Pipeline[P, R]]:
    """Mark a function as a pipeline: `@pipeline` or `@pipeline(name=..., description=...)`."""
    if fn is not None:
        return Pipeline(fn, name=name, description=description)

    def wrap(f: Callable[P, R]) -> Pipeline[P, R]:
        return Pipeline(f, name=name, description=description)

    return wrap
