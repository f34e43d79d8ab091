"""In-memory progress of a run: tasks, their attempts (units) and the outputs they produced."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skyloop.execution.cache import element_key
from skyloop.execution.tasks import Element, Gathered, InputValue, Literal_, TaskState
from skyloop.execution.worker import load_input
from skyloop.spec.pipeline import Condition, ConstInput, InputBinding, ParamInput, TaskInput, TaskSpec
from skyloop.store.artifacts import ArtifactRef, ArtifactStore

__all__ = ["Outputs", "TaskProgress", "Unit", "evaluate", "expand", "resolve_binding"]

Outputs = dict[str, ArtifactRef | Gathered]

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


@dataclass
class Unit:
    """One element of a task (the whole task unless mapped) and its current attempt."""

    task: TaskSpec
    index: int
    inputs: dict[str, InputValue]
    cache_key: str | None
    seq: int
    attempt: int = 0
    step_run_id: str = ""
    not_before: float = 0.0
    """Earliest launch time (retry delay)."""
    log_path: str = ""
    """The current attempt's log file."""


@dataclass
class TaskProgress:
    """Where one task stands."""

    spec: TaskSpec
    waiting_on: set[str]
    state: TaskState = TaskState.PENDING
    units: dict[int, Unit] = field(default_factory=dict)
    unit_outputs: dict[int, dict[str, ArtifactRef]] = field(default_factory=dict)
    size: int = 1
    outputs: Outputs = field(default_factory=dict)
    error: str | None = None

    def gather(self) -> None:
        """Set `outputs` once every unit succeeded: a value, or a list for a mapped task."""
        names = [o.name for o in self.spec.outputs]
        if self.spec.map_over:
            self.outputs = {n: Gathered(tuple(self.unit_outputs[i][n] for i in range(self.size))) for n in names}
        else:
            self.outputs = dict(self.unit_outputs[-1])


def resolve_binding(binding: InputBinding, params: dict[str, Any], tasks: dict[str, TaskProgress]) -> InputValue:
    """The value an input binding points at, now that its producer is done."""
    if isinstance(binding, TaskInput):
        return tasks[binding.task].outputs[binding.output]
    if isinstance(binding, ParamInput):
        return Literal_(params[binding.param])
    assert isinstance(binding, ConstInput)
    return Literal_(binding.value)


def evaluate(cond: Condition, params: dict[str, Any], tasks: dict[str, TaskProgress], store: ArtifactStore) -> bool:
    """Whether a `when` condition holds."""
    left = load_input(resolve_binding(cond.source, params, tasks), store)
    if cond.op == "truthy":
        return bool(left)
    if cond.op == "falsy":
        return not left
    right = params[cond.value_param] if cond.value_param else cond.value
    try:
        return bool(_OPS[cond.op](left, right))
    except TypeError as exc:
        raise ValueError(f"condition `{cond.describe()}` cannot be evaluated: {exc}") from None


def expand(task: TaskSpec, inputs: dict[str, InputValue], store: ArtifactStore) -> list[dict[str, InputValue]]:
    """The inputs of each unit: one set, or one per element when the task is mapped."""
    if not task.map_over:
        return [inputs]
    lengths: dict[str, int] = {}
    sources: dict[str, Any] = {}
    for name in task.map_over:
        value = inputs[name]
        if isinstance(value, Gathered):
            sources[name] = value.refs
        elif isinstance(value, Literal_):
            sources[name] = value.value
        else:
            sources[name] = store.get(value) if isinstance(value, ArtifactRef) else value
        if not isinstance(sources[name], list | tuple):
            raise ValueError(f"task {task.name!r} maps over {name!r}, which is a {type(sources[name]).__name__}, "
                             "not a list")
        lengths[name] = len(sources[name])
    if len(set(lengths.values())) > 1:
        raise ValueError(f"task {task.name!r} maps over inputs of different lengths {lengths}")
    size = next(iter(lengths.values()))
    units = []
    for i in range(size):
        unit = dict(inputs)
        for name in task.map_over:
            value = inputs[name]
            if isinstance(value, Gathered):
                unit[name] = value.refs[i]
            elif isinstance(value, Literal_):
                unit[name] = Literal_(value.value[i])
            else:
                assert isinstance(value, ArtifactRef)
                unit[name] = Element(value, i, element_key(sources[name][i]))
        units.append(unit)
    return units
