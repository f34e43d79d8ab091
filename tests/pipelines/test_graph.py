"""DAG pictures: every dependency drawn once, with what flows along it."""

from __future__ import annotations

from pathlib import Path

from skyloop.execution.loading import load_file_module
from skyloop.pipelines.graph import edges, to_dot, to_mermaid

EXAMPLE = Path(__file__).parents[2] / "examples" / "train.py"


def test_edges_name_what_flows() -> None:
    spec = load_file_module(EXAMPLE).training_pipeline.compile()
    found = edges(spec)
    assert ("load_data", "split_data", "frame") in found
    assert ("split_data", "evaluate", "test→test") in found
    assert ("pick_best", "report", "accuracy→accuracy, params→params, when") in found
    assert len(found) == len(set(found)) == 8


def test_mermaid_and_dot_mark_fanout_and_conditions() -> None:
    spec = load_file_module(EXAMPLE).training_pipeline.compile()
    mermaid = to_mermaid(spec)
    assert 't_train[["train | map(params)"]]' in mermaid  # fan-out: a subroutine box
    assert "t_report{" in mermaid  # condition: a rhombus
    assert mermaid.count("-->") == 8
    dot = to_dot(spec)
    assert dot.startswith('digraph "training_pipeline"') and dot.count("->") == 8
    assert "peripheries=2" in dot and "shape=diamond" in dot
