"""Check a `PipelineSpec`: references, cycles, missing inputs and types between connected steps."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from skyloop.errors import CycleError, SpecError
from skyloop.pipelines.types import (
    ACCEPTED_TYPES,
    can_map,
    compatible,
    element_type,
    parse_type,
    type_str,
    unreadable_type,
)
from skyloop.spec.pipeline import ConstInput, InputBinding, ParamInput, PipelineSpec, TaskInput, TaskSpec

__all__ = ["find_cycle", "topological_order", "validate_spec"]


def find_cycle(deps: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle in the graph `node -> nodes it waits for`, in dependency order, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(deps.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(deps):
        if node not in state and (found := visit(node)):
            cycle = list(reversed(found))  # in data-flow order: each feeds the next
            start = cycle.index(min(cycle))
            return cycle[start:] + cycle[:start]
    return None


def topological_order(spec: PipelineSpec) -> list[str]:
    """Task names so that every task comes after those it waits for."""
    deps = {t.name: t.upstream() for t in spec.tasks}
    cycle = find_cycle(deps)
    if cycle:
        raise CycleError(cycle)
    # Kahn's algorithm, keeping declaration order among tasks that are ready together.
    waiting = {name: len(d) for name, d in deps.items()}
    dependents: dict[str, list[str]] = {name: [] for name in deps}
    for name, d in deps.items():
        for dep in d:
            dependents[dep].append(name)
    order = [t.name for t in spec.tasks if not waiting[t.name]]
    for name in order:  # grows while iterating
        for child in dependents[name]:
            waiting[child] -= 1
            if not waiting[child]:
                order.append(child)
    return order


def _check_binding(spec: PipelineSpec, task: TaskSpec, where: str, binding: InputBinding,
                   tasks: dict[str, TaskSpec]) -> None:
    if isinstance(binding, TaskInput):
        producer = tasks.get(binding.task)
        if producer is None:
            raise SpecError(f"{where} refers to task {binding.task!r}, which does not exist; "
                            f"tasks are {sorted(tasks)}")
        names = [o.name for o in producer.outputs]
        if binding.output not in names:
            raise SpecError(f"{where} refers to output {binding.output!r} of task {binding.task!r}, "
                            f"which has outputs {names}")
    elif isinstance(binding, ParamInput):
        params = [p.name for p in spec.params]
        if binding.param not in params:
            raise SpecError(f"{where} refers to parameter {binding.param!r}, which the pipeline does not "
                            f"declare; parameters are {params}")


def _produced_type(spec: PipelineSpec, binding: InputBinding, steps: Mapping[str, Any],
                   tasks: dict[str, TaskSpec], mapped: bool) -> Any:
    if isinstance(binding, TaskInput):
        producer = tasks[binding.task]
        step = steps.get(binding.task)
        one = step.output_types.get(binding.output, Any) if step is not None else Any
        if producer.map_over:
            return one if mapped else list[one]  # type: ignore[valid-type]
    elif isinstance(binding, ParamInput):
        one = parse_type(next(p.type for p in spec.params if p.name == binding.param))
    else:
        value = binding.value
        if mapped:
            return type(value[0]) if isinstance(value, list) and value else Any
        return type(value) if value is not None else Any
    return element_type(one) if mapped else one


def _describe(binding: InputBinding) -> str:
    if isinstance(binding, TaskInput):
        return f"{binding.task}.{binding.output}"
    if isinstance(binding, ParamInput):
        return f"parameter {binding.param!r}"
    return f"the constant {binding.value!r}"


def _check_mapped(spec: PipelineSpec, task: TaskSpec, name: str, steps: Mapping[str, Any],
                  tasks: dict[str, TaskSpec]) -> None:
    """`.map` fans out over lists (or tuples): refuse a value that cannot be one before the run starts."""
    binding = task.inputs[name]
    if isinstance(binding, ConstInput):
        ok, gives = isinstance(binding.value, list), type(binding.value).__name__
    else:
        produced = _produced_type(spec, binding, steps, tasks, mapped=False)
        ok, gives = can_map(produced), type_str(produced)
    if not ok:
        raise SpecError(f"{task.name}.{name} is mapped over, but {_describe(binding)} gives {gives}, not a list; "
                        f"pass a list, or wrap it in unmapped(...) to give it whole to every call")


def _check_step(spec: PipelineSpec, task: TaskSpec, step: Any, tasks: dict[str, TaskSpec],
                steps: Mapping[str, Any]) -> None:
    params = step.signature.parameters
    for name in task.inputs:
        if name not in params:
            raise SpecError(f"task {task.name!r} binds input {name!r}, but step {task.step.path} takes "
                            f"{list(params)}")
    for name, param in params.items():
        bound = name in task.inputs or param.default is inspect.Parameter.empty
        if param.kind is inspect.Parameter.POSITIONAL_ONLY and bound:
            # The worker passes every input by name: `fn(x=...)` fails for `def fn(x, /)`, after the run started.
            raise SpecError(f"task {task.name!r}: step {task.step.path} takes {name!r} as a positional-only "
                            f"parameter (before `/`), but steps get their inputs by name; remove the `/`")
        kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if name not in task.inputs and param.default is inspect.Parameter.empty and param.kind not in kinds:
            raise SpecError(f"missing input: task {task.name!r} needs {name!r} (it has no default); "
                            f"bind it to a step output, a parameter or a constant")
    for name in task.map_over:
        _check_mapped(spec, task, name, steps, tasks)
    wanted_types = step.input_types
    for name, binding in task.inputs.items():
        if isinstance(binding, ConstInput) and binding.value is None:
            continue
        produced = _produced_type(spec, binding, steps, tasks, mapped=name in task.map_over)
        wanted = wanted_types.get(name, Any)
        if not compatible(produced, wanted):
            raise SpecError(f"type mismatch: {_describe(binding)} gives {type_str(produced)} but "
                            f"{task.name}.{name} expects {type_str(wanted)}")


def _check_defaults(spec: PipelineSpec) -> None:
    """A parameter's type must read, and its default be a value of it: a run given no value uses it as is."""
    for param in spec.params:
        problem = unreadable_type(param.type)
        if problem:
            raise SpecError(f"parameter {param.name!r} has type {param.type!r}, which skyloop cannot read "
                            f"({problem}); write a type such as {ACCEPTED_TYPES}")
        wanted = parse_type(param.type)
        if param.required or param.default is None or wanted is Any:
            continue
        try:
            TypeAdapter(wanted).validate_python(param.default)
        except ValidationError as exc:
            raise SpecError(f"parameter {param.name!r} is declared {param.type} but its default is "
                            f"{param.default!r} ({exc.errors()[0]['msg']}); fix the default or the type") from None
        except Exception:  # a type pydantic cannot check (e.g. a class of the user's): trust it
            continue


def validate_spec(spec: PipelineSpec, steps: Mapping[str, Any] | None = None) -> None:
    """Raise `SpecError` naming the first problem; `steps` (task name -> Step) enables type checks."""
    _check_defaults(spec)
    tasks = {t.name: t for t in spec.tasks}
    for task in spec.tasks:
        for name, binding in task.inputs.items():
            _check_binding(spec, task, f"input {task.name}.{name}", binding, tasks)
        for cond in task.when:
            _check_binding(spec, task, f"condition of task {task.name!r}", cond.source, tasks)
            if cond.value_param is not None:
                _check_binding(spec, task, f"condition of task {task.name!r}", ParamInput(param=cond.value_param),
                               tasks)
        for dep in task.after:
            if dep not in tasks:
                raise SpecError(f"task {task.name!r} runs after {dep!r}, which does not exist")
    for name, binding in spec.outputs.items():
        _check_binding(spec, spec.tasks[0], f"pipeline output {name!r}", binding, tasks)
    topological_order(spec)
    if steps:
        for task in spec.tasks:
            if task.name in steps:
                _check_step(spec, task, steps[task.name], tasks, steps)
