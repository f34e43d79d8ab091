"""Authoring and compiling: decorators, wiring, fan-out, conditions, the spec and its YAML."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import yaml

from skyloop import CycleError, PipelineSpec, Resources, SpecError, pipeline, step, unmapped, when
from skyloop.execution.api import dump_spec
from skyloop.pipelines.validate import validate_spec
from skyloop.spec.pipeline import ConstInput, ParamInput, TaskInput


class Pair(NamedTuple):
    low: int
    high: int


@step
def numbers(n: int) -> list[int]:
    return list(range(n))


@step(resources=Resources(cpus=2, memory="512Mi", gpus=1, custom={"license": 1}), retries=3, retry_delay=0.5,
      timeout=60, cache=False, cache_version="v2", priority=5, name="bounds")
def pair(xs: list[int]) -> Pair:
    return Pair(min(xs), max(xs))


@step
def square(x: int) -> int:
    return x * x


@step
def add(a: int, b: int = 0) -> int:
    return a + b


@step
def total(values: list[int]) -> int:
    return sum(values)


@step
def shout(text: str) -> str:
    return text.upper()


@pipeline
def wired(n: int = 4, offset: int = 1):
    xs = numbers(n)
    p = pair(xs)
    squares = square.map(xs)
    t = total(squares)
    with when(p.high >= offset):
        add(t, offset)
    add(p.low, 2)
    return {"total": t, "low": p.low}


def test_steps_called_outside_a_pipeline_are_plain_functions() -> None:
    assert square(4) == 16
    assert pair([3, 1, 2]) == Pair(1, 3)
    assert square.map([1, 2, 3]) == [1, 4, 9]
    assert add.map([1, 2], unmapped(10)) == [11, 12]


def test_compile_records_tasks_bindings_and_options() -> None:
    spec = wired.compile()
    names = [t.name for t in spec.tasks]
    assert names == ["numbers", "bounds", "square", "total", "add", "add-2"]
    bounds = spec.task("bounds")
    assert bounds.multi_output and [o.name for o in bounds.outputs] == ["low", "high"]
    assert bounds.resources == Resources(cpus=2, memory=512 * 2**20, gpus=1, custom={"license": 1})
    assert (bounds.retry.retries, bounds.retry.delay, bounds.timeout) == (3, 0.5, 60)
    assert (bounds.cache.enabled, bounds.cache.version, bounds.priority) == (False, "v2", 5)
    assert spec.task("square").map_over == ["x"]
    assert spec.task("total").inputs["values"] == TaskInput(task="square", output="output")
    conditional = spec.task("add")
    assert conditional.when[0].describe() == "bounds.high >= params.offset"
    assert conditional.inputs["b"] == ParamInput(param="offset")
    assert spec.task("add-2").inputs["b"] == ConstInput(value=2) and not spec.task("add-2").when
    assert spec.outputs == {"total": TaskInput(task="total"), "low": TaskInput(task="bounds", output="low")}
    assert [(p.name, p.type, p.default) for p in spec.params] == [("n", "int", 4), ("offset", "int", 1)]


def test_spec_round_trips_through_yaml() -> None:
    spec = wired.compile()
    again = PipelineSpec.model_validate(yaml.safe_load(dump_spec(spec)))
    assert again == spec
    assert PipelineSpec.model_validate_json(spec.model_dump_json()) == spec


def test_two_pipelines_in_one_module_do_not_share_state() -> None:
    @pipeline
    def one():
        return square(2)

    @pipeline
    def two():
        return shout("x")

    assert [t.name for t in one.compile().tasks] == ["square"]
    assert [t.name for t in two.compile().tasks] == ["shout"]


def test_type_mismatch_names_both_ends() -> None:
    @pipeline
    def bad():
        return shout(square(3))

    with pytest.raises(SpecError, match=r"square\.output gives int but shout\.text expects str"):
        bad.compile()


def test_mapped_element_types_are_checked() -> None:
    @pipeline
    def bad():
        return shout.map(numbers(3))

    with pytest.raises(SpecError, match=r"shout\.text expects str"):
        bad.compile()


def test_missing_input_and_unknown_argument_are_named() -> None:
    @pipeline
    def missing():
        return add()  # type: ignore[call-arg]

    with pytest.raises(SpecError, match="missing a required argument: 'a'"):
        missing.compile()


def test_python_if_on_an_output_explains_when() -> None:
    @pipeline
    def branchy():
        if square(2):
            shout("x")

    with pytest.raises(SpecError, match="use `with when"):
        branchy.compile()


def test_non_json_constant_is_refused() -> None:
    @pipeline
    def odd():
        return total(object())  # type: ignore[arg-type]

    with pytest.raises(SpecError, match="cannot hold as a constant"):
        odd.compile()


def test_multi_output_needs_a_field() -> None:
    @pipeline
    def ambiguous():
        return square(pair(numbers(3)))  # type: ignore[arg-type]

    with pytest.raises(SpecError, match="several outputs"):
        ambiguous.compile()


def test_cycle_in_a_yaml_spec_is_named() -> None:
    data: dict[str, Any] = wired.compile().model_dump(mode="json")
    by_name = {t["name"]: t for t in data["tasks"]}
    by_name["numbers"]["inputs"]["n"] = {"kind": "task", "task": "total", "output": "output"}
    spec = PipelineSpec.model_validate(data)
    with pytest.raises(CycleError) as err:
        validate_spec(spec)
    assert str(err.value) == "pipeline has a cycle: numbers -> square -> total -> numbers"


def test_unknown_references_in_a_spec_are_named() -> None:
    data: dict[str, Any] = wired.compile().model_dump(mode="json")
    data["tasks"][1]["inputs"]["xs"] = {"kind": "task", "task": "nope", "output": "output"}
    with pytest.raises(SpecError, match="refers to task 'nope', which does not exist"):
        validate_spec(PipelineSpec.model_validate(data))
    data = wired.compile().model_dump(mode="json")
    data["tasks"][3]["inputs"]["values"]["output"] = "missing"
    with pytest.raises(SpecError, match="output 'missing' of task 'square'"):
        validate_spec(PipelineSpec.model_validate(data))


@pytest.mark.parametrize(("options", "message"), [
    ({"timeout": -1}, "timeout must be > 0"),
    ({"retries": -1}, "greater than or equal to 0"),
])
def test_bad_step_options_are_spec_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        step(**options)(square.fn)


@pytest.mark.parametrize(("text", "expected"), [("512Mi", 512 * 2**20), ("2G", 2 * 10**9), ("1.5Gi", 3 * 2**29),
                                                (1024, 1024)])
def test_memory_sizes(text: str | int, expected: int) -> None:
    assert Resources(memory=text).memory == expected


def test_bad_memory_size_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"write e\.g\. '512Mi'"):
        Resources(memory="lots")
