"""What compiling refuses, and what it must let through: optional types, constants that YAML would change,
bad names, clashing task names, `.map` over something that is not a list."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from skyloop import PipelineSpec, SpecError, pipeline, step, unmapped, when
from skyloop.execution.api import dump_spec, load_spec, load_target
from skyloop.pipelines.pipeline import Pipeline


@step
def maybe(n: int) -> int | None:
    return n if n > 0 else None


@step
def show(x: int | None) -> str:
    return repr(x)


@step
def ident(x: Any) -> Any:
    return x


@step
def score(x: float, scale: float) -> float:
    return x * scale


@step
def total(values: list[float]) -> float:
    return sum(values)


@step
def count(n: int) -> int:
    return n


def test_an_optional_output_feeds_an_optional_input() -> None:
    @pipeline
    def chain(n: int = 1):
        return show(maybe(n))

    assert [t.name for t in chain.compile().tasks] == ["maybe", "show"]


def test_an_optional_parameter_feeds_an_optional_input() -> None:
    @pipeline
    def param_opt(n: int | None = None):
        return show(n)

    assert param_opt.compile().params[0].type == "int | None"


@pytest.mark.parametrize(("value", "message"), [
    ((1, 2), r"argument 'x' of step 'ident' is a tuple.*\(its YAML gives back a list\); pass a list instead"),
    ({1: "a"}, r"argument 'x' of step 'ident' has the key 1 \(int\).*; use string keys"),
    (math.inf, r"argument 'x' of step 'ident' is inf.*JSON has no inf or nan"),
    (math.nan, r"argument 'x' of step 'ident' is nan"),
    ([1, (2, 3)], r"argument 'x' of step 'ident'\[1\] is a tuple"),
    ({"k": [-math.inf]}, r"argument 'x' of step 'ident'\['k'\]\[0\] is -inf"),
    (np.int64(3), r"is a numpy int64.*convert it with int"),
    ({1, 2}, r"is a set.*pass a list instead"),
    (object(), r"is a object, which a pipeline spec cannot hold as a constant"),
])
def test_a_constant_yaml_would_change_is_refused(value: Any, message: str) -> None:
    @pipeline
    def lossy():
        return ident(value)

    with pytest.raises(SpecError, match=message):
        lossy.compile()


@pytest.mark.parametrize("value", [None, True, 3, 2.5, "text", [1, "a", None], {"a": {"b": [1.5, False]}}])
def test_a_constant_that_yaml_keeps_round_trips(value: Any) -> None:
    @pipeline
    def kept():
        return ident(value)

    spec = kept.compile()
    again = PipelineSpec.model_validate(yaml.safe_load(dump_spec(spec)))
    assert again == spec
    assert again.tasks[0].inputs["x"].value == value  # type: ignore[union-attr]


def test_a_parameter_default_yaml_would_change_is_refused() -> None:
    @pipeline
    def tupdefault(t: Any = (1, 2)):
        return ident(t)

    with pytest.raises(SpecError, match=r"the default of parameter 't' of pipeline 'tupdefault' is a tuple.*"
                                        r"pass a list instead"):
        tupdefault.compile()


@pytest.mark.parametrize(("value", "message"), [
    (np.int64(0), r"the value compared with count.output in when\(\.\.\.\) is a numpy int64"),
    (math.inf, r"the value compared with count.output in when\(\.\.\.\) is inf"),
])
def test_a_condition_value_yaml_would_change_is_refused(value: Any, message: str) -> None:
    @pipeline
    def guarded(n: int = 1):
        c = count(n)
        with when(c >= value):
            count(2)
        return c

    with pytest.raises(SpecError, match=message):
        guarded.compile()


@pytest.mark.parametrize(("options", "message"), [
    ({"name": "my step"}, r"@step 'my step': a step name must start with a letter"),
    ({"name": "1st"}, r"@step '1st': a step name must"),
    ({"pool": "gpu pool"}, r"@step 'count': pool 'gpu pool' is not a valid pool name"),
])
def test_a_bad_step_name_or_pool_is_a_spec_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        step(**options)(count.fn)
    with pytest.raises(SpecError, match=message):
        count.with_options(**options)


def test_a_bad_pipeline_name_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"@pipeline 'my pipeline': a pipeline name must start with a letter"):
        pipeline(name="my pipeline")(count.fn)


def test_an_invalid_pipeline_field_is_a_spec_error_naming_it() -> None:
    @pipeline(description=3)  # type: ignore[arg-type]
    def described(n: int = 1):
        return count(n)

    with pytest.raises(SpecError, match=r"invalid pipeline 'described': description: Input should be a valid string"):
        described.compile()


def test_an_invalid_step_field_is_a_spec_error_naming_the_step_and_field() -> None:
    greedy = step(resources={"cpus": -1})(count.fn)  # type: ignore[arg-type]

    @pipeline
    def hungry(n: int = 1):
        return greedy(n)

    with pytest.raises(SpecError, match=r"invalid step 'count' in pipeline 'hungry': resources\.cpus: Input should "
                                        r"be greater than or equal to 0"):
        hungry.compile()


def test_automatic_task_names_skip_names_already_taken() -> None:
    @pipeline
    def clash(n: int = 1):
        y = count(n)
        z = count(y)
        last = count.with_options(name="count-2")(z)
        return count(last)

    assert [t.name for t in clash.compile().tasks] == ["count", "count-2", "count-2-2", "count-3"]

    @pipeline
    def named_first(n: int = 1):
        y = count.with_options(name="count-2")(n)
        return count(count(y))

    assert [t.name for t in named_first.compile().tasks] == ["count-2", "count", "count-3"]


@pytest.mark.parametrize(("body", "message"), [
    ("const", r"score\.x is mapped over, but the constant 5\.0 gives float, not a list"),
    ("param", r"score\.x is mapped over, but parameter 'n' gives int, not a list"),
    ("output", r"score\.x is mapped over, but total\.output gives float, not a list"),
])
def test_map_over_something_that_is_not_a_list_is_refused(body: str, message: str) -> None:
    @pipeline
    def fan(n: int = 3):
        if body == "const":
            return score.map(5.0, unmapped(2.0))
        if body == "param":
            return score.map(n, unmapped(2.0))
        return score.map(total([1.0, 2.0]), unmapped(2.0))

    with pytest.raises(SpecError, match=message + r"; pass a list, or wrap it in unmapped"):
        fan.compile()


def test_map_over_lists_still_compiles() -> None:
    @pipeline
    def fan(xs: list[float] = [1.0, 2.0]):  # noqa: B006 - a default the spec holds, never mutated
        scaled = score.map(xs, unmapped(2.0))
        return total(score.map([1.0, 2.0], unmapped(3.0))), total(scaled)

    assert [t.map_over for t in fan.compile().tasks] == [["x"], ["x"], [], []]


def test_a_loaded_spec_finds_its_source_file_like_its_steps(tmp_path: Path) -> None:
    steps = tmp_path / "code" / "flow.py"
    steps.parent.mkdir()
    steps.write_text("from skyloop import pipeline, step\n\n@step\ndef one(n: int) -> int:\n    return n\n\n"
                     "@pipeline\ndef flow(n: int = 1):\n    return one(n)\n")
    flow = load_target(f"{steps}:flow")
    assert isinstance(flow, Pipeline)
    compiled = flow.compile()
    out = tmp_path / "specs" / "flow.yaml"
    out.parent.mkdir()
    out.write_text(dump_spec(compiled, relative_to=out.parent))
    assert yaml.safe_load(out.read_text())["source"]["module"] == "../code/flow.py"
    back = load_spec(out)
    assert back.source == compiled.source and back == compiled
