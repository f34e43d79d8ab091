"""`skyloop submit` (queue a run) and `skyloop agent` (claim queued runs and drive them)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from skyloop.cli.main import console, state
from skyloop.execution.tasks import TaskState

if TYPE_CHECKING:
    from skyloop.store.workspace import Workspace

__all__ = ["register"]


def submit(
    target: Annotated[str, typer.Argument(help="FILE.py:PIPELINE, module:PIPELINE or SPEC.yaml")],
    param: Annotated[list[str] | None, typer.Option("-p", "--param", help="NAME=VALUE (repeatable)")] = None,
    priority: Annotated[int, typer.Option(help="Priority class: higher runs start first.")] = 0,
    weight: Annotated[float, typer.Option(help="Fair-share weight among runs of one priority.")] = 1.0,
    backend: Annotated[str | None, typer.Option(
        help="Backend to run it on: only an agent of that backend claims it (default: any agent).")] = None,
) -> None:
    """Queue a run for `skyloop agent`; prints its id and returns at once."""
    from skyloop.execution.api import load_target
    from skyloop.execution.api import submit as submit_run
    from skyloop.execution.params import parse_cli_params
    from skyloop.pipelines.pipeline import Pipeline

    loaded = load_target(target)
    spec = loaded.compile() if isinstance(loaded, Pipeline) else loaded
    params = parse_cli_params(spec, param or [])
    run_id = submit_run(loaded, params, priority=priority, weight=weight, backend=backend, settings=state.settings())
    print(run_id)


class _Log:
    """Prints one line per run start and end (an agent's runs interleave, so no live table)."""

    def task_changed(self, task: str, state: TaskState, done: int, total: int) -> None:
        """Steps are visible with `skyloop runs show`; the agent log stays short."""

    def run_changed(self, run_id: str, status: str) -> None:
        console.print(f"run {run_id[:12]}: {status}", highlight=False)


def agent(
    backend: Annotated[str | None, typer.Option(help="inline | local | ray")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to use with --backend ray.")] = None,
    max_runs: Annotated[int, typer.Option(min=1, help="Runs driven at once.")] = 16,
    once: Annotated[bool, typer.Option("--once", help="Exit when nothing is queued or running.")] = False,
    max_cpus: Annotated[float | None, typer.Option(help="CPUs the steps may use at once.")] = None,
    max_memory: Annotated[str | None, typer.Option(help="Memory the steps may use at once, e.g. 8Gi.")] = None,
    max_gpus: Annotated[int | None, typer.Option(help="GPUs the steps may use at once.")] = None,
) -> None:
    """Claim queued runs (and runs whose process died) and drive them with one scheduling policy."""
    from skyloop.execution.agent import Agent
    from skyloop.execution.api import make_backend
    from skyloop.store.workspace import Workspace

    settings = state.settings(max_cpus=max_cpus, max_memory=max_memory, max_gpus=max_gpus, ray_address=ray_address)
    workspace = Workspace.open(settings)
    engine = make_backend(backend or settings.execution.backend, settings)
    engine.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        console.print(f"signal {signum}: stopping; held runs go back to the queue")
        stop.set()

    # Ctrl-C and SIGTERM hand the held runs back; a blocked signal mask survives exec, so a starter that had
    # them blocked (some libraries block SIGINT around spawning) would leave this agent deaf to both.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        claimed = Agent(settings, workspace, engine, _Log(), max_runs=max_runs,
                        say=lambda message: console.print(message, highlight=False)).serve(stop, once=once)
        left = _queued_elsewhere(workspace, engine.name)
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.shutdown()
        workspace.close()
    console.print(f"agent done: {len(claimed)} run(s) claimed")
    if left:
        waiting = ", ".join(f"{count} for {name}" for name, count in sorted(left.items()))
        console.print(f"runs queued for other backends wait for an agent of theirs ({waiting}): "
                      f"`skyloop agent --backend NAME`", highlight=False)


def _queued_elsewhere(workspace: Workspace, backend: str) -> dict[str, int]:
    """How many runs are queued for each backend other than `backend` (an agent of it never claims them)."""
    from sqlalchemy import func, select

    from skyloop.store.models import RunRow

    with workspace.db.read() as session:
        rows = session.execute(select(RunRow.backend, func.count()).where(
            RunRow.status == "QUEUED", RunRow.backend.is_not(None), RunRow.backend != backend)
            .group_by(RunRow.backend)).tuples().all()
    return {str(name): int(count) for name, count in rows}


def register(app: typer.Typer) -> None:
    """Add `submit` and `agent` to the CLI."""
    app.command("submit")(submit)
    app.command("agent")(agent)
