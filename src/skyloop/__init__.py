"""skyloop: run AI agent workflows in production.

Author steps and pipelines, run them locally or on a cluster, and inspect their runs::

    from skyloop import pipeline, step, run

    @step
    def double(x: int) -> int:
        return 2 * x

    @pipeline
    def demo(x: int = 3):
        return double(x)

    print(run(demo).outputs)
"""

from __future__ import annotations

from skyloop.config import ExecutionSettings, Settings
from skyloop.errors import (
    AuthError,
    BackendError,
    Conflict,
    CycleError,
    IntegrityError,
    ModelLoadError,
    NotFound,
    SkyloopError,
    SpecError,
    StepFailed,
    StoreError,
)
from skyloop.execution.api import load_spec, prepare, run
from skyloop.execution.run import Run, StepInfo
from skyloop.execution.tasks import TaskState
from skyloop.pipelines.builder import when
from skyloop.pipelines.pipeline import CompiledPipeline, Pipeline, pipeline
from skyloop.pipelines.step import Step, step, unmapped
from skyloop.spec.pipeline import PipelineSpec
from skyloop.spec.resources import Resources

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BackendError",
    "CompiledPipeline",
    "Conflict",
    "CycleError",
    "ExecutionSettings",
    "IntegrityError",
    "ModelLoadError",
    "NotFound",
    "Pipeline",
    "PipelineSpec",
    "Resources",
    "Run",
    "Settings",
    "SkyloopError",
    "SpecError",
    "Step",
    "StepFailed",
    "StepInfo",
    "StoreError",
    "TaskState",
    "load_spec",
    "pipeline",
    "prepare",
    "run",
    "step",
    "unmapped",
    "when",
]
