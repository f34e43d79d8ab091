"""A parameter's default is a value of its declared type: a run given no value passes the default to its steps
as it is, so a spec edited by hand (or a pipeline) whose default does not fit is refused before anything runs."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from skyloop import PipelineSpec, SpecError, pipeline, step
from skyloop.pipelines.validate import validate_spec


@step
def number(n: int) -> int:
    return n


def spec(type_: str, default: Any) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "p", "params": [{"name": "n", "type": type_, "default": default}],
        "tasks": [{"name": "a", "step": {"module": "m", "qualname": "f"},
                   "inputs": {"n": {"kind": "param", "param": "n"}}}],
    })


@pytest.mark.parametrize(("type_", "default", "message"), [
    ("int", "abc", "parameter 'n' is declared int but its default is 'abc' (Input should be a valid integer"),
    ("list[int]", ["a"], "parameter 'n' is declared list[int] but its default is ['a']"),
    ("Literal['a', 'b']", "c", "parameter 'n' is declared Literal['a', 'b'] but its default is 'c'"),
])
def test_a_default_that_does_not_fit_its_type_is_refused(type_: str, default: Any, message: str) -> None:
    with pytest.raises(SpecError) as err:
        validate_spec(spec(type_, default))
    assert message in str(err.value) and "fix the default or the type" in str(err.value)


@pytest.mark.parametrize(("type_", "default"), [
    ("int", None),                           # `n: int = None`: sloppy, common, and not what this checks
    ("float", 1),                            # an int is a float
    ("list[int]", [1, 2]),
    ("pandas.core.frame.DataFrame", "x"),    # a type the spec cannot name back: trusted
    ("Any", object()),
])
def test_defaults_that_fit_or_cannot_be_checked_pass(type_: str, default: Any) -> None:
    validate_spec(spec(type_, default))


def test_a_pipeline_whose_default_does_not_fit_does_not_compile() -> None:
    @pipeline
    def choose(mode: Literal["a", "b"] = "c"):  # type: ignore[assignment]
        return number(1)

    with pytest.raises(SpecError, match="parameter 'mode' is declared Literal"):
        choose.compile()
