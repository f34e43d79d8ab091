"""Definitions that cannot work are refused while compiling (or validating a spec), with a SpecError that names
the parameter and the fix: never an internal TypeError, never a failure only once the run has started."""

from __future__ import annotations

import collections.abc
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests_support import write

from skyloop import PipelineSpec, Settings, SpecError, pipeline, run, step, when
from skyloop.execution.api import dump_spec, load_spec
from skyloop.pipelines import types as skytypes
from skyloop.pipelines.refs import ParamRef, Ref
from skyloop.pipelines.types import parse_type, type_str
from skyloop.pipelines.validate import validate_spec


@step
def total(xs: list[float]) -> float:
    return sum(xs)


@step
def one(x: int) -> int:
    return x + 1


@step
def positional(x: int, /) -> int:
    return x + 1


# 1. typing / collections.abc spellings of containers are checked like the builtin ones.

@pipeline
def typing_list(xs: typing.List[float] = [1.0]):  # noqa: B006, UP006 - the spelling under test
    return total(xs)


@pipeline
def typing_sequence(xs: typing.Sequence[float] = [1.0]):
    return total(list_of(xs))


@pipeline
def abc_sequence(xs: collections.abc.Sequence[float] = [1.0]):
    return total(list_of(xs))


@step
def list_of(xs: collections.abc.Sequence[float]) -> list[float]:
    return list(xs)


@pytest.mark.parametrize("made", [typing_list, typing_sequence, abc_sequence])
def test_a_typing_container_parameter_is_checked(made: Any, settings: Settings) -> None:
    assert parse_type(made.compile().params[0].type) is not Any
    with pytest.raises(SpecError, match=r"parameter 'xs' expects .*Sequence\[float\]|parameter 'xs' expects List"):
        run(made, {"xs": "abc"}, backend="inline", settings=settings)
    assert run(made, {"xs": [1, 2]}, backend="inline", settings=settings).outputs == {"output": 3.0}


@pytest.mark.parametrize("tp", [typing.List[float], typing.Dict[str, int], typing.Tuple[int, ...],  # noqa: UP006
                                typing.Set[int], typing.Sequence[float], typing.Mapping[str, int],  # noqa: UP006
                                collections.abc.Sequence[float], collections.abc.Mapping[str, float],
                                typing.Optional[typing.List[int]]])  # noqa: UP045,UP006
def test_typing_spellings_read_back_as_themselves(tp: Any) -> None:
    assert parse_type(type_str(tp)) == tp


def test_a_typing_list_parameter_is_type_checked_against_the_step_it_feeds() -> None:
    @pipeline
    def words(xs: typing.List[str] = ["a"]):  # noqa: B006, UP006
        return total(xs)

    with pytest.raises(SpecError, match=r"parameter 'xs' gives List\[str\] but total.xs expects list\[float\]"):
        words.compile()


# 3. *args, **kwargs and positional-only pipeline parameters.

def _star(*xs: int) -> Any:
    return one(1)


def _stars(**options: int) -> Any:
    return one(1)


def _slash(x: int = 1, /) -> Any:
    return one(x)


@pytest.mark.parametrize(("fn", "shown"), [(_star, "*xs"), (_stars, "**options"), (_slash, "x (positional-only")])
def test_a_pipeline_parameter_that_cannot_be_named_is_refused(fn: Callable[..., Any], shown: str) -> None:
    with pytest.raises(SpecError) as err:
        pipeline(fn).compile()
    assert f"takes parameter {shown}" in str(err.value)
    assert "declare one named parameter per value" in str(err.value)


# 4. Arithmetic on a parameter or a step output in the body.

ARITHMETIC: list[tuple[Callable[[Any], Any], str]] = [
    (lambda r: r + 1, "+ 1"), (lambda r: 1 + r, "1 +"), (lambda r: r - 1, "- 1"), (lambda r: 1 - r, "1 -"),
    (lambda r: r * 2, "* 2"), (lambda r: 2 * r, "2 *"), (lambda r: r / 2, "/ 2"), (lambda r: 2 / r, "2 /"),
    (lambda r: r // 2, "// 2"), (lambda r: 2 // r, "2 //"), (lambda r: r % 2, "% 2"), (lambda r: 2 % r, "2 %"),
    (lambda r: r ** 2, "** 2"), (lambda r: 2 ** r, "2 **"), (lambda r: -r, "-"), (lambda r: abs(r), "abs("),
    (lambda r: range(r), "as an index"), (lambda r: r + r, "another output"),
]


@pytest.mark.parametrize(("compute", "shown"), ARITHMETIC)
def test_arithmetic_on_a_parameter_is_refused(compute: Callable[[Any], Any], shown: str) -> None:
    @pipeline
    def body(n: int = 1):
        return one(compute(n))

    with pytest.raises(SpecError) as err:
        body.compile()
    assert "parameter 'n' has no value while the pipeline is compiled" in str(err.value)
    assert "do arithmetic inside a step" in str(err.value) and shown in str(err.value)


@pytest.mark.parametrize(("compute", "shown"), ARITHMETIC[:4])
def test_arithmetic_on_a_step_output_is_refused(compute: Callable[[Any], Any], shown: str) -> None:
    @pipeline
    def body(n: int = 1):
        return one(compute(one(n)))

    with pytest.raises(SpecError, match=r"step output one\.output has no value .* do arithmetic inside a step"):
        body.compile()


def test_refs_still_compare_into_conditions_and_hash_by_identity(settings: Settings) -> None:
    n = ParamRef("n", int)
    assert {n: 1}[n] == 1 and isinstance(n, Ref)
    assert (n >= 1).op == ">=" and (1 < n).op == ">" and (n == None).value is None  # noqa: E711, SIM300

    @pipeline
    def gated(n: int = 1):
        with when(one(n) >= 2):
            return one(n)

    assert run(gated, {"n": 1}, backend="inline", settings=settings).outputs == {"output": 2}


def test_comparing_with_none_by_order_is_refused_while_compiling() -> None:
    @pipeline
    def body(n: int = 1):
        with when(one(n) >= None):
            return one(n)

    with pytest.raises(SpecError, match=r"one.output >= None` cannot be evaluated"):
        body.compile()


# 5. A step with a positional-only parameter: the worker passes inputs by name.

def test_a_step_with_a_positional_only_parameter_is_refused_at_compile_time() -> None:
    @pipeline
    def body(x: int = 1):
        return positional(x)

    with pytest.raises(SpecError) as err:
        body.compile()
    assert "takes 'x' as a positional-only parameter" in str(err.value) and "remove the `/`" in str(err.value)


# 6. A spec's parameter type that reads as no type.

def spec(type_: str, default: Any = 1) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "p", "params": [{"name": "x", "type": type_, "default": default}],
        "tasks": [{"name": "a", "step": {"module": "m", "qualname": "f"},
                   "inputs": {"x": {"kind": "param", "param": "x"}}}],
    })


@pytest.mark.parametrize(("type_", "problem"), [
    ("lst[int]", "'lst' is no type skyloop knows"),
    ("dict[str, flaot]", "'flaot' is no type skyloop knows"),
    ("Optinal[int]", "'Optinal' is no type skyloop knows"),
    ("list[int", "it is not a type expression"),
])
def test_a_parameter_type_that_does_not_read_is_refused(type_: str, problem: str) -> None:
    with pytest.raises(SpecError) as err:
        validate_spec(spec(type_))
    assert f"parameter 'x' has type {type_!r}, which skyloop cannot read ({problem})" in str(err.value)
    assert "write a type such as int, float, str" in str(err.value)


class Local:
    pass


@pytest.mark.parametrize("tp", [int, list[int], typing.List[int], int | None, typing.Literal["a", 1],  # noqa: UP006
                                typing.Callable[[int], int], typing.TypeVar("T"), object, complex, Local,
                                typing.Annotated[int, "meta"], collections.abc.Iterable[int], typing.Any])
def test_every_type_a_pipeline_compiles_to_reads(tp: Any) -> None:
    assert skytypes.unreadable_type(type_str(tp)) is None
    validate_spec(spec(type_str(tp), None))


# 7. A comparison in a YAML condition with nothing to compare with.

SPEC = '''
name: p
params: [{name: x, type: int, default: 1}]
tasks:
- name: one
  step: {module: steps.py, qualname: one}
  inputs: {x: {kind: param, param: x}}
- name: two
  step: {module: steps.py, qualname: one}
  inputs: {x: {kind: task, task: one}}
  when: [{source: {kind: task, task: one}, op: "OP"EXTRA}]
'''


@pytest.mark.parametrize(("op", "extra", "message"), [
    (">=", "", "op '>=' compares with something: give `value`"),
    ("==", "", "op '==' compares with something: give `value`"),
    ("<", ", value: null", "op '<' cannot compare with None"),
])
def test_a_condition_with_nothing_to_compare_with_is_refused(tmp_path: Path, op: str, extra: str,
                                                             message: str) -> None:
    path = write(tmp_path / "p.yaml", SPEC.replace("OP", op).replace("EXTRA", extra))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "tasks.1.when.0" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("extra", [", value: 2", ", value_param: x", ", value: null"])
def test_a_condition_with_something_to_compare_with_loads(tmp_path: Path, extra: str) -> None:
    op = "==" if extra.endswith("null") else ">="
    assert load_spec(write(tmp_path / "p.yaml", SPEC.replace("OP", op).replace("EXTRA", extra))).tasks[1].when


def test_a_compiled_equality_with_none_round_trips(tmp_path: Path) -> None:
    @pipeline
    def body(n: int = 1):
        with when(one(n) == None):  # noqa: E711
            return one(n)

    text = dump_spec(body.compile())
    assert load_spec(write(tmp_path / "p.yaml", text)).tasks[1].when[0].value is None
