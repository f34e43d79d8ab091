"""`skyloop.run(...)`: compile or load a pipeline, check it, run it on a backend, return the `Run`."""

from __future__ import annotations

import importlib
import math
import os
import uuid
from pathlib import Path
from typing import Any

import yaml

from skyloop.config import Settings
from skyloop.errors import SpecError
from skyloop.execution.backends.base import Backend
from skyloop.execution.loading import load_file_module, resolve, why_import_failed
from skyloop.execution.orchestrator import Orchestrator
from skyloop.execution.params import resolve_params
from skyloop.execution.run import Run
from skyloop.execution.runstate import Observer, Prepared
from skyloop.pipelines.pipeline import CompiledPipeline, Pipeline
from skyloop.pipelines.step import Step
from skyloop.pipelines.validate import validate_spec
from skyloop.spec.files import read_yaml, validate
from skyloop.spec.pipeline import PipelineSpec, StepRef
from skyloop.store.runs import create_run, get_run
from skyloop.store.workspace import Workspace

__all__ = ["BACKENDS", "dump_spec", "load_spec", "load_target", "make_backend", "prepare", "run", "submit"]

BACKENDS = ("inline", "local", "ray")

Target = Pipeline[Any, Any] | CompiledPipeline | PipelineSpec | str | Path


def load_spec(path: str | Path) -> PipelineSpec:
    """Read a YAML or JSON pipeline spec; step files are found relative to the spec's folder."""
    file = Path(path)
    spec = validate(PipelineSpec, read_yaml(file), f"pipeline spec {str(path)!r}")

    def located(ref: StepRef) -> StepRef:
        if ref.module.endswith(".py") and not Path(ref.module).is_absolute():
            return StepRef(module=str((file.parent / ref.module).resolve()), qualname=ref.qualname)
        return ref

    for task in spec.tasks:
        task.step = located(task.step)
    if spec.source is not None:
        spec.source = located(spec.source)
    return spec


def dump_spec(spec: PipelineSpec, relative_to: Path | None = None) -> str:
    """The spec as YAML; step file paths are written relative to `relative_to` when given."""
    data = spec.model_dump(mode="json", exclude_defaults=False)
    if relative_to is not None:
        base = relative_to.resolve()
        for task in data["tasks"]:
            module = task["step"]["module"]
            if module.endswith(".py") and Path(module).is_absolute():
                task["step"]["module"] = os.path.relpath(module, base)
        if data.get("source") and data["source"]["module"].endswith(".py"):
            data["source"]["module"] = os.path.relpath(data["source"]["module"], base)
    return yaml.safe_dump(data, sort_keys=False)


def load_target(text: str) -> Pipeline[Any, Any] | PipelineSpec:
    """`file.py:pipeline`, `package.module:pipeline`, or a `.yaml`/`.json` spec file."""
    if text.endswith((".yaml", ".yml", ".json")):
        return load_spec(text)
    module, sep, name = text.rpartition(":")
    if not sep or not module or not name:
        raise SpecError(f"{text!r} must look like FILE.py:PIPELINE, package.module:PIPELINE or FILE.yaml")
    if module.endswith(".py"):
        obj = getattr(load_file_module(module), name, None)
        if obj is None:
            raise SpecError(f"{module!r} defines no {name!r}")
    else:
        try:
            importlib.import_module(module)
        except Exception as exc:  # the module's own code raising (as for a `.py` file), or `..`: a relative name
            raise SpecError(f"cannot import module {module!r} for pipeline {text!r}: {why_import_failed(exc)}") from exc
        obj = resolve(StepRef(module=module, qualname=name))
    if not isinstance(obj, Pipeline):
        raise SpecError(f"{text!r} is a {type(obj).__name__}, not a @pipeline")
    return obj


def _resolve_steps(spec: PipelineSpec) -> dict[str, Step[Any, Any]]:
    steps: dict[str, Step[Any, Any]] = {}
    for task in spec.tasks:
        obj = resolve(task.step)
        if isinstance(obj, Step):
            steps[task.name] = obj
        elif callable(obj):
            steps[task.name] = Step(obj)
        else:
            raise SpecError(f"task {task.name!r}: {task.step.path} is not a function")
    return steps


def prepare(target: Target, params: dict[str, Any] | None = None) -> Prepared:
    """Compile or load the pipeline, resolve its steps, validate everything, check the parameters."""
    if isinstance(target, str | Path):
        target = load_target(str(target))
    if isinstance(target, Pipeline):
        target = target.build()
    if isinstance(target, CompiledPipeline):
        spec, steps = target.spec, target.steps
    else:
        spec, steps = target, _resolve_steps(target)
        validate_spec(spec, steps)
    return Prepared(spec, steps, resolve_params(spec, params or {}))


def make_backend(name: str, settings: Settings) -> Backend:
    """The backend called `name`, configured from `settings`."""
    if name == "inline":
        from skyloop.execution.backends.inline import InlineBackend

        return InlineBackend(custom=settings.execution.resources)
    if name == "local":
        from skyloop.execution.backends.local import LocalBackend

        return LocalBackend(settings.execution)
    if name == "ray":
        from skyloop.execution.backends.ray import RayBackend

        return RayBackend(settings.execution, address=settings.execution.ray_address)
    raise _unknown_backend(name)


def _unknown_backend(name: str) -> SpecError:
    return SpecError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def run(target: Target | None = None, params: dict[str, Any] | None = None, *, backend: str | None = None,
        settings: Settings | None = None, observer: Observer | None = None, resume: str | None = None) -> Run:
    """Run a pipeline (or resume run `resume`) to its end and return the `Run`.

    `target` is a `@pipeline`, a compiled spec, or a path: `file.py:pipeline` or `spec.yaml`.
    """
    settings = settings or Settings.load()
    workspace = Workspace.open(settings)
    try:
        if resume is not None:
            with workspace.db.session() as session:
                row = get_run(session, resume)
                stored = PipelineSpec.model_validate(row.spec)
                stored_params, backend = row.params, backend or row.backend
            prepared = prepare(stored, stored_params)
            if isinstance(target, Pipeline | CompiledPipeline):  # notebook steps cannot be re-imported
                built = target.build() if isinstance(target, Pipeline) else target
                prepared.steps.update({k: v for k, v in built.steps.items() if k in prepared.steps})
        elif target is None:
            raise SpecError("run() needs a pipeline, a spec, or resume=RUN_ID")
        else:
            prepared = prepare(target, params)
        engine = make_backend(backend or settings.execution.backend, settings)
        engine.start()
        orchestrator = Orchestrator(settings, workspace.db, workspace.store, engine, observer)
        try:
            run_id = orchestrator.resume(resume, prepared) if resume is not None else orchestrator.start(prepared)
        finally:
            orchestrator.close()
            engine.shutdown()
        return Run(workspace, run_id)
    except BaseException:
        workspace.close()
        raise


def submit(target: Target, params: dict[str, Any] | None = None, *, priority: int = 0, weight: float = 1.0,
           backend: str | None = None, settings: Settings | None = None) -> str:
    """Validate a pipeline and queue a run of it for `skyloop agent`; returns the run id."""
    settings = settings or Settings.load()
    if backend is not None and backend not in BACKENDS:
        raise _unknown_backend(backend)
    if not (weight > 0 and math.isfinite(weight)):
        raise SpecError(f"weight must be a positive number (a fair-share weight), got {weight}")
    if not -2**31 <= priority < 2**31:  # the DB stores 32 bits
        raise SpecError(f"priority must be between {-2**31} and {2**31 - 1} (a higher class runs first), "
                        f"got {priority}")
    prepared = prepare(target, params)
    local = [name for name, step in prepared.steps.items() if not step.importable]
    if local:
        raise SpecError(f"steps {local} are defined in __main__ or inside a function, so an agent cannot import "
                        "them; move them to a module or a .py file")
    workspace = Workspace.open(settings)
    try:
        run_id = uuid.uuid4().hex
        with workspace.db.session() as session:
            create_run(session, run_id=run_id, pipeline=prepared.spec.name,
                       spec=prepared.spec.model_dump(mode="json"), params=prepared.params,
                       backend=backend, owner=None, lease_seconds=0,
                       priority=priority, weight=weight)
        return run_id
    finally:
        workspace.close()
