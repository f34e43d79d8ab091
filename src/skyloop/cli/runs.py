"""`skyloop runs list|show|logs|cancel`."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from skyloop.cli.main import console, state
from skyloop.cli.output import print_json
from skyloop.cli.progress import state_text
from skyloop.cli.render import show_run
from skyloop.errors import SkyloopError
from skyloop.execution.run import Run
from skyloop.store.runs import get_run, list_runs, reap_expired_runs, request_cancel
from skyloop.store.workspace import Workspace

__all__ = ["app"]

app = typer.Typer(help="Inspect pipeline runs.", no_args_is_help=True)

REAP_GRACE_SECONDS = 60.0


def _workspace() -> Workspace:
    workspace = Workspace.open(state.settings())
    with workspace.db.session() as session:
        # Nothing stays RUNNING after its orchestrator died; agents get a minute to adopt such runs first.
        reap_expired_runs(session, grace_seconds=REAP_GRACE_SECONDS)
    return workspace


@app.command("list")
def list_(
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
    pipeline: Annotated[str | None, typer.Option(help="Only runs of this pipeline.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The newest runs."""
    workspace = _workspace()
    with workspace.db.session() as session:
        rows = list_runs(session, limit=limit, pipeline=pipeline, status=status)
        data = [{"id": r.id, "pipeline": r.pipeline, "status": r.status, "backend": r.backend,
                 "created_at": r.created_at, "started_at": r.started_at, "ended_at": r.ended_at, "error": r.error}
                for r in rows]
    if as_json:
        print_json(data)
        return
    table = Table(title="runs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("id", "pipeline", "status", "created", "seconds", "backend"):
        table.add_column(column, overflow="fold" if column == "pipeline" else "ellipsis",
                         no_wrap=column != "pipeline")
    for r in rows:
        # How long it ran: a run submitted to the queue starts when an agent claims it.
        begun = r.started_at or r.created_at
        seconds = (r.ended_at - begun).total_seconds() if r.ended_at else None
        table.add_row(r.id[:12], r.pipeline, state_text(r.status), r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      f"{seconds:.1f}" if seconds is not None else "", r.backend or "any")
    console.print(table)


@app.command()
def show(run_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One run: its steps, states, attempts and errors."""
    show_run(console, Run(_workspace(), run_id), as_json)


@app.command()
def logs(run_id: str, step: Annotated[str | None, typer.Argument(help="Only this step.")] = None) -> None:
    """What the steps printed (every attempt)."""
    run = Run(_workspace(), run_id)
    printed = False
    for name in [step] if step else list(run.steps):
        text = run.logs(name)
        if text:
            console.print(name, style="bold", highlight=False)
            print(text)
            printed = True
    if not printed:
        console.print(f"no output: {'step ' + repr(step) if step else 'no step'} of run {run.id[:12]} printed "
                      "anything", highlight=False)


@app.command()
def cancel(
    run_id: str,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for a running run to end (0: do not wait).")]
    = 0.0,
) -> None:
    """Cancel a run: a queued one at once; a running one is stopped by the agent (or `run`) holding it, which
    cancels its steps within a heartbeat (5 s by default) and ends it CANCELLED."""
    workspace = _workspace()
    with workspace.db.session() as session:
        full_id, outcome = request_cancel(session, run_id)
    if outcome == "CANCELLED":
        console.print(f"run {full_id[:12]} cancelled", highlight=False)
        return
    console.print(f"run {full_id[:12]}: cancel requested; the process holding it stops its steps", highlight=False)
    deadline = time.monotonic() + wait
    while wait:
        with workspace.db.read() as session:
            status = get_run(session, full_id).status
        if status != "RUNNING":
            console.print(f"run {full_id[:12]} ended {status}", highlight=False)
            return
        if time.monotonic() >= deadline:
            raise SkyloopError(f"run {full_id[:12]} still runs after {wait:g}s; `skyloop runs show {full_id[:12]}` "
                               "says how far it got")
        time.sleep(0.2)
