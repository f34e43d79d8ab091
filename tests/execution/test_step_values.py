"""What flows between steps: parameters each step may change as its own, cache keys that tell apart the values a
step tells apart, and outputs refused (naming the step and the output) when they are not what the step declares
or cannot be stored."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import skyloop
from skyloop import pipeline, step
from skyloop.config import Settings
from skyloop.execution.cache import cache_key
from skyloop.execution.tasks import Element, Literal_
from skyloop.execution.worker import load_input
from skyloop.store.artifacts import ArtifactStore


@step
def describe(x: Any) -> str:
    return f"{type(x).__name__}:{x!r}"


@pipeline
def describe_param(x: Any = None):
    return describe(x)


@step
def take_rate(cfg: dict[str, Any]) -> float:
    return float(cfg.pop("rate"))  # changes its input in place


@step
def show_config(cfg: dict[str, Any], rate: float) -> str:
    return repr(cfg)


@pipeline
def shared_config(cfg: dict[str, Any] = {"rate": 0.5, "depth": 3}):  # noqa: B006 - the point of the test
    return show_config(cfg, take_rate(cfg))


@step
def not_an_int() -> int:
    return "seven"  # type: ignore[return-value]


@pipeline
def wrong_return():
    return describe(not_an_int())


class Pair(NamedTuple):
    count: int
    label: str


@step
def swapped() -> Pair:
    return Pair("three", 3)  # type: ignore[arg-type]


@pipeline
def wrong_field():
    return describe(swapped().label)


@step
def numbers_of_numpy() -> Pair:
    import numpy as np

    return Pair(np.int64(3), "x")  # type: ignore[arg-type]  # a numpy int is an int


@pipeline
def numpy_int_field():
    return describe(numbers_of_numpy().count)


@step
def locked() -> Any:
    return {"guard": threading.Lock()}


@pipeline
def unstorable():
    return describe(locked())


def _run(target: Any, settings: Settings, **params: Any) -> skyloop.Run:
    return skyloop.run(target, params, backend="inline", settings=settings)


@pytest.mark.parametrize(("first", "second"), [
    ((1, 2), [1, 2]),
    ({1: "a"}, {"1": "a"}),
    ({True: "a"}, {"true": "a"}),
    ({"k": (1,)}, {"k": [1]}),
])
def test_a_cached_result_is_not_given_for_a_parameter_json_would_confuse(
        settings: Settings, first: Any, second: Any) -> None:
    assert _run(describe_param, settings, x=first).outputs["output"] == describe.fn(first)
    again = _run(describe_param, settings, x=second)
    assert again.steps["describe"].state == "SUCCEEDED"  # not CACHED with the other value's result
    assert again.outputs["output"] == describe.fn(second)
    assert _run(describe_param, settings, x=first).steps["describe"].state == "CACHED"


def test_a_parameter_with_keys_of_mixed_types_runs(settings: Settings) -> None:
    value = {1: "a", "b": 2}
    assert _run(describe_param, settings, x=value).outputs["output"] == describe.fn(value)


@pytest.mark.parametrize("value", [None, 1, 1.5, -0.0, float("nan"), True, "s", [1, [2.5, None]], {"a": {"b": [1]}}])
def test_plain_parameters_keep_the_cache_keys_they_had(value: Any) -> None:
    # Changing these would make every cached step of every user run again once.
    inputs = {"x": Literal_(value)}
    old = {"code": "c", "version": "", "inputs": {"x": {"value": value}}}
    assert cache_key("c", "", inputs) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(("one", "other"), [
    (1, 1.0), (1, True), (0.0, -0.0), ((1, 2), [1, 2]), ({1: "a"}, {"1": "a"}), ({None: 1}, {"null": 1}),
    ([(1, 2)], [[1, 2]]), ({"k": 1}, {"k": 1.0}),
])
def test_literals_a_step_tells_apart_have_different_cache_keys(one: Any, other: Any) -> None:
    assert cache_key("c", "", {"x": Literal_(one)}) != cache_key("c", "", {"x": Literal_(other)})
    assert cache_key("c", "", {"x": Literal_(one)}) == cache_key("c", "", {"x": Literal_(one)})


def test_a_step_that_changes_its_parameter_changes_its_own_copy(settings: Settings, tmp_path: Path) -> None:
    run = _run(shared_config, settings)
    assert run.status == "SUCCEEDED"
    # The other step sees the parameter as given, as it would on a backend that sends each its inputs...
    assert run.outputs["output"] == repr({"rate": 0.5, "depth": 3})
    # ... and the pipeline's default is left as it was for the next run.
    assert shared_config.compile().params[0].default == {"rate": 0.5, "depth": 3}
    assert _run(shared_config, Settings.for_home(tmp_path / "other")).status == "SUCCEEDED"


def test_every_load_of_a_literal_is_a_fresh_copy(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    value = {"layers": [64, 32]}
    literal = Literal_(value)
    loaded = load_input(literal, store)
    loaded["layers"].append(16)
    assert value == {"layers": [64, 32]} and load_input(literal, store) == value
    item = load_input(Element(Literal_([[1], [2]]), 1), store)
    item.append(3)
    assert load_input(Element(Literal_([[1], [2]]), 1), store) == [2]


@pytest.mark.parametrize(("target", "message"), [
    (wrong_return, "step 'not_an_int' returned a str where its return annotation says int"),
    (wrong_field, "step 'swapped' returned a str for its output 'count', declared int"),
])
def test_an_output_that_is_not_of_its_declared_type_fails_the_step(
        settings: Settings, target: Any, message: str) -> None:
    run = _run(target, settings)
    assert run.status == "FAILED"
    failed = next(s for s in run.steps.values() if s.state == "FAILED")
    assert message in (failed.error or "")
    assert "change the annotation" in (failed.error or "")


def test_a_numpy_number_fits_a_python_number(settings: Settings) -> None:
    assert _run(numpy_int_field, settings).status == "SUCCEEDED"


def test_an_output_that_cannot_be_stored_names_the_step_and_the_output(settings: Settings) -> None:
    run = _run(unstorable, settings)
    assert run.steps["locked"].state == "FAILED"
    error = run.steps["locked"].error or ""
    assert "step 'locked': output 'output' cannot be stored" in error and "_thread.lock" in error
    assert "return data that pickle can store instead" in error
