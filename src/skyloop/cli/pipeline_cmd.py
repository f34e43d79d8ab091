"""`skyloop pipeline compile|validate`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.tree import Tree

from skyloop.cli.main import console
from skyloop.errors import SpecError
from skyloop.execution.api import dump_spec, load_target, prepare
from skyloop.pipelines.graph import edges, label, to_dot, to_mermaid
from skyloop.pipelines.validate import topological_order
from skyloop.spec.pipeline import PipelineSpec

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


@app.command()
def graph(
    target: Annotated[str, typer.Argument(help="FILE.py:PIPELINE, module:PIPELINE or SPEC.yaml")],
    fmt: Annotated[str, typer.Option("--format", help="tree | mermaid | dot")] = "tree",
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Write here; .png/.svg render with dot.")] = None,
) -> None:
    """Draw the pipeline's DAG: a tree in the terminal, or Mermaid / Graphviz text (PNG/SVG when dot exists)."""
    spec = prepare(load_target(target)).spec
    if output is not None and output.suffix in (".png", ".svg"):
        dot = shutil.which("dot")
        if dot is None:
            raise SpecError("rendering PNG/SVG needs Graphviz's `dot` (apt-get install graphviz); "
                            "or write --format dot / mermaid text instead")
        subprocess.run([dot, f"-T{output.suffix[1:]}", "-o", str(output)], input=to_dot(spec), text=True, check=True)
        console.print(f"wrote {output}")
        return
    if fmt == "tree":
        console.print(_tree(spec))
        return
    if fmt not in ("mermaid", "dot"):
        raise SpecError(f"unknown format {fmt!r}; choose tree, mermaid or dot")
    text = to_mermaid(spec) if fmt == "mermaid" else to_dot(spec)
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
        console.print(f"wrote {output}")


def _tree(spec: PipelineSpec) -> Tree:
    """Each task under the first task it depends on; further parents are named in brackets."""
    root = Tree(f"[bold]{spec.name}[/]")
    nodes: dict[str, Tree] = {}
    parents: dict[str, list[str]] = {t.name: [] for t in spec.tasks}
    for src, dst, _ in edges(spec):
        parents[dst].append(src)
    for name in topological_order(spec):
        task = spec.task(name)
        first, others = (parents[name][0], parents[name][1:]) if parents[name] else (None, [])
        also = f" [dim](also after {', '.join(others)})[/]" if others else ""
        text = label(task).replace("[", "\\[") + also
        nodes[name] = (nodes[first] if first else root).add(text)
    return root
