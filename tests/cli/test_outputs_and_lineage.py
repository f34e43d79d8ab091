"""What `run`, `runs show` and `artifacts lineage` say of unusual outputs: ±inf values, equal values gathered from
several units, and artifacts garbage collection deleted."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from tests_support import age_blobs, write

from skyloop.config import Settings
from skyloop.errors import NotFound
from skyloop.execution.run import Run
from skyloop.store.workspace import Workspace

PIPES = '''
from skyloop import pipeline, step


@step
def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf") * (1 if a >= 0 else -1)


@step
def pair(a: float) -> list[float]:
    return [a, float("-inf")]


@step
def load(n: int) -> list[int]:
    return list(range(n))


@step
def score(x: int) -> float:
    return 0.0


@step
def total(values: list[float]) -> float:
    return sum(values)


@step
def big(n: int) -> bytes:
    return b"z" * n


@pipeline
def ratios(a: float = 1.0, b: float = 0.0):
    return {"ratio": ratio(a, b), "pair": pair(a)}


@pipeline
def gathered(n: int = 4):
    return total(score.map(load(n)))


@step
def many(n: int) -> list[int]:
    return list(range(n))


@pipeline
def one_list(n: int = 2000):
    return {"numbers": many(n)}


@pipeline
def kept(n: int = 5000):
    return {"raw": big(n), "sum": total(score.map(load(3)))}
'''


def strict(text: str) -> Any:
    """`json.loads` that refuses NaN and Infinity, as `jq` and most languages' parsers do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_infinite_outputs_are_shown_as_text_and_as_null_in_strict_json(cli, tmp_path: Path) -> None:
    # Before, the text preview refused ±inf: `skyloop run` and every later `runs show` ended in "internal error".
    write(tmp_path / "pipes.py", PIPES)
    ran = cli("run", "pipes.py:ratios", "--backend", "inline")
    assert ran.returncode == 0, ran.stderr
    assert "ratio = Infinity" in ran.stdout and "pair = [1.0, -Infinity]" in ran.stdout
    run_id = strict(cli("runs", "list", "--json").stdout)[0]["id"]
    shown = cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "ratio = Infinity" in shown.stdout
    # --json stays strict JSON, as every --json is: a non-finite number is null there.
    data = strict(cli("runs", "show", run_id, "--json").stdout)
    assert data["outputs"]["ratio"]["value"] is None and data["outputs"]["pair"]["value"] == [1.0, None]
    negative = cli("run", "pipes.py:ratios", "-p", "a=-1.0", "--backend", "inline")
    assert negative.returncode == 0 and "ratio = -Infinity" in negative.stdout, negative.stderr


def test_lineage_gives_the_position_of_each_gathered_input(cli, tmp_path: Path) -> None:
    # Four units each returned 0.0 (one artifact) into `total`: four identical lines before, and four equal objects.
    write(tmp_path / "pipes.py", PIPES)
    assert cli("run", "pipes.py:gathered", "--backend", "inline").returncode == 0
    zero = json.dumps(0.0).encode()
    digest = hashlib.sha256(zero).hexdigest()
    lineage = cli("artifacts", "lineage", digest[:12], "--json")
    assert lineage.returncode == 0, lineage.stderr
    edges = strict(lineage.stdout)
    read = [(e["step"], e["as"], e["position"]) for e in edges if e["direction"] == "consumed"]
    assert sorted(read) == [("total", "values", i) for i in range(4)]
    made = sorted((e["step"], e["map_index"]) for e in edges if e["direction"] == "produced")
    assert made == [("score", 0), ("score", 1), ("score", 2), ("score", 3), ("total", -1)]  # 0.0 summed is 0.0
    assert all(e["artifact_deleted_at"] is None for e in edges)
    text = cli("artifacts", "lineage", digest[:12]).stdout
    assert [line.split(" as ")[1] for line in text.splitlines() if line.startswith("consumed by")] == \
        [f"values[{i}]" for i in range(4)]


def test_outputs_garbage_collection_deleted_are_named_so(cli, home: Path, tmp_path: Path) -> None:
    # Before, `runs show` said "not produced" of outputs a run made and a collection deleted since, and `artifacts
    # lineage` showed their history as if they were still there.
    write(tmp_path / "pipes.py", PIPES)
    ran = cli("run", "pipes.py:kept", "--backend", "inline", "--json")
    assert ran.returncode == 0, ran.stderr
    outputs = strict(ran.stdout)["outputs"]
    raw = outputs["raw"]["digest"]
    workspace = Workspace.open(Settings.for_home(home))
    try:
        age_blobs(workspace.store)  # past what a collection keeps as possibly in flight
    finally:
        workspace.close()
    gc = cli("artifacts", "gc", "--older-than", "0s", "--json")
    assert gc.returncode == 0 and raw in strict(gc.stdout)["digests"], gc.stderr
    run_id = strict(ran.stdout)["id"]
    shown = cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert f"raw: garbage-collected (bytes, {outputs['raw']['size']:,} bytes, artifact {raw[:12]}" in shown.stdout
    assert "not produced" not in shown.stdout
    data = strict(cli("runs", "show", run_id, "--json").stdout)["outputs"]
    assert data["raw"]["digest"] == raw and data["raw"]["deleted_at"]
    assert data["sum"]["deleted_at"]  # a small value kept in the DB goes the same way
    lineage = cli("artifacts", "lineage", raw[:12])
    assert lineage.returncode == 0, lineage.stderr
    assert f"artifact {raw[:12]}: deleted by garbage collection at" in lineage.stdout
    assert "produced by: run" in lineage.stdout
    edges = strict(cli("artifacts", "lineage", raw[:12], "--json").stdout)
    assert edges and all(e["artifact_deleted_at"] for e in edges)
    # In Python, the same: the values are gone, for a reason the error names (a mapped step's units too).
    workspace = Workspace.open(Settings.for_home(home))
    try:
        run = Run(workspace, run_id)
        for task, count in (("big", 1), ("score", 3)):
            with pytest.raises(NotFound, match=f"step '{task}' of run .*: {count} of its outputs were deleted by "
                                               "garbage collection"):
                run.output(task)
        assert run.workspace is workspace
    finally:
        workspace.close()


def test_a_large_list_one_step_returned_is_shown_as_its_artifact(cli, tmp_path: Path) -> None:
    # It was taken for a mapped step's list of outputs: `run` and `runs show` ended in KeyError 'items'.
    write(tmp_path / "pipes.py", PIPES)
    ran = cli("run", "pipes.py:one_list", "--backend", "inline")
    assert ran.returncode == 0, ran.stderr
    assert re.search(r"numbers: list, [\d,]+ bytes, artifact [0-9a-f]{12}", ran.stdout), ran.stdout
