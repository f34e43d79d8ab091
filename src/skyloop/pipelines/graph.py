"""Pictures of a pipeline's DAG: Mermaid and Graphviz DOT text (pure functions of the spec)."""

from __future__ import annotations

from skyloop.spec.pipeline import PipelineSpec, TaskInput, TaskSpec

__all__ = ["edges", "label", "to_dot", "to_mermaid"]


def label(task: TaskSpec) -> str:
    """`train | map(x)`, `report | when acc >= 0.9`: the name plus fan-out and condition marks."""
    parts = [task.name]
    if task.map_over:
        parts.append(f"map({', '.join(task.map_over)})")
    if task.when:
        parts.append("when " + " and ".join(c.describe() for c in task.when))
    return " | ".join(parts)


def edges(spec: PipelineSpec) -> list[tuple[str, str, str]]:
    """`(from task, to task, what flows)` for every dependency, in task order."""
    found: list[tuple[str, str, str]] = []
    for task in spec.tasks:
        flows: dict[str, list[str]] = {}
        for name, binding in task.inputs.items():
            if isinstance(binding, TaskInput):
                flows.setdefault(binding.task, []).append(
                    name if binding.output == "output" else f"{binding.output}→{name}")
        for cond in task.when:
            if isinstance(cond.source, TaskInput):
                flows.setdefault(cond.source.task, []).append("when")
        for dep in task.after:
            flows.setdefault(dep, []).append("after")
        found.extend((src, task.name, ", ".join(what)) for src, what in flows.items())
    return found


def _id(name: str) -> str:
    """A node id made of ASCII letters, digits and `_`, one-to-one with the task name.

    ASCII letters and digits stand for themselves, `_` becomes `__` and any other character `_<hex>_`,
    so `prep-data` (`t_prep_2d_data`) and `prep_data` (`t_prep__data`) stay two nodes.
    """
    return "t_" + "".join(ch if ch.isascii() and ch.isalnum() else "__" if ch == "_" else f"_{ord(ch):x}_"
                          for ch in name)


def _dot_str(text: str) -> str:
    """`text` as the inside of a DOT double-quoted string."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "")


def to_mermaid(spec: PipelineSpec) -> str:
    """A Mermaid flowchart (renders in GitHub, GitLab and most docs tools)."""
    lines = ["flowchart TD"]
    for task in spec.tasks:
        text = label(task).replace('"', "'")
        shape = (f'{_id(task.name)}[["{text}"]]' if task.map_over
                 else f'{_id(task.name)}{{"{text}"}}' if task.when else f'{_id(task.name)}["{text}"]')
        lines.append(f"    {shape}")
    for src, dst, what in edges(spec):
        lines.append(f'    {_id(src)} -->|"{what}"| {_id(dst)}')
    return "\n".join(lines) + "\n"


def to_dot(spec: PipelineSpec) -> str:
    """Graphviz DOT (`dot -Tpng`)."""
    lines = [f'digraph "{_dot_str(spec.name)}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", '
             'fillcolor="#eef3fb", fontname="Helvetica"];']
    for task in spec.tasks:
        extra = ", peripheries=2" if task.map_over else ', shape=diamond, fillcolor="#fdf3e1"' if task.when else ""
        lines.append(f'  {_id(task.name)} [label="{_dot_str(label(task))}"{extra}];')
    for src, dst, what in edges(spec):
        lines.append(f'  {_id(src)} -> {_id(dst)} [label="{_dot_str(what)}", fontsize=10];')
    lines.append("}")
    return "\n".join(lines) + "\n"
