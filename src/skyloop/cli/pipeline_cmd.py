"""`skyloop pipeline compile|validate|graph`."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from skyloop.cli.main import console
from skyloop.errors import SkyloopError, SpecError
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
    _write(output, lambda: dump_spec(spec, relative_to=output.parent))
    console.print(f"wrote {output} ({len(spec.tasks)} tasks)")


def _writable(output: Path) -> None:
    """Make `-o`'s missing folders, or a SpecError saying why the file cannot go there."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file where a folder of the path should be
        raise SpecError(f"cannot write {str(output)!r}: {exc.strerror or exc} ({exc.filename}); give -o a file "
                        "path whose folders can be made") from None
    if output.is_dir():
        raise SpecError(f"cannot write {str(output)!r}: it is a folder; give -o a file name, e.g. "
                        f"{output / 'spec.yaml'}")


def _write(output: Path, text: Callable[[], str]) -> None:
    """Write `text()` to `-o` (its folders made as needed), with a SpecError naming the path when it cannot be."""
    _writable(output)
    content = text()
    try:
        output.write_text(content)
    except OSError as exc:
        raise SpecError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None


@app.command()
def validate(target: Annotated[str, typer.Argument(help="SPEC.yaml or FILE.py:PIPELINE")]) -> None:
    """Check a pipeline: references, cycles, missing inputs, types between steps, importable steps."""
    prepared = prepare(load_target(target), None)
    console.print(Text.assemble(("valid", "green"), f": pipeline {prepared.spec.name!r} with "
                                                   f"{len(prepared.spec.tasks)} tasks"))


PICTURES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".gif")
"""Suffixes of `-o` drawn as a picture by Graphviz's `dot`."""
TEXTS = {".dot": "dot", ".gv": "dot", ".mmd": "mermaid", ".mermaid": "mermaid", ".txt": "tree"}
"""Suffixes of `-o` that say which text to write, when `--format` does not."""
TREE_FILE_WIDTH = 200
"""Columns of the tree written to a .txt file."""


@app.command()
def graph(
    target: Annotated[str, typer.Argument(help="FILE.py:PIPELINE, module:PIPELINE or SPEC.yaml")],
    fmt: Annotated[str | None, typer.Option("--format", help="tree | mermaid | dot (default: tree, or what the "
                                                              "suffix of -o says)")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Write here: .png/.svg/.pdf/.jpg are drawn with dot; .dot/.gv, .mmd, .txt are text.")
    ] = None,
) -> None:
    """Draw the pipeline's DAG: a tree in the terminal, or Mermaid / Graphviz text (a picture when dot exists)."""
    if fmt is not None and fmt not in ("tree", "mermaid", "dot"):
        raise SpecError(f"unknown format {fmt!r}; choose tree, mermaid or dot")
    spec = prepare(load_target(target)).spec
    if output is None:
        if fmt in (None, "tree"):
            console.print(_tree(spec, console.width))
        else:
            print(to_mermaid(spec) if fmt == "mermaid" else to_dot(spec), end="")
        return
    if output.suffix.lower() in PICTURES:
        _writable(output)  # missing folders made, as `compile -o` does
        _draw(spec, output)
        return
    chosen = fmt or TEXTS.get(output.suffix.lower())
    if chosen is None:
        raise SpecError(f"cannot tell what to write to {output}: draw a picture with {', '.join(PICTURES)} "
                        f"(with Graphviz's dot), write text with {', '.join(TEXTS)}, or pass --format")
    if chosen == "tree":
        text = io.StringIO()
        Console(file=text, width=TREE_FILE_WIDTH, no_color=True, markup=False).print(_tree(spec, TREE_FILE_WIDTH))
        _write(output, text.getvalue)
    else:
        _write(output, lambda: to_mermaid(spec) if chosen == "mermaid" else to_dot(spec))
    console.print(f"wrote {output}")


def _draw(spec: PipelineSpec, output: Path) -> None:
    dot = shutil.which("dot")
    if dot is None:
        raise SpecError(f"drawing {output.suffix} needs Graphviz's `dot` (apt-get install graphviz); "
                        "or write text with -o FILE.dot or FILE.mmd")
    done = subprocess.run([dot, f"-T{output.suffix[1:].lower()}", "-o", str(output)], input=to_dot(spec),
                          text=True, capture_output=True, check=False)
    if done.returncode != 0:
        raise SkyloopError(f"dot could not draw {output}: {done.stderr.strip() or f'exit {done.returncode}'}")
    console.print(f"wrote {output}")


LABEL_ROOM = 24
"""Columns a tree line keeps for its label: a branch indented further goes on from the top level."""


def _tree(spec: PipelineSpec, width: int) -> Tree:
    """Each task under the first task it depends on; further parents are named in brackets.

    Rich indents 4 columns a level and draws nothing of a node indented past the width, without a word: a chain
    of 20 steps lost its end on 80 columns. A task that would sit deeper than `width` allows starts a new branch
    at the top level instead, naming the task it comes after, so that every task is drawn.
    """
    deepest = max(1, (width - LABEL_ROOM) // 4)
    root = Tree(Text(spec.name, style="bold"))
    nodes: dict[str, tuple[Tree, int]] = {}
    parents: dict[str, list[str]] = {t.name: [] for t in spec.tasks}
    for src, dst, _ in edges(spec):
        parents[dst].append(src)
    for name in topological_order(spec):
        task = spec.task(name)
        first, others = (parents[name][0], parents[name][1:]) if parents[name] else (None, [])
        parent, depth = nodes[first] if first else (root, 0)
        text = Text(label(task))  # a Text, not markup: labels hold types such as `list[float]`
        if depth >= deepest:
            parent, depth = root, 0
            text.append(f" (after {first}: continued from above)", style="dim")
        if others:
            text.append(f" (also after {', '.join(others)})", style="dim")
        nodes[name] = (parent.add(text), depth + 1)
    return root
