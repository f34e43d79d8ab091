"""Through the `skyloop` command: definitions that cannot work get one line naming the problem and the fix before
anything runs (never `internal error`, exit 70), and a string parameter keeps the text it was given."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests_support import write

DEFS = '''
from skyloop import pipeline, step

@step
def one(x: int) -> int:
    return x + 1

@step
def positional(x: int, /) -> int:
    return x + 1

@step
def echo(tag: str | None) -> str:
    return f"tag={tag!r}"

@pipeline
def optional_tag(tag: str | None = None):
    return echo(tag)

@pipeline
def starred(*xs: int):
    return one(1)

@pipeline
def arithmetic(n: int = 1):
    return one(n + 1)

@pipeline
def slash(x: int = 1):
    return positional(x)
'''

BAD_TYPE = '''
name: p
params: [{name: x, type: "lst[int]", default: 1}]
tasks:
- {name: one, step: {module: defs.py, qualname: one}, inputs: {x: {kind: param, param: x}}}
'''

NO_VALUE = '''
name: p
params: [{name: x, type: int, default: 1}]
tasks:
- {name: one, step: {module: defs.py, qualname: one}, inputs: {x: {kind: param, param: x}}}
- name: two
  step: {module: defs.py, qualname: one}
  inputs: {x: {kind: task, task: one}}
  when: [{source: {kind: task, task: one}, op: ">="}]
'''


@pytest.mark.parametrize("given", ["2024", "true", "abc"])
def test_an_optional_string_parameter_keeps_its_text(cli, tmp_path: Path, given: str) -> None:
    write(tmp_path / "defs.py", DEFS)
    result = cli("run", "defs.py:optional_tag", "--backend", "inline", "-p", f"tag={given}")
    assert result.returncode == 0, result.stderr
    assert f"tag={given!r}" in result.stdout


def test_an_optional_string_parameter_given_null_is_none(cli, tmp_path: Path) -> None:
    write(tmp_path / "defs.py", DEFS)
    result = cli("run", "defs.py:optional_tag", "--backend", "inline", "-p", "tag=null")
    assert result.returncode == 0, result.stderr
    assert "tag=None" in result.stdout


@pytest.mark.parametrize(("args", "files", "message"), [
    (["pipeline", "compile", "defs.py:starred"], {},
     "pipeline 'starred' takes parameter *xs, but pipeline parameters are given by name"),
    (["pipeline", "compile", "defs.py:arithmetic"], {},
     "cannot compute `n + 1`: parameter 'n' has no value while the pipeline is compiled"),
    (["pipeline", "compile", "defs.py:slash"], {},
     "takes 'x' as a positional-only parameter (before `/`), but steps get their inputs by name; remove the `/`"),
    (["pipeline", "validate", "bad_type.yaml"], {"bad_type.yaml": BAD_TYPE},
     "parameter 'x' has type 'lst[int]', which skyloop cannot read ('lst' is no type skyloop knows)"),
    (["pipeline", "validate", "no_value.yaml"], {"no_value.yaml": NO_VALUE},
     "tasks.1.when.0: op '>=' compares with something: give `value`"),
])
def test_a_definition_that_cannot_run_is_refused_in_one_line(cli, tmp_path: Path, args: list[str],
                                                              files: dict[str, str], message: str) -> None:
    write(tmp_path / "defs.py", DEFS)
    for name, text in files.items():
        write(tmp_path / name, text)
    result = cli(*args)
    assert result.returncode not in (0, 1, 70), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
