"""Pydantic models of every declarative contract skyloop reads or writes."""

from __future__ import annotations

from skyloop.spec.pipeline import (
    CacheSpec,
    Condition,
    ConstInput,
    InputBinding,
    OutputDecl,
    ParamInput,
    ParamSpec,
    PipelineSpec,
    RetrySpec,
    StepRef,
    TaskInput,
    TaskSpec,
)
from skyloop.spec.resources import Resources, format_memory, parse_memory

__all__ = [
    "CacheSpec",
    "Condition",
    "ConstInput",
    "InputBinding",
    "OutputDecl",
    "ParamInput",
    "ParamSpec",
    "PipelineSpec",
    "Resources",
    "RetrySpec",
    "StepRef",
    "TaskInput",
    "TaskSpec",
    "format_memory",
    "parse_memory",
]
