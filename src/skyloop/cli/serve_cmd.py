"""`skyloop serve`: a V2 (Open Inference Protocol) model server for registered models or an inference graph."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from skyloop.cli.main import console, state
from skyloop.errors import SpecError
from skyloop.spec.files import format_validation

__all__ = ["register"]


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(
    targets: Annotated[list[str], typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, a model directory, "
                                                      "or a serving spec GRAPH.yaml (several may be given)")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one).")] = 8080,
    name: Annotated[str | None, typer.Option(help="Name clients use (one target only; default: the model's).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: one per core).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Model threads per worker.")] = 4,
    batching: Annotated[bool | None, typer.Option("--batching/--no-batching",
                                                  help="Adaptive batching (default: on when the signature "
                                                       "has a batch dimension).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per batch at most.")] = None,
    max_batch_time: Annotated[str | None, typer.Option(help="Longest wait for a batch to fill, e.g. 2ms.")] = None,
    max_body: Annotated[int, typer.Option(min=1, help="Largest request body in bytes (413 above).")] = 16 * 1024 * 1024,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    replicas: Annotated[int | None, typer.Option(min=1, help="Replicas of one worker each, on ports PORT, PORT+1, ... "
                                                      "(free ports with --port 0), restarted when they die.")] = None,
    state_file: Annotated[Path | None, typer.Option(help="With --replicas: keep each replica's port and pid "
                                                         "in this JSON file.")] = None,
    exit_with_parent: Annotated[bool, typer.Option("--exit-with-parent",
                                                   help="Stop when the process that started this one dies.")] = False,
    parent_pid: Annotated[int | None, typer.Option(hidden=True, help="With --exit-with-parent: the pid of the "
                                                                     "process that started this one.")] = None,
) -> None:
    """Serve models over the Open Inference Protocol (V2 REST) until interrupted."""
    # First thing: a parent that dies while this process starts (imports, loading the models) leaves it to init,
    # and "the parent" taken later would be init, which never dies. A starter that must be sure passes its pid.
    parent = parent_pid if parent_pid is not None else os.getppid()
    from skyloop.serving.server import serve as run_server
    from skyloop.serving.server import spec_for_target
    from skyloop.serving.spec import BatchingSpec

    if log_level.lower() not in _LOG_LEVELS:  # else every worker dies on it at start, and is started again
        raise SpecError(f"--log-level {log_level!r}: give one of {', '.join(_LOG_LEVELS)}")
    if replicas is not None and workers is not None:
        raise SpecError("--replicas and --workers do not go together: replicas each run one worker")
    if parent_pid is not None and not exit_with_parent:
        raise SpecError("--parent-pid says whose death stops the server: give --exit-with-parent too")
    if state_file is not None and replicas is None:
        raise SpecError("--state-file describes replicas: give --replicas too")
    if name is not None and len(targets) != 1:
        raise SpecError("--name works with one target; give each graph its name in its spec file")
    specs = [spec_for_target(t, name) for t in targets]
    overrides = {k: v for k, v in {"enabled": batching, "max_batch_size": max_batch_size,
                                   "max_batch_time": max_batch_time}.items() if v is not None}
    if overrides:
        try:
            specs = [s.model_copy(update={"batching": BatchingSpec.model_validate(
                {**s.batching.model_dump(), **overrides})}) for s in specs]
        except ValidationError as exc:
            raise SpecError(format_validation(exc, "batching option").replace("max_batch_", "--max-batch-")) from None
    names = ", ".join(s.name for s in specs)

    def ready(bound: int | list[int]) -> None:
        if isinstance(bound, int):
            console.print(f"serving {names} on http://{host}:{bound}/v2 (V2 REST; metrics at /metrics)",
                          highlight=False)
            return
        for index, replica_port in enumerate(bound):
            console.print(f"replica {index} serving {names} on http://{host}:{replica_port}/v2", highlight=False)

    run_server(specs, state.settings(), host=host, port=port, workers=workers, threads=threads,
               max_body_bytes=max_body, log_level=log_level, on_ready=ready, replicas=replicas,
               state_file=state_file, exit_with_parent=exit_with_parent, parent=parent)


def register(app: typer.Typer) -> None:
    """Add `serve` to the CLI."""
    app.command("serve")(serve)
