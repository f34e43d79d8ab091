"""`skyloop pipeline compile|validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skyloop.cli.main import console
from skyloop.execution.api import dump_spec, load_target, prepare

__all__ = ["app"]

app = typer.Typer(help="Compile and check pipelines.", no_args_is_help=True)


@app.command()
def compile(
    target: Annotated[str, typer.Argument(help="FILE.py:PIPELINE or module:PIPELINE")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the YAML here.")] = None,
) -> None:
    """Compile a pipeline to a YAML spec that `skyloop run SPEC.yaml` runs on its own."""
    spec = prepare(load_target(target)).spec
    if output is None:
        print(dump_spec(spec), end="")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(dump_spec(spec, relative_to=output.parent))
    console.print(f"wrote {output} ({len(spec.tasks)} tasks)")


@app.command()
def validate(target: Annotated[str, typer.Argument(help="SPEC.yaml or FILE.py:PIPELINE")]) -> None:
    """Check a pipeline: references, cycles, missing inputs, types between steps, importable steps."""
    prepared = prepare(load_target(target), None)
    console.print(f"[green]valid[/]: pipeline {prepared.spec.name!r} with {len(prepared.spec.tasks)} tasks")
