"""`skyloop run`: run a pipeline (or resume a run) with a live view of its steps."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from skyloop.cli.errors import EXIT_CODES
from skyloop.cli.main import console, state
from skyloop.cli.output import stdout_kept_for_json
from skyloop.cli.render import show_run
from skyloop.errors import SpecError, StepFailed
from skyloop.execution.api import load_target
from skyloop.execution.params import parse_cli_params
from skyloop.pipelines.pipeline import CompiledPipeline, Pipeline
from skyloop.spec.pipeline import PipelineSpec

__all__ = ["register"]


def run(
    target: Annotated[str | None, typer.Argument(help="FILE.py:PIPELINE, module:PIPELINE or SPEC.yaml")] = None,
    param: Annotated[list[str] | None, typer.Option("-p", "--param", help="NAME=VALUE (repeatable)")] = None,
    backend: Annotated[str | None, typer.Option(help="inline | local | ray")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to use with --backend ray.")] = None,
    resume: Annotated[str | None, typer.Option(help="Resume this unfinished run.")] = None,
    max_cpus: Annotated[float | None, typer.Option(help="CPUs the steps may use at once.")] = None,
    max_memory: Annotated[str | None, typer.Option(help="Memory the steps may use at once, e.g. 8Gi.")] = None,
    max_gpus: Annotated[int | None, typer.Option(help="GPUs the steps may use at once.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the finished run as JSON.")] = False,
) -> None:
    """Run a pipeline and show its steps as they go; exits non-zero when the run fails."""
    from skyloop.cli.progress import LiveProgress
    from skyloop.execution.api import run as run_pipeline

    if target is None and resume is None:
        raise SpecError("give a pipeline to run (FILE.py:PIPELINE or SPEC.yaml) or --resume RUN_ID")
    settings = state.settings(max_cpus=max_cpus, max_memory=max_memory, max_gpus=max_gpus, ray_address=ray_address)
    # With --json, the pipeline's module (imported here) and its steps (in this process with `inline`) print to
    # stderr: stdout is the JSON's.
    with stdout_kept_for_json(as_json):
        loaded: Pipeline[Any, Any] | CompiledPipeline | PipelineSpec | None = (
            load_target(target) if target is not None else None)
        params = None
        tasks: list[str] = []
        if loaded is not None:
            compiled = loaded.build() if isinstance(loaded, Pipeline) else None
            spec = compiled.spec if compiled is not None else loaded
            assert isinstance(spec, PipelineSpec)  # load_target gives a pipeline or a spec
            params = parse_cli_params(spec, param or [])
            tasks = [t.name for t in spec.tasks]
            loaded = compiled if compiled is not None else loaded
        # Drawn on a terminal, logged line by line elsewhere; with --json only watched, for the run's id on Ctrl-C.
        # Its console holds on to this stdout: the inline backend points `sys.stdout` at a step's log while the step
        # runs, and a console that follows `sys.stdout` (as `console` does) drew the live view there meanwhile.
        progress = LiveProgress(Console(file=sys.stdout, markup=False), tasks, draw=not as_json)
        try:
            with progress:
                result = run_pipeline(loaded, params, backend=backend, settings=settings, observer=progress,
                                      resume=resume)
        except KeyboardInterrupt:
            state.interrupted = _interrupted(progress.run_id, progress.status, resume)
            raise
    show_run(console, result, as_json)
    if not result.succeeded:
        raise typer.Exit(EXIT_CODES[StepFailed])


def _interrupted(run_id: str, status: str, resume: str | None) -> str:
    """What Ctrl-C during `skyloop run` says: what became of the run, and how to finish it."""
    if not run_id:
        return (f"interrupted before run {resume} was resumed; it is as it was" if resume
                else "interrupted before the run started")
    finish = f"finish it with: skyloop run --resume {run_id}"
    if status == "CANCELLED":
        return f"interrupted: run {run_id} cancelled; {finish}"
    return f"interrupted: run {run_id} was left {status} (skyloop runs show {run_id}); {finish}"


def register(app: typer.Typer) -> None:
    """Add `run` to the CLI."""
    app.command("run")(run)
