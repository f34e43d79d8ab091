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


@pytest.mark.parametrize(("declared", "raw", "value"), [
    ("str | None", "2024", "2024"),          # was JSON 2024, then refused: "Input should be a valid string"
    ("str | None", "true", "true"),
    ("Optional[str]", "1.5", "1.5"),
    ("str | None", '"x"', '"x"'),           # as `str` keeps it
    ("str | None", "null", None),
    ("int | str", "3", 3),                   # JSON where it fits
    ("float | str", "[1, 2]", "[1, 2]"),     # the text where it does not
    ("int | None", "2024", 2024),            # no string allowed: unchanged
])
def test_a_parameter_that_may_be_a_string_keeps_its_text_where_json_does_not_fit(declared: str, raw: str,
                                                                                  value: object) -> None:
    pipeline = spec(("tag", declared))
    given = parse_cli_params(pipeline, [f"tag={raw}"])
    assert given == {"tag": value}
    assert resolve_params(pipeline, given) == {"tag": value}


def test_other_parameters_still_refuse_text_that_is_no_json() -> None:
    pipeline = spec(("n", "int | None"))
    with pytest.raises(SpecError, match=r"parameter 'n' expects int \| None, got 'abc'"):
        resolve_params(pipeline, parse_cli_params(pipeline, ["n=abc"]))
