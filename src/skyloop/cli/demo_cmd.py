"""`skyloop demo`: the closed loop end to end on this machine (the README's first command)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from skyloop.cli.main import state

__all__ = ["register"]


def demo(
    baseline: Annotated[float, typer.Option(help="Seconds of traffic before the world shifts.")] = 20.0,
    limit: Annotated[float, typer.Option(help="Give up after this many seconds in all.")] = 170.0,
) -> None:
    """Train, deploy, drive agent traffic with feedback, shift the world, and watch the loop retrain and roll out."""
    from skyloop.demo.run import Demo

    # The demo's own console keeps Rich markup on: it styles its fixed messages with tags (the CLI's does not).
    ok = Demo(state.settings(), Console(), baseline=baseline, limit=limit).run()
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `demo` to the CLI."""
    app.command("demo")(demo)
