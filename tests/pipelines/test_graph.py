"""DAG pictures: every dependency drawn once, with what flows along it."""

from __future__ import annotations

import re
from pathlib import Path

from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
from skyloop.pipelines.graph import edges, label, to_dot, to_mermaid

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


TWO_PREPS = '''
from skyloop import pipeline, step

@step(name="prep-data")
def s1(x: int) -> int:
    return x

@step(name="prep_data")
def s2(x: int) -> int:
    return x

@step
def final(a: int, b: int) -> int:
    return a + b

@pipeline
def p(x: int = 1):
    return final(s1(x), s2(x))
'''

QUOTED_CONDITION = """
from skyloop import pipeline, step, when

@step
def mode(m: str) -> str:
    return m

@step
def act(x: str) -> str:
    return x

@pipeline
def p(m: str = 'a"b'):
    k = mode(m)
    with when(k == 'say "hi" \\\\ bye'):
        act(k)
"""


def _spec(tmp_path: Path, source: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "pipe.py"
    path.write_text(source)
    return load_file_module(path).p.compile()


def _outside_dot_strings(dot: str) -> str:
    """The DOT text with every well-formed double-quoted string removed."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', "", dot)


def test_names_that_differ_only_in_punctuation_stay_separate_nodes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, TWO_PREPS)
    assert {t.name for t in spec.tasks} >= {"prep-data", "prep_data"}
    mermaid = to_mermaid(spec)
    nodes = [line.split("[")[0].strip() for line in mermaid.splitlines()[1:] if "-->" not in line]
    assert len(nodes) == len(set(nodes)) == len(spec.tasks) == 3
    targets = [line.split("|")[0].split("-->")[0].strip() for line in mermaid.splitlines() if "-->" in line]
    assert len(set(targets)) == 2  # both preps feed `final`, along two separate edges
    dot = to_dot(spec)
    dot_nodes = [line.split("[")[0].strip() for line in dot.splitlines() if "[label=" in line and "->" not in line]
    assert len(dot_nodes) == len(set(dot_nodes)) == 3
    assert len({line.split("->")[0].strip() for line in dot.splitlines() if "->" in line}) == 2


def test_dot_escapes_quotes_and_backslashes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, QUOTED_CONDITION)
    dot = to_dot(spec)
    assert '"' not in _outside_dot_strings(dot)  # every quote opens or closes a string, or is escaped
    quoted = re.search(r't_act \[label="((?:[^"\\]|\\.)*)"', dot)
    assert quoted is not None
    assert re.sub(r"\\(.)", r"\1", quoted.group(1)) == label(spec.task("act"))  # unescapes to the label
    assert 'say "hi"' in label(spec.task("act"))
    # A stored spec's name is not checked again on load: escape the graph name too.
    renamed = to_dot(spec.model_copy(update={"name": 'odd "name" \\ here'}))
    assert renamed.startswith('digraph "odd \\"name\\" \\\\ here" {')
    assert '"' not in _outside_dot_strings(renamed)


def test_the_example_pipeline_trains_the_smallest_forest_it_is_given(settings: Settings) -> None:
    # `-p n_estimators=1` asked scikit-learn for a forest of 0 trees (the grid halved the size), and failed.
    result = run(load_file_module(EXAMPLE).training_pipeline, {"n_estimators": 1}, backend="inline",
                 settings=settings)
    assert result.status == "SUCCEEDED", result.error
    assert result.outputs["params"]["n_estimators"] == 1
    assert result.steps["train"].units == 2  # one size, two depths
