"""The `PipelineSpec`: the compiled, declarative form of a pipeline (round-trips through YAML)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyloop.spec.resources import Resources

__all__ = [
    "NAME_RULE",
    "RETRY_DELAY_CAP",
    "CacheSpec",
    "Condition",
    "ConstInput",
    "InputBinding",
    "OutputDecl",
    "ParamInput",
    "ParamSpec",
    "PipelineSpec",
    "RetrySpec",
    "StepRef",
    "TaskInput",
    "TaskSpec",
    "is_name",
]

_NAME = r"^[A-Za-z_][A-Za-z0-9_\-\.]*$"
_NAME_MAX = 200
"""What the metadata DB's name columns hold."""
NAME_RULE = "start with a letter or '_', hold only letters, digits, '_', '-' and '.', and be 200 characters at most"
"""What a task, step, pool, output, parameter or pipeline name must look like (the `_NAME` pattern)."""


def is_name(text: object) -> bool:
    """Whether `text` is a valid name for a task, step, pool, output, parameter or pipeline."""
    return isinstance(text, str) and len(text) <= _NAME_MAX and re.fullmatch(_NAME[1:-1], text) is not None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepRef(_Model):
    """Where a step's function lives: an importable module, or a file path, plus its qualified name."""

    module: str
    """Dotted module name (`examples.train`) or a path to a `.py` file."""
    qualname: str
    """The function's qualified name inside the module."""

    @property
    def path(self) -> str:
        """`module:qualname`, the form users write."""
        return f"{self.module}:{self.qualname}"

    @classmethod
    def parse(cls, text: str) -> StepRef:
        """`pkg.mod:func` or `path/file.py:func`."""
        module, sep, qualname = text.rpartition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"step reference {text!r} must look like 'package.module:function'")
        return cls(module=module, qualname=qualname)


RETRY_DELAY_CAP = 3600.0
"""Longest wait before a retry that the backoff grows the delay to (a longer `delay` itself is kept)."""


class RetrySpec(_Model):
    """How often, and after how long, a failed step is tried again."""

    retries: int = Field(default=0, ge=0)
    delay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Seconds before the first retry."""
    backoff: float = Field(default=1.0, ge=1.0, allow_inf_nan=False)
    """Factor applied to the delay after each retry, up to `RETRY_DELAY_CAP`."""

    def delay_after(self, failures: int) -> float:
        """Seconds to wait before the retry that follows the `failures`-th failure (1 for the first):
        `delay * backoff ** (failures - 1)`, grown at most to `RETRY_DELAY_CAP` (or `delay`, if longer),
        compared in logs first so that no power overflows."""
        if self.delay <= 0.0 or failures <= 1 or self.backoff <= 1.0:
            return self.delay
        cap = max(self.delay, RETRY_DELAY_CAP)
        if math.log(self.delay) + (failures - 1) * math.log(self.backoff) >= math.log(cap):
            return cap  # (the power itself could overflow)
        return min(cap, self.delay * self.backoff ** (failures - 1))


class CacheSpec(_Model):
    """Content-addressed caching of a step's outputs."""

    enabled: bool = True
    version: str = ""
    """Bump to invalidate cached results without touching the code."""


class OutputDecl(_Model):
    """One named output of a step."""

    name: str = Field(pattern=_NAME, max_length=_NAME_MAX)
    type: str = "Any"
    """Readable type, e.g. `float`, `pandas.DataFrame`, `list[int]`."""


class TaskInput(_Model):
    """An input bound to another task's output."""

    kind: Literal["task"] = "task"
    task: str
    output: str = "output"


class ParamInput(_Model):
    """An input bound to a pipeline parameter."""

    kind: Literal["param"] = "param"
    param: str


class ConstInput(_Model):
    """An input bound to a constant written in the pipeline body (JSON-able)."""

    kind: Literal["const"] = "const"
    value: Any


InputBinding = Annotated[TaskInput | ParamInput | ConstInput, Field(discriminator="kind")]

Operator = Literal["truthy", "falsy", "==", "!=", "<", "<=", ">", ">="]


class Condition(_Model):
    """A task runs only when all its conditions hold; otherwise it is SKIPPED."""

    source: InputBinding
    op: Operator = "truthy"
    value: Any = None
    value_param: str | None = None
    """Compare with this pipeline parameter instead of the constant `value`."""

    @model_validator(mode="after")
    def _has_right_side(self) -> Condition:
        # Else `one.output >= None` is only found out at run time, when the comparison cannot be evaluated.
        if self.op in ("truthy", "falsy") or self.value_param is not None:
            return self
        if "value" not in self.model_fields_set:
            raise ValueError(f"op {self.op!r} compares with something: give `value` (a constant; `value: null` "
                             f"to compare with None) or `value_param` (a parameter name)")
        if self.value is None and self.op not in ("==", "!="):
            raise ValueError(f"op {self.op!r} cannot compare with None: give `value` a number or string, "
                             f"or `value_param` a parameter name")
        return self

    def describe(self) -> str:
        """`evaluate.accuracy >= 0.9`."""
        src = self.source
        left = (f"{src.task}.{src.output}" if isinstance(src, TaskInput)
                else f"params.{src.param}" if isinstance(src, ParamInput) else repr(src.value))
        if self.op == "truthy":
            return left
        if self.op == "falsy":
            return f"not {left}"
        right = f"params.{self.value_param}" if self.value_param else repr(self.value)
        return f"{left} {self.op} {right}"


class TaskSpec(_Model):
    """One node of the DAG: a step invocation with its input bindings."""

    name: str = Field(pattern=_NAME, max_length=_NAME_MAX)
    """Unique inside the pipeline."""
    step: StepRef
    inputs: dict[str, InputBinding] = Field(default_factory=dict)
    input_types: dict[str, str] = Field(default_factory=dict)
    """Declared type of each input parameter of the step function."""
    outputs: list[OutputDecl] = Field(default_factory=lambda: [OutputDecl(name="output")])
    multi_output: bool = False
    """Whether the function returns a NamedTuple whose fields are the outputs."""
    map_over: list[str] = Field(default_factory=list)
    """Inputs whose list value is fanned out element-wise (zip); outputs are then gathered into lists."""
    when: list[Condition] = Field(default_factory=list)
    after: list[str] = Field(default_factory=list)
    """Extra ordering edges to tasks whose outputs are not consumed."""
    resources: Resources = Field(default_factory=Resources)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout: float | None = Field(default=None, gt=0)
    """Seconds; a step still running then is killed and marked TIMED_OUT."""
    cache: CacheSpec = Field(default_factory=CacheSpec)
    priority: int = 0
    pool: str | None = Field(default=None, pattern=_NAME, max_length=_NAME_MAX)
    """Named concurrency pool shared by every run (limits in the settings, e.g. `gpu-train: 1`)."""

    @field_validator("step")
    @classmethod
    def _importable(cls, step: StepRef) -> StepRef:
        # What the run would import: a relative (`..x`) or empty module name is no module, and not a file either.
        if not step.module.endswith(".py") and (not step.module.strip() or step.module.startswith(".")):
            raise ValueError(f"module {step.module!r} is neither a file nor a module; write a file path "
                             "(steps.py, ../lib/steps.py) or a dotted module name (package.steps)")
        if not step.qualname.strip():
            raise ValueError(f"qualname of {step.module!r} is empty; name the step's function")
        return step

    @model_validator(mode="after")
    def _check_map(self) -> TaskSpec:
        for name in self.map_over:
            if name not in self.inputs:
                raise ValueError(f"map_over names {name!r}, which is not an input of task {self.name!r}; "
                                 f"inputs are {sorted(self.inputs)}")
        return self

    def upstream(self) -> set[str]:
        """Names of the tasks this one waits for."""
        deps = {b.task for b in self.inputs.values() if isinstance(b, TaskInput)}
        deps.update(c.source.task for c in self.when if isinstance(c.source, TaskInput))
        deps.update(self.after)
        return deps


class ParamSpec(_Model):
    """A pipeline parameter."""

    name: str = Field(pattern=_NAME, max_length=_NAME_MAX)
    type: str = "Any"
    default: Any = None
    required: bool = False


class PipelineSpec(_Model):
    """A compiled pipeline: parameters, tasks and outputs."""

    api_version: Literal["skyloop/v1"] = "skyloop/v1"
    kind: Literal["Pipeline"] = "Pipeline"
    name: str = Field(pattern=_NAME, max_length=_NAME_MAX)
    description: str = ""
    source: StepRef | None = None
    """The `@pipeline` function this spec was compiled from, if any."""
    params: list[ParamSpec] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(min_length=1)
    outputs: dict[str, TaskInput] = Field(default_factory=dict)
    """Named pipeline outputs, each bound to a task output."""

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen: set[str] = set()
        for task in tasks:
            if task.name in seen:
                raise ValueError(f"task name {task.name!r} is used twice; task names must be unique")
            seen.add(task.name)
        return tasks

    def task(self, name: str) -> TaskSpec:
        """The task called `name`."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)
