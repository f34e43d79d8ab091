"""Compile a `@pipeline` body into a `PipelineSpec` by calling it with placeholders."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from skyloop.errors import SpecError
from skyloop.pipelines.constants import check_constant
from skyloop.pipelines.refs import Ref, TaskHandle
from skyloop.pipelines.step import Step, unmapped
from skyloop.pipelines.types import type_str
from skyloop.spec.files import format_validation
from skyloop.spec.pipeline import Condition, ConstInput, InputBinding, TaskSpec

__all__ = ["Built", "PipelineBuilder", "current_builder", "when"]

_builder: ContextVar[PipelineBuilder | None] = ContextVar("skyloop_pipeline_builder", default=None)


def current_builder() -> PipelineBuilder | None:
    """The builder of the pipeline being compiled in this context, if any."""
    return _builder.get()


@dataclass
class Built:
    """The tasks a pipeline body produced and the step objects behind them."""

    tasks: list[TaskSpec]
    steps: dict[str, Step[Any, Any]]


def _const(value: Any, where: str) -> ConstInput:
    check_constant(value, where)
    return ConstInput(value=value)


class PipelineBuilder:
    """Records the tasks that step calls add while a pipeline body runs."""

    def __init__(self, pipeline_name: str) -> None:
        self.pipeline_name = pipeline_name
        self.tasks: list[TaskSpec] = []
        self.steps: dict[str, Step[Any, Any]] = {}
        self._conditions: list[Condition] = []
        self._names: dict[str, int] = {}
        self._taken: set[str] = set()

    @contextlib.contextmanager
    def active(self) -> Iterator[PipelineBuilder]:
        """Make this the builder that step calls report to."""
        token = _builder.set(self)
        try:
            yield self
        finally:
            _builder.reset(token)

    def _unique_name(self, base: str) -> str:
        # `a`, `a-2`, `a-3`, ...; skipping names already taken, such as a step renamed `a-2` by hand.
        count = self._names.get(base, 0)
        while True:
            count += 1
            name = base if count == 1 else f"{base}-{count}"
            if name not in self._taken:
                break
        self._names[base] = count
        self._taken.add(name)
        return name

    def _bind(self, task: str, name: str, value: Any) -> InputBinding:
        if isinstance(value, Ref):
            return value.binding()
        if isinstance(value, list | tuple | dict) and _holds_ref(value):
            raise SpecError(f"{task}.{name} is a container of step outputs; pass each output to its own "
                            "argument, or produce the list in a step (or with `.map`)")
        return _const(value, f"argument {name!r} of step {task!r}")

    def add_task(self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 mapped: bool) -> TaskHandle:
        """Record one call of `step` and return the handle of its outputs."""
        task = self._unique_name(step.name)
        signature = step.signature
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise SpecError(f"step {task!r} in pipeline {self.pipeline_name!r}: {exc}") from None
        inputs: dict[str, InputBinding] = {}
        map_over: list[str] = []
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise SpecError(f"step {task!r}: *args/**kwargs parameters cannot be wired; name each input")
            fixed = isinstance(value, unmapped)
            if fixed and not mapped:
                raise SpecError(f"step {task!r}: unmapped(...) only makes sense inside .map(...)")
            inner = value.value if fixed else value
            inputs[name] = self._bind(task, name, inner)
            if mapped and not fixed:
                map_over.append(name)
        if mapped and not map_over:
            raise SpecError(f"step {task!r}: .map(...) needs at least one list argument to fan out over")
        try:
            spec = TaskSpec(
                name=task, step=step.ref, inputs=inputs,
                input_types={n: type_str(t) for n, t in step.input_types.items()},
                outputs=step.output_decls(), multi_output=step.multi_output, map_over=map_over,
                when=list(self._conditions), resources=step.resources, retry=step.retry,
                timeout=step.timeout, cache=step.cache, priority=step.priority, pool=step.pool,
            )
        except ValidationError as exc:
            raise SpecError(format_validation(exc, f"step {task!r} in pipeline {self.pipeline_name!r}")) from None
        self.tasks.append(spec)
        self.steps[task] = step
        return TaskHandle(task, step.output_types, step.multi_output, gathered=mapped)

    @contextlib.contextmanager
    def condition(self, cond: Condition) -> Iterator[None]:
        """Tasks added inside run only when `cond` holds."""
        self._conditions.append(cond)
        try:
            yield
        finally:
            self._conditions.pop()

    def built(self) -> Built:
        """What the body recorded."""
        return Built(self.tasks, self.steps)


def _holds_ref(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, Ref) for v in items)


@contextlib.contextmanager
def when(condition: Condition | Ref) -> Iterator[None]:
    """Run the steps called inside only when the condition holds at run time, else mark them SKIPPED.

    `with when(evaluate.accuracy >= 0.9): register(model)` or `with when(flag): ...`
    """
    builder = current_builder()
    if builder is None:
        raise SpecError("when(...) is only meaningful inside a @pipeline body")
    if isinstance(condition, Ref):
        if isinstance(condition, TaskHandle):
            condition._single()
        condition = Condition(source=condition.binding(), op="truthy")
    if not isinstance(condition, Condition):
        raise SpecError("when(...) takes a step output, a parameter, or a comparison of one with a constant")
    with builder.condition(condition):
        yield
