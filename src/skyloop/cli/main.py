"""The `skyloop` command: `run`, `runs`, `pipeline`, `artifacts`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text
from typer.exceptions import TyperException

from skyloop.cli.errors import exit_code
from skyloop.config import ExecutionSettings, Settings
from skyloop.errors import SkyloopError, SpecError

__all__ = ["app", "main"]

app = typer.Typer(name="skyloop", help="Run AI agent workflows in production.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# Markup off: run errors, step names and spec text are user data, and `[/data]` in one is not a style tag.
# Styled words are built as `rich.text.Text` instead.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def _labelled(label: str, message: str) -> Text:
    """`error: message` with the label in bold red and the message as plain text."""
    return Text.assemble((label, "bold red"), " ", message)


class State:
    """Options shared by every command."""

    debug: bool = False
    home: Path | None = None
    interrupted: str = "interrupted"
    """What Ctrl-C says: a command that knows more (the run it cancelled, how to finish it) sets it."""

    def settings(self, **execution: Any) -> Settings:
        """The settings for this invocation (environment, then --home, then command options)."""
        settings = Settings.load() if self.home is None else Settings.load(home=self.home)
        overrides = {k: v for k, v in execution.items() if v is not None}
        if overrides:
            try:
                settings.execution = ExecutionSettings.model_validate({**settings.execution.model_dump(), **overrides})
            except ValidationError as exc:
                bad = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: "
                                f"{str(e['msg']).removeprefix('Value error, ')}"
                                for e in exc.errors())
                raise SpecError(bad) from None
        return settings


state = State()


def _version(given: bool) -> None:
    if given:
        import skyloop

        print(f"skyloop {skyloop.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    home: Annotated[Path | None, typer.Option("--home", help="skyloop home (DB, artifacts, logs).",
                                              envvar="SKYLOOP_HOME")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print skyloop's version and exit.")] = False,
) -> None:
    state.debug, state.home = debug, home


def _register() -> None:
    from skyloop.cli import (
        artifacts,
        demo_cmd,
        deploy_cmd,
        models_cmd,
        pipeline_cmd,
        queue_cmd,
        run_cmd,
        runs,
        serve_cmd,
    )

    run_cmd.register(app)
    queue_cmd.register(app)
    serve_cmd.register(app)
    demo_cmd.register(app)
    app.add_typer(runs.app, name="runs")
    app.add_typer(pipeline_cmd.app, name="pipeline")
    app.add_typer(artifacts.app, name="artifacts")
    app.add_typer(models_cmd.app, name="models")
    app.add_typer(deploy_cmd.app, name="deploy")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning skyloop errors into one line and an exit code."""
    # As `python -m skyloop` does: `module:PIPELINE` finds the modules of the folder it runs in (the `skyloop`
    # script alone did not, so `skyloop run example:p` failed where `python -m skyloop run example:p` ran).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    _register()
    try:
        # Outside standalone mode Click returns the code of a `typer.Exit` instead of exiting with it.
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # Typer turns a KeyboardInterrupt in a command into this code, saying nothing
            raise KeyboardInterrupt
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except SkyloopError as exc:
        if state.debug:
            raise
        err_console.print(_labelled("error:", str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt:
        err_console.print(state.interrupted, style="yellow", highlight=False, soft_wrap=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except TyperException as exc:  # usage errors: Typer prints them in its own format
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err_console.print(_labelled("error:", exc.format_message()), highlight=False)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if state.debug:
            raise
        err_console.print(_labelled("internal error:", f"{type(exc).__name__}: {exc} (rerun with --debug)"),
                          highlight=False, soft_wrap=True)
        sys.exit(70)
