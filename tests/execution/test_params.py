"""Parameters given on the command line (`-p NAME=VALUE`) and checked against the pipeline's declarations."""

from __future__ import annotations

import pytest

from skyloop.errors import SpecError
from skyloop.execution.params import parse_cli_params, resolve_params
from skyloop.spec.pipeline import PipelineSpec


def spec(*params: tuple[str, str]) -> PipelineSpec:
    task = {"name": "a", "step": {"module": "m", "qualname": "f"}}
    return PipelineSpec.model_validate({"name": "p", "tasks": [task], "params": [
        {"name": name, "type": type_} for name, type_ in params]})


@pytest.mark.parametrize("declared", ["str", "Literal['a', '1']"])
def test_a_value_for_a_string_only_parameter_stays_the_string_typed(declared: str) -> None:
    pipeline = spec(("mode", declared))
    values = parse_cli_params(pipeline, ["mode=1"])
    assert values == {"mode": "1"}
    assert resolve_params(pipeline, values) == {"mode": "1"}


def test_other_values_parse_as_json_and_are_checked() -> None:
    pipeline = spec(("n", "int"), ("mode", "Literal['a', 'b']"))
    assert parse_cli_params(pipeline, ["n=3", "mode=a"]) == {"n": 3, "mode": "a"}
    with pytest.raises(SpecError, match="parameter 'mode' expects Literal"):
        resolve_params(pipeline, parse_cli_params(pipeline, ["mode=zzz"]))


def test_a_default_becomes_what_the_same_value_given_becomes() -> None:
    # `rate: float = 2`: before, the step got the int 2 by default and 2.0 with `-p rate=2` (two cache keys).
    pipeline = PipelineSpec.model_validate({"name": "p", "tasks": [{"name": "a", "step": {"module": "m",
                                                                                          "qualname": "f"}}],
                                            "params": [{"name": "rate", "type": "float", "default": 2},
                                                       {"name": "tags", "type": "tuple[str, ...]",
                                                        "default": ["x"]}]})
    defaulted = resolve_params(pipeline, {})
    given = resolve_params(pipeline, parse_cli_params(pipeline, ["rate=2", 'tags=["x"]']))
    assert defaulted == given == {"rate": 2.0, "tags": ("x",)}
    assert type(defaulted["rate"]) is float


@pytest.mark.parametrize("raw", ["nan", "inf", "-Infinity", "NaN"])
def test_a_float_parameter_given_nan_or_infinity_as_text_is_refused(raw: str) -> None:
    # "nan" is no JSON, so it came through as text, which pydantic reads as float('nan'): stored as NaN before.
    pipeline = spec(("x", "float"))
    with pytest.raises(SpecError, match=r"parameter 'x': .* is not a value a run can store"):
        resolve_params(pipeline, parse_cli_params(pipeline, [f"x={raw}"]))
