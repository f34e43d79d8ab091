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

from typing import TYPE_CHECKING

from skyloop._lazy import lazy_exports as _lazy_exports
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
from skyloop.execution.tasks import TaskState
from skyloop.pipelines.builder import when
from skyloop.pipelines.pipeline import CompiledPipeline, Pipeline, pipeline
from skyloop.pipelines.step import Step, step, unmapped
from skyloop.spec.pipeline import PipelineSpec
from skyloop.spec.resources import Resources

__version__ = "0.1.0"

if TYPE_CHECKING:
    from skyloop.execution.api import load_spec, prepare, run
    from skyloop.execution.run import Run, StepInfo
    from skyloop.registry.api import load_model, log_model

# Running pipelines needs the orchestrator, SQLAlchemy and Alembic; step code and worker processes
# only need the authoring API. Importing the former lazily keeps a worker's start-up near 0.3 s.
_LAZY = {
    "load_spec": "skyloop.execution.api",
    "prepare": "skyloop.execution.api",
    "run": "skyloop.execution.api",
    "Run": "skyloop.execution.run",
    "StepInfo": "skyloop.execution.run",
    "log_model": "skyloop.registry.api",
    "load_model": "skyloop.registry.api",
}


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())

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
    "load_model",
    "load_spec",
    "log_model",
    "pipeline",
    "prepare",
    "run",
    "step",
    "unmapped",
    "when",
]
