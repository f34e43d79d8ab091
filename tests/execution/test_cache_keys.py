"""Cache keys name what a step's result depends on: the values a factory-made step closes over, the constants
of code with no source file, a dict's key order; and not the scheduling options of its `@step(...)` line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import skyloop
from skyloop import pipeline, step
from skyloop.config import Settings
from skyloop.execution.cache import cache_key, element_key
from skyloop.execution.loading import load_file_module
from skyloop.execution.tasks import Element, Literal_
from skyloop.pipelines.step import code_hash
from skyloop.store.artifacts import ArtifactRef


def _run(target: Any, settings: Settings, **params: Any) -> skyloop.Run:
    return skyloop.run(target, params, backend="inline", settings=settings)


def make_scaler(k: float) -> Any:
    @step(name=f"scale_by_{int(k)}")
    def scale(x: float) -> float:
        return x * k

    return scale


def make_helped(k: float) -> Any:
    def times(v: float, factor: float = k) -> float:  # the value is a default of a function it calls
        return v * factor

    @step(name=f"helped_by_{int(k)}")
    def helped(x: float) -> float:
        return times(x)

    return helped


class Offset:
    """A plain object: its repr holds an address, and nothing says which of its attributes count."""

    def __init__(self, by: float) -> None:
        self.by = by


def make_guarded(offset: Offset) -> Any:
    @step
    def guarded(x: float) -> float:
        return x + offset.by

    return guarded


def _pipeline_of(made: Any) -> Any:
    @pipeline(name=f"with_{made.name}")
    def one(x: float = 10.0):
        return made(x)

    return one


@pytest.mark.parametrize("factory", [make_scaler, make_helped])
def test_steps_made_by_one_factory_from_other_values_do_not_share_results(settings: Settings, factory: Any) -> None:
    triple, double = factory(3.0), factory(2.0)
    assert _run(_pipeline_of(triple), settings).outputs["output"] == 30.0
    run = _run(_pipeline_of(double), settings)
    assert run.steps[double.name].state == "SUCCEEDED"  # not CACHED with the other value's result
    assert run.outputs["output"] == 20.0
    # Made again from the same value, it is the same code: a hit.
    again = factory(2.0)
    assert _run(_pipeline_of(again), settings).steps[again.name].state == "CACHED"


def test_a_step_closing_over_a_value_with_no_stable_digest_is_not_taken_from_the_cache(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    guarded = make_guarded(Offset(1.0))
    target = _pipeline_of(guarded)
    with caplog.at_level(logging.WARNING, logger="skyloop.pipelines"):
        assert _run(target, settings).outputs["output"] == 11.0
        again = _run(target, settings)
    assert again.steps["guarded"].state == "SUCCEEDED"
    assert again.outputs["output"] == 11.0
    warned = [r.getMessage() for r in caplog.records if r.name == "skyloop.pipelines"]
    assert len(warned) == 1, warned  # once, not for every run and estimate
    assert "'offset'" in warned[0] and "test_cache_keys.Offset" in warned[0]
    assert "never taken from the cache" in warned[0]


SCRIPT = """\
import json, sys
import skyloop
from skyloop import pipeline, step
from skyloop.config import Settings

def make(names, table):
    def rank(v):
        return sorted(names).index(v) + table[v]

    @step
    def scale(x: float) -> float:
        return x * FACTOR + rank("b")

    return scale

scale = make({"a", "b", "c", "d", "e", "f"}, {"b": 0.0, "a": 1.0})

@pipeline
def p(x: float = 10.0):
    return scale(x)

run = skyloop.run(p, backend="inline", settings=Settings.for_home(sys.argv[1]))
print(json.dumps({"state": run.steps["scale"].state, "output": run.outputs["output"]}))
"""


def _run_from_stdin(factor: int, home: Path, seed: str) -> dict[str, Any]:
    # `python -`: no source file to read, and its own hash seed (set order) each time.
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-", str(home)], input=SCRIPT.replace("FACTOR", str(factor)),
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_step_with_no_source_file_is_keyed_by_its_constants_and_alike_in_every_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _run_from_stdin(2, home, "1") == {"state": "SUCCEEDED", "output": 21.0}
    assert _run_from_stdin(3, home, "2") == {"state": "SUCCEEDED", "output": 31.0}  # not factor 2's result
    # The same script in another process (another hash seed: a set in its closure iterates otherwise) is a hit.
    assert _run_from_stdin(3, home, "3") == {"state": "CACHED", "output": 31.0}


@step
def columns(mapping: dict[str, Any]) -> list[Any]:
    first = next(iter(mapping.values()), None)
    return [*mapping, *(list(first[0]) if isinstance(first, list) and first and isinstance(first[0], dict) else [])]


@pipeline
def column_order(mapping: dict[str, Any] = {}):  # noqa: B006 - a default the pipeline never changes
    return columns(mapping)


@pytest.mark.parametrize(("first", "second"), [
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
    ({"x": [{"a": 1, "b": 2}]}, {"x": [{"b": 2, "a": 1}]}),
])
def test_a_dict_in_another_key_order_is_another_input(settings: Settings, first: Any, second: Any) -> None:
    assert _run(column_order, settings, mapping=first).outputs["output"] == columns.fn(first)
    run = _run(column_order, settings, mapping=second)
    assert run.steps["columns"].state == "SUCCEEDED"  # not CACHED with the other order's result
    assert run.outputs["output"] == columns.fn(second) != columns.fn(first)
    for given in (first, second):
        assert _run(column_order, settings, mapping=given).steps["columns"].state == "CACHED"


def test_dict_key_order_keeps_every_other_distinction() -> None:
    def key(value: Any) -> str:
        return cache_key("c", "", {"x": Literal_(value)})

    assert key({"b": 2, "a": 1}) == key({"b": 2, "a": 1})
    assert len({key({"b": 1, "a": 2}), key({"b": 1.0, "a": 2}), key({"b": True, "a": 2}),
                key({"b": [1], "a": 2}), key({"b": (1,), "a": 2}), key({"a": 2, "b": 1})}) == 6


DECORATED = """\
from skyloop import pipeline, step


@step({options})
def slow(x: int) -> int:
    return x + {add}


@pipeline
def p(x: int = 1):
    return slow(x)
"""


def test_scheduling_options_of_the_step_decorator_keep_cached_results(tmp_path: Path, settings: Settings) -> None:
    file = tmp_path / "decorated_steps.py"

    def run_with(options: str, add: int = 1) -> skyloop.Run:
        file.write_text(DECORATED.format(options=options, add=add))
        return _run(load_file_module(file).p, settings)

    first = run_with("retries=0")
    assert first.steps["slow"].state == "SUCCEEDED"
    hashed = code_hash(load_file_module(file).slow.fn)
    multi_line = "\n    retries=3,\n    timeout=600,\n    priority=5,\n    pool='gpu',\n"
    for options in ("retries=3, timeout=600, priority=5, pool='gpu'", multi_line):
        run = run_with(options)
        assert run.steps["slow"].state == "CACHED", options
        assert code_hash(load_file_module(file).slow.fn) == hashed  # so the learned durations hold too
    edited = run_with("retries=3", add=2)  # the body still counts
    assert edited.steps["slow"].state == "SUCCEEDED" and edited.outputs["output"] == 3
    assert run_with("retries=3, cache_version='2'", add=2).steps["slow"].state == "SUCCEEDED"


@step
def listed(n: int) -> list[dict[str, Any]]:
    return [{"trial": i, "lr": 0.1 * i} for i in range(n)]  # a list stored as one artifact


@step
def trial(params: dict[str, Any]) -> float:
    return params["lr"] * 2


@pipeline
def sweep(n: int = 3):
    return trial.map(listed(n))


def test_a_mapped_unit_is_cached_by_its_own_item_not_the_whole_list(settings: Settings) -> None:
    # Keyed by the list's digest and the item's index, one trial added to the sweep re-ran every trial.
    first = _run(sweep, settings, n=300)
    assert first.status == "SUCCEEDED" and first.steps["listed"].state.value == "SUCCEEDED"
    grown = _run(sweep, settings, n=301)
    assert grown.status == "SUCCEEDED" and grown.output("trial")[-1] == 0.1 * 300 * 2
    with grown.workspace.db.read() as session:
        from skyloop.store.runs import step_runs

        states = sorted(s.state for s in step_runs(session, grown.id) if s.task == "trial" and s.map_index >= 0)
    assert states.count("CACHED") == 300 and states.count("SUCCEEDED") == 1
    # An item moved to another place is the same item: a list in another order is all hits.
    assert cache_key("c", "1", {"x": Element(ArtifactRef("a" * 64, "json", "list", 9), 0, element_key(5))}) == \
        cache_key("c", "1", {"x": Element(ArtifactRef("b" * 64, "json", "list", 9), 7, element_key(5))})
    # Items with no plain value keep the list's digest and the index.
    assert element_key([1.0, 2.0]) is not None and element_key((1, 2)) is None and element_key({1: "a"}) is None


GLOBALS = '''
import logging

from skyloop import pipeline, step

FACTOR = 2
log = logging.getLogger("scaled")  # an object with no digest: left out, never making the step uncacheable


def helper(n):
    return n * FACTOR


@step
def scaled(n: int) -> int:
    log.debug("scaling %s", n)
    return helper(n) + OFFSET


OFFSET = 0


@pipeline
def scaling(n: int = 5):
    return scaled(n)
'''


def test_a_module_constant_or_helper_the_step_reads_is_part_of_its_key(tmp_path: Path, settings: Settings,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    # Editing FACTOR (read by the helper the step calls) or OFFSET (read by the step) gave the old result, CACHED.
    path = tmp_path / "scaling_steps.py"
    edits = iter(range(1, 100))

    def run_with(source: str) -> tuple[str, Any]:
        path.write_text(source)
        os.utime(path, (1, next(edits)))  # a new stat for every edit: the file is read again
        done = skyloop.run(f"{path}:scaling", {}, backend="inline", settings=settings)
        return done.steps["scaled"].state.value, done.output("scaled")

    with caplog.at_level(logging.WARNING):
        assert run_with(GLOBALS) == ("SUCCEEDED", 10)
        assert run_with(GLOBALS) == ("CACHED", 10)  # the logger did not make it uncacheable
    assert "never taken from the cache" not in caplog.text
    assert run_with(GLOBALS.replace("FACTOR = 2", "FACTOR = 3")) == ("SUCCEEDED", 15)
    assert run_with(GLOBALS.replace("FACTOR = 2", "FACTOR = 3").replace("n * FACTOR", "n * FACTOR * 2")) == \
        ("SUCCEEDED", 30)
    assert run_with(GLOBALS.replace("FACTOR = 2", "FACTOR = 3").replace("n * FACTOR", "n * FACTOR * 2")
                    .replace("OFFSET = 0", "OFFSET = 1")) == ("SUCCEEDED", 31)
