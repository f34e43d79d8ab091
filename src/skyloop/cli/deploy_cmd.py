"""`skyloop deploy apply|status|promote|rollback|history|delete|controller`."""

from __future__ import annotations

import math
import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from skyloop.cli.main import console, err_console, state
from skyloop.cli.output import print_json
from skyloop.errors import SpecError
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace

__all__ = ["app"]

app = typer.Typer(help="Deployments: predictors behind a gateway, canary/blue-green rollouts, bandits.",
                  no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Name = Annotated[str, typer.Argument(help="The deployment's name.")]


def _weights(weights: dict[str, Any]) -> str:
    return ", ".join(f"{k} {float(v):g}%" for k, v in weights.items())


def _show(info: store.DeploymentInfo) -> None:
    s = info.state
    console.print(Text.assemble((info.name, "bold"), f"  {info.status}  spec v{info.spec_version}  "
                                                     f"{s.get('gateway', '')}/v2/models/{info.name}/infer"),
                  highlight=False)
    if info.reason:
        console.print(f"  {info.reason}", highlight=False)
    # Shadow and accuracy only where some predictor has them, one replica a line: with every column on one line
    # each, 80 columns cut the headers (`predict…`) and the replicas' pids and restarts.
    windows, predictors = s.get("windows", {}), s.get("predictors", {})
    shadowed = any(p.get("shadow") for p in predictors.values())
    scored = any(windows.get(name, {}).get("accuracy") is not None for name in predictors)
    table = Table(box=None, pad_edge=False, caption="replicas: port/pid/restarts; down: being replaced; +N: waiting "
                  "for room", caption_justify="left")
    for column in ("predictor", "weight", *(["shadow"] if shadowed else []), "version", "replicas", "requests",
                   "errors", "p99 ms", *(["accuracy"] if scored else [])):
        table.add_column(column, overflow="fold", no_wrap=column in ("predictor", "weight", "version", "replicas"))
    for name, p in predictors.items():
        w = windows.get(name, {})
        replicas = "\n".join(f"{r['port']}/{'down' if r.get('down') else r['pid']}/{r['restarts']}"
                             for r in p.get("replicas", []))
        if p.get("pending"):
            replicas += f"\n+{p['pending']} waiting"
        p99 = w.get("latency_p99")
        acc = w.get("accuracy")
        table.add_row(name, f"{p.get('weight', 0):g}%", *([f"{p.get('shadow', 0):g}"] if shadowed else []),
                      p.get("version", ""), replicas, str(w.get("requests", "")), str(w.get("errors", "")),
                      f"{p99 * 1000:.1f}" if p99 is not None else "",
                      *([f"{acc:.3f}" if acc is not None else ""] if scored else []))
    console.print(table)
    rollout = s.get("rollout") or {}
    if rollout.get("analysis"):
        analysis = rollout["analysis"]
        console.print(f"  last analysis: {analysis.get('verdict')}: {analysis.get('reason')}", highlight=False)


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="The deployment spec (YAML).")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Return once the controller applied it.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 300.0,
    as_json: JsonOption = False,
) -> None:
    """Create or update a deployment; starts a controller if none is running."""
    from skyloop.deploy.api import apply_deployment

    if not math.isfinite(timeout) or timeout <= 0:  # checked before the spec is recorded
        raise SpecError(f"--timeout {timeout:g}: give the seconds to wait for the controller, a number above 0 "
                        "(or --no-wait)")
    with console.status(Text(f"applying {file} ..."), spinner="dots"):  # Text: a path is not markup
        info = apply_deployment(file, state.settings(), wait=wait, timeout=timeout)
    if as_json:
        print_json(info.to_dict())
    else:
        _show(info)


@app.command()
def status(name: Annotated[str | None, typer.Argument(help="One deployment (default: all).")] = None,
           as_json: JsonOption = False) -> None:
    """Traffic split, versions, replicas and the rollout of deployments."""
    workspace = Workspace.open(state.settings())
    with workspace.db.read() as session:
        infos = [store.get_deployment(session, name)] if name else store.list_deployments(session)
    workspace.close()
    if as_json:
        doc = [i.to_dict() for i in infos]
        print_json(doc[0] if name else doc)
        return
    if not infos:
        console.print("no deployments (create one with skyloop deploy apply FILE)")
    for info in infos:
        _show(info)


@app.command()
def history(name: Name, limit: Annotated[int | None, typer.Option(min=1, help="Only the last N events.")] = None,
            as_json: JsonOption = False,
            picture: Annotated[Path | None, typer.Option(help="Also draw it: DIR/NAME-history.png and .html.")] = None,
            ) -> None:
    """Every transition: which versions served, with what traffic, when and why."""
    workspace = Workspace.open(state.settings())
    with workspace.db.read() as session:
        events = store.deployment_history(session, name, limit)
    if picture is not None:
        from skyloop.deploy.picture import write_history_picture

        try:
            png, html = write_history_picture(workspace, name, picture)
        except OSError as exc:  # a file where the folder should be, a folder we may not write to
            workspace.close()
            raise SpecError(f"--picture {str(picture)!r}: cannot write the picture there ({exc.strerror or exc}); "
                            "give a folder that can be created or written to") from None
        # With --json, stdout is the JSON alone: the files are named on stderr.
        (err_console if as_json else console).print(f"picture: {png}\n         {html}", highlight=False)
    workspace.close()
    if as_json:
        print_json([e.to_dict() for e in events])
        return
    # One line of figures per event and its reason under it, indented: as a seventh column the reason was
    # squeezed to a word a line on 80 columns, and the cells beside it cut short.
    dated = len({e.at.date() for e in events}) > 1 or any(e.at.date() != datetime.now(UTC).date() for e in events)
    width = max(40, console.width - 4)
    for e in events:
        at = e.at.strftime("%Y-%m-%d %H:%M:%S" if dated else "%H:%M:%S")
        versions = ", ".join(f"{k}={v}" for k, v in e.versions.items())
        head = Text.assemble(f"{at}  v{e.spec_version}  ", (e.kind, "bold"), f"  {e.status}  {_weights(e.weights)}"
                             + (f"  [{versions}]" if versions else ""))
        console.print(head, highlight=False, overflow="fold")
        for line in textwrap.wrap(e.reason, width) or [""]:
            if line:
                console.print(Text("    " + line), highlight=False)


@app.command()
def promote(name: Name, full: Annotated[bool, typer.Option("--full", help="Skip the remaining steps.")] = False
            ) -> None:
    """Resume a paused rollout (or, with --full, give the target 100% now); refused when none is in progress."""
    from skyloop.deploy.api import send_command

    send_command(state.settings(), name, "promote_full" if full else "promote")
    console.print(f"{'full promotion' if full else 'promotion'} of {name} requested")


@app.command()
def rollback(name: Name) -> None:
    """Abort the rollout: the target goes back to 0%; refused when none is in progress."""
    from skyloop.deploy.api import send_command

    send_command(state.settings(), name, "rollback")
    console.print(f"rollback of {name} requested")


@app.command()
def delete(name: Name, wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True) -> None:
    """Stop a deployment's gateway and replicas (its history stays)."""
    from skyloop.deploy.api import delete_deployment

    delete_deployment(state.settings(), name, wait=wait)
    console.print(f"deployment {name} deleted")


@app.command()
def controller(exit_when_idle: Annotated[bool, typer.Option(help="Exit once no deployment is left.")] = False,
               exit_with_parent: Annotated[bool, typer.Option(
                   "--exit-with-parent", help="Stop (replicas too) when the process that started this one dies.")
               ] = False,
               parent_pid: Annotated[int | None, typer.Option(
                   hidden=True, help="With --exit-with-parent: the pid of the process that started this one.")
               ] = None) -> None:
    """Run the deployment controller in the foreground (gateways, replicas, rollouts) until interrupted."""
    # First thing: a parent that dies while this process starts leaves it to init, which never dies.
    parent = parent_pid if parent_pid is not None else os.getppid()
    if parent_pid is not None and not exit_with_parent:
        raise SpecError("--parent-pid says whose death stops the controller: give --exit-with-parent too")
    import asyncio
    import logging

    from skyloop.deploy.controller import Controller

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvloop

    async def main() -> None:
        await Controller(state.settings(), exit_when_idle=exit_when_idle,
                         parent=parent if exit_with_parent else None).run()

    # uvloop: on the default loop, a proxied answer waits ~40 ms (delayed ACK) on every request.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
