"""Bad input: one line naming the problem, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
from pathlib import Path

import pytest
from tests_support import write

GOOD = '''
from typing import Literal

from skyloop import pipeline, step, unmapped

@step
def number(n: int) -> int:
    return n

@step
def text(s: str) -> str:
    return s

@pipeline
def fine(n: int = 1):
    return number(n)

@pipeline
def mismatched(n: int = 1):
    return text(number(n))

@pipeline
def missing():
    return number()

@step
def floats(n: int) -> list[float]:
    return [1.0] * n

@step
def words(xs: list[str]) -> str:
    return " ".join(xs)

@pipeline
def lists(n: int = 1):
    return words(floats(n))

@pipeline
def choose(mode: Literal["a", "b"] = "a"):
    return text(mode)

@pipeline
def fan_const():
    return number.map(5)
'''

NUMPY_CONDITION = '''
import numpy as np
from skyloop import pipeline, step, when

@step
def number(n: int) -> int:
    return n

@pipeline
def npcond(n: int = 1):
    t = number(n)
    with when(t >= np.int64(0)):
        number(2)
    return t
'''

CYCLIC = '''
api_version: skyloop/v1
kind: Pipeline
name: loop
tasks:
  - name: a
    step: {module: steps.py, qualname: number}
    inputs: {n: {kind: task, task: b, output: output}}
  - name: b
    step: {module: steps.py, qualname: number}
    inputs: {n: {kind: task, task: a, output: output}}
'''

UNKNOWN_IMPORT = '''
api_version: skyloop/v1
kind: Pipeline
name: lost
tasks:
  - name: a
    step: {module: no_such_package.steps, qualname: number}
    inputs: {n: {kind: const, value: 1}}
'''

BAD_FIELD = '''
api_version: skyloop/v1
kind: Pipeline
name: bad
tasks:
  - name: a
    step: {module: steps.py, qualname: number}
    timeout: -5
'''

RELATIVE_STEP = '''
api_version: skyloop/v1
kind: Pipeline
name: rel
tasks:
  - name: a
    step: {module: "..", qualname: number}
    inputs: {n: {kind: const, value: 1}}
'''

BAD_DEFAULT = '''
api_version: skyloop/v1
kind: Pipeline
name: defaults
params:
  - {name: n, type: int, default: abc}
tasks:
  - name: a
    step: {module: steps.py, qualname: number}
    inputs: {n: {kind: param, param: n}}
'''

TWICE = '''
api_version: skyloop/v1
kind: Pipeline
name: twice
tasks:
  - name: a
    step: {module: steps.py, qualname: number}
    inputs: {n: {kind: const, value: 1}}
    inputs: {n: {kind: const, value: 2}}
'''


@pytest.mark.integration
@pytest.mark.parametrize(("args", "files", "message"), [
    (["run", "loop.yaml"], {"loop.yaml": CYCLIC}, "pipeline has a cycle: a -> b -> a"),
    (["run", "lost.yaml"], {"lost.yaml": UNKNOWN_IMPORT}, "cannot import 'no_such_package.steps'"),
    (["run", "bad.yaml"], {"bad.yaml": BAD_FIELD}, "tasks.0.timeout: Input should be greater than 0"),
    (["run", "steps.py:fine", "-p", "n=abc"], {}, "parameter 'n' expects int, got 'abc'"),
    (["run", "steps.py:fine", "-p", "m=1"], {}, "has no parameter 'm'"),
    (["run", "steps.py:fine", "-p", "n=NaN"], {}, "parameter 'n': NaN is not a value a run can store"),
    (["run", "enc.py:fine"], {"enc.py": "# -*- coding: klingon -*-\n"},
     "cannot load 'enc.py': it is not Python source in UTF-8"),
    (["run", "..:fine"], {}, "cannot import module '..' for pipeline '..:fine'"),
    (["submit", "steps.py:fine", "--priority", "99999999999999999999"], {}, "priority must be between"),
    (["serve", "models:/iris@champion", "--name", "bad name"], {}, "invalid --name: name: 'bad name' does not match"),
    (["serve", "models:/iris@champion", "--log-level", "loud"], {}, "--log-level 'loud': give one of"),
    (["deploy", "controller", "--parent-pid", "1"], {}, "--parent-pid says whose death stops the controller"),
    (["run", "steps.py:mismatched"], {}, "number.output gives int but text.s expects str"),
    (["run", "steps.py:missing"], {}, "missing a required argument: 'n'"),
    (["run", "steps.py:lists"], {}, "floats.output gives list[float] but words.xs expects list[str]"),
    (["run", "steps.py:choose", "-p", "mode=zzz"], {}, "parameter 'mode' expects Literal['a', 'b'], got 'zzz'"),
    (["run", "steps.py:fan_const"], {}, "number.n is mapped over, but the constant 5 gives int, not a list"),
    (["run", "size.py:p"], {"size.py": "from skyloop import Resources, step\n"
                                       "@step(resources=Resources(memory='5Gbb'))\ndef f() -> int:\n    return 1\n"},
     "cannot load 'size.py': invalid Resources: memory: memory '5Gbb' is not a size"),
    (["run", "np.py:npcond"], {"np.py": NUMPY_CONDITION},
     "the value compared with number.output in when(...) is a numpy int64"),
    (["run", "named.py:p"], {"named.py": "from skyloop import step\n@step(name='my step')\ndef f() -> int:\n"
                                         "    return 1\n"}, "@step 'my step': a step name must start with a letter"),
    (["run", "pool.py:p"], {"pool.py": "from skyloop import step\n@step(pool='gpu pool')\ndef f() -> int:\n"
                                       "    return 1\n"}, "pool 'gpu pool' is not a valid pool name"),
    (["run", "plname.py:p"], {"plname.py": "from skyloop import pipeline\n@pipeline(name='my pipeline')\n"
                                           "def p():\n    pass\n"}, "a pipeline name must start with a letter"),
    (["run", "steps.py:nothing"], {}, "defines no 'nothing'"),
    (["run", "nofile.py:fine"], {}, "does not exist"),
    (["run", "broken.py:fine"], {"broken.py": "def fine(:\n"}, "cannot load 'broken.py': SyntaxError"),
    (["submit", "broken.py:fine"], {"broken.py": "import no_such_module_here\n"},
     "cannot load 'broken.py': ModuleNotFoundError"),
    (["runs", "show", "feedbeef00"], {}, "no run with id 'feedbeef00'"),
    (["run", "steps.py:fine", "--backend", "warp"], {}, "unknown backend 'warp'"),
    (["submit", "steps.py:fine", "--backend", "warp"], {}, "unknown backend 'warp'"),
    (["submit", "steps.py:fine", "--weight", "0"], {}, "weight must be a positive number"),
    (["run", "steps.py:fine", "--max-cpus", "-1"], {}, "--max-cpus: Input should be greater than 0"),
    (["run", "steps.py:fine", "--max-gpus", "-2"], {}, "--max-gpus: Input should be greater than or equal to 0"),
    (["run", "steps.py:fine", "--max-memory", "lots"], {}, "--max-memory: memory 'lots' is not a size"),
    (["agent", "--once", "--max-memory", "lots"], {}, "--max-memory: memory 'lots' is not a size"),
    (["--home", "taken", "run", "steps.py:fine"], {"taken": "a file"}, "cannot use"),
    (["run", "empty.yaml"], {"empty.yaml": "api_version: skyloop/v1\nkind: Pipeline\nname: empty\ntasks: []\n"},
     "tasks: List should have at least 1 item"),
    (["runs", "list", "--status", "BOGUS"], {}, "unknown run status 'BOGUS'; choose one of QUEUED, RUNNING"),
    (["pipeline", "graph", "steps.py:fine", "-o", "g.xyz"], {}, "cannot tell what to write to g.xyz"),
    (["run", "rel.yaml"], {"rel.yaml": RELATIVE_STEP}, "tasks.0.step: module '..' is neither a file nor a module"),
    (["run", "defaults.yaml"], {"defaults.yaml": BAD_DEFAULT},
     "parameter 'n' is declared int but its default is 'abc'"),
    (["run", "twice.yaml"], {"twice.yaml": TWICE}, "key 'inputs' appears twice in one mapping"),
    (["run", "bad.yaml"], {"bad.yaml": BAD_FIELD.replace("timeout: -5", "retries: 2")},
     "tasks.0.retries: unknown field 'retries'; did you mean 'retry'?"),
    (["pipeline", "compile", "steps.py:fine", "-o", "."], {}, "cannot write '.': it is a folder"),
    (["pipeline", "compile", "steps.py:fine", "-o", "steps.py/spec.yaml"], {}, "cannot write 'steps.py/spec.yaml'"),
    (["pipeline", "graph", "steps.py:fine", "-o", "steps.py/g.dot"], {}, "cannot write 'steps.py/g.dot'"),
    (["artifacts", "gc", "--older-than", "99999999999d"], {}, "reaches back before the year 1"),
    (["artifacts", "gc", "--older-than", "999999999d", "--dry-run"], {}, "reaches back before the year 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path: Path, home: Path, args: list[str],
                                                  files: dict[str, str], message: str) -> None:
    write(tmp_path / "steps.py", GOOD)
    for name, text in files.items():
        write(tmp_path / name, text)
    result = cli(*args)
    assert result.returncode not in (0, 1, 70), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    db = home / "skyloop.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from runs").fetchone() == (0,)
            assert conn.execute("select count(*) from step_runs").fetchone() == (0,)
            assert conn.execute("select count(*) from artifacts").fetchone() == (0,)
    blobs = [p for p in (home / "artifacts").rglob("*") if p.is_file()] if (home / "artifacts").exists() else []
    assert blobs == []


FAILING = '''
from skyloop import pipeline, step

@step
def boom() -> int:
    raise ValueError("no luck")

@pipeline
def failing():
    return boom()
'''


def test_a_failed_run_exits_with_the_step_failed_code(cli, tmp_path: Path) -> None:
    write(tmp_path / "fail.py", FAILING)
    for extra in ([], ["--json"]):
        result = cli("run", "fail.py:failing", "--backend", "inline", *extra)
        assert result.returncode == 5, result.stdout + result.stderr


BRACKETS = '''
from skyloop import pipeline, step, when

@step
def flag(s: str) -> str:
    return s

@step
def boom(s: str) -> int:
    raise ValueError("bad row [/data] in [bold]input[/bold]")

@pipeline
def brackets(s: str = "[/x]"):
    f = flag(s)
    with when(f == "[/x]"):
        boom(s)
'''


def test_error_text_with_brackets_is_printed_verbatim(cli, tmp_path: Path) -> None:
    write(tmp_path / "brackets.py", BRACKETS)
    error = "ValueError: bad row [/data] in [bold]input[/bold]"
    ran = cli("run", "brackets.py:brackets", "--backend", "inline")
    assert ran.returncode == 5, ran.stdout + ran.stderr
    assert error in ran.stdout + ran.stderr and "Traceback" not in ran.stdout + ran.stderr
    run_id = json.loads(cli("runs", "list", "--json").stdout)[0]["id"]
    shown = cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert error in shown.stdout and "Traceback" not in shown.stdout + shown.stderr
    graph = cli("pipeline", "graph", "brackets.py:brackets")
    assert graph.returncode == 0, graph.stderr
    assert "boom | when flag.output == '[/x]'" in graph.stdout
    wrote = cli("pipeline", "graph", "brackets.py:brackets", "-o", "g.txt")
    assert wrote.returncode == 0, wrote.stderr
    assert "boom | when flag.output == '[/x]'" in (tmp_path / "g.txt").read_text()


def test_a_queued_run_whose_file_stopped_loading_fails_alone(cli, tmp_path: Path, home: Path) -> None:
    write(tmp_path / "steps.py", GOOD)
    write(tmp_path / "edited.py", GOOD)
    broken = cli("submit", "edited.py:fine").stdout.strip()
    (tmp_path / "edited.py").write_text("def fine(:\n")  # edited into a syntax error while it waited
    fine = cli("submit", "steps.py:fine", "-p", "n=2").stdout.strip()
    agent = cli("agent", "--once", "--backend", "inline")
    assert agent.returncode == 0, agent.stderr
    with sqlite3.connect(home / "skyloop.db") as conn:
        status = dict(conn.execute("select id, status from runs").fetchall())
        error = conn.execute("select error from runs where id = ?", (broken,)).fetchone()[0]
    assert status == {broken: "FAILED", fine: "SUCCEEDED"}
    assert "cannot load" in error and "SyntaxError" in error


def test_an_agent_must_drive_at_least_one_run(cli) -> None:
    result = cli("agent", "--once", "--max-runs", "0")
    assert result.returncode == 2 and "--max-runs" in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_run_row_is_named_and_hides_no_other_run(cli, tmp_path: Path, home: Path) -> None:
    write(tmp_path / "steps.py", GOOD)
    ids = [cli("submit", "steps.py:fine", "-p", f"n={n}").stdout.strip() for n in (1, 2)]
    with sqlite3.connect(home / "skyloop.db") as conn:  # one row's spec is no longer JSON
        conn.execute("update runs set spec = '{\"tasks\": [' where id = ?", (ids[0],))
    listed = cli("runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == sorted(ids)
    shown = cli("runs", "show", ids[0])
    assert shown.returncode == 6 and "Traceback" not in shown.stderr, shown.stderr
    assert f"run {ids[0][:12]}" in shown.stderr and "damaged" in shown.stderr
    assert cli("runs", "show", ids[1]).returncode == 0


def test_an_unknown_schema_revision_is_named(cli, tmp_path: Path, home: Path) -> None:
    write(tmp_path / "steps.py", GOOD)
    assert cli("submit", "steps.py:fine").returncode == 0
    with sqlite3.connect(home / "skyloop.db") as conn:  # as a newer skyloop would leave it
        conn.execute("update alembic_version set version_num = '0999'")
    result = cli("runs", "list")
    assert result.returncode == 6 and "Traceback" not in result.stderr, result.stderr
    assert "schema revision '0999'" in result.stderr and "newer skyloop" in result.stderr
    with sqlite3.connect(home / "skyloop.db") as conn:  # left as it was
        assert conn.execute("select version_num from alembic_version").fetchone() == ("0999",)


@pytest.mark.skipif(shutil.which("dot") is not None, reason="this machine has Graphviz: the picture is drawn")
def test_a_picture_without_graphviz_says_so_and_writes_no_file(cli, tmp_path: Path) -> None:
    write(tmp_path / "steps.py", GOOD)
    result = cli("pipeline", "graph", "steps.py:fine", "-o", "g.jpg")
    assert result.returncode == 2 and "Graphviz" in result.stderr, result.stderr
    assert not (tmp_path / "g.jpg").exists()


def test_graph_output_takes_its_format_from_the_suffix(cli, tmp_path: Path) -> None:
    write(tmp_path / "steps.py", GOOD)
    for name, start in (("g.mmd", "flowchart"), ("g.dot", "digraph"), ("new/folder/g.txt", "fine")):
        result = cli("pipeline", "graph", "steps.py:fine", "-o", name)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name).read_text().lstrip().startswith(start), name
    assert "number" in (tmp_path / "new/folder/g.txt").read_text()  # missing folders made, as `compile -o` does


def test_debug_shows_the_traceback(cli, tmp_path: Path) -> None:
    write(tmp_path / "steps.py", GOOD)
    result = cli("--debug", "run", "steps.py:fine", "-p", "n=abc")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_write_helper_dedents(tmp_path: Path) -> None:
    write(tmp_path / "x.txt", "\n    a\n    b\n")
    assert (tmp_path / "x.txt").read_text() == textwrap.dedent("a\nb\n")


BIG = """
from skyloop import Resources, pipeline, step

@step(resources=Resources(memory="1Gi"))
def big() -> int:
    return 1

@pipeline
def p():
    return big()
"""


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("SKYLOOP_EXECUTION__MAX_CPUS", "bogus", "invalid settings: SKYLOOP_EXECUTION__MAX_CPUS: Input should be a "
                                             "valid number"),
    ("SKYLOOP_EXECUTION__MAX_MEMORY", "lots", "invalid settings: SKYLOOP_EXECUTION__MAX_MEMORY: memory 'lots' is "
                                              "not a size"),
    ("SKYLOOP_EXECUTION__POOLS", "{gpu", "SKYLOOP_EXECUTION__POOLS: '{gpu' is not JSON"),
    ("SKYLOOP_EXECUTION__RESOURCES", "lic", "SKYLOOP_EXECUTION__RESOURCES: 'lic' is not JSON"),  # was named POOLS
    ("SKYLOOP_EXECUTION__MAX_WORKERS", "0", "SKYLOOP_EXECUTION__MAX_WORKERS: Input should be greater than or equal "
                                            "to 1"),
    ("SKYLOOP_EXECUTION__POOLS", '{"gpu": 0}', "SKYLOOP_EXECUTION__POOLS__GPU: Input should be greater than or "
                                              "equal to 1"),
    # Out of range: a negative margin killed every step with a memory request; NaN was an internal error.
    ("SKYLOOP_EXECUTION__MEMORY_MARGIN", "-1", "SKYLOOP_EXECUTION__MEMORY_MARGIN: Input should be greater than or "
                                               "equal to 0"),
    ("SKYLOOP_EXECUTION__DEFAULT_ESTIMATE_SECONDS", "nan", "SKYLOOP_EXECUTION__DEFAULT_ESTIMATE_SECONDS: Input "
                                                           "should be a finite number"),
    ("SKYLOOP_EXECUTION__AGENT_POLL_SECONDS", "0", "Input should be greater than 0"),
    # A home that would put the DB or the artifacts elsewhere: the current folder, a URL's query, fsspec chaining.
    ("SKYLOOP_HOME", "", "SKYLOOP_HOME: is empty: unset it for the default ~/.skyloop, or name a folder"),
    ("SKYLOOP_HOME", "/tmp/a?b=1", "SKYLOOP_HOME: '/tmp/a?b=1' holds '?', which would be read as a URL's query"),
    ("SKYLOOP_HOME", "/tmp/a::b", "holds '::', which would be read as fsspec's URL chaining"),
])
def test_a_bad_setting_in_the_environment_is_named_in_one_line(cli_env: dict[str, str], tmp_path: Path, variable: str,
                                                              value: str, message: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "skyloop", "runs", "list"], capture_output=True, text=True,
                            env=cli_env | {variable: value}, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_home_with_a_tilde_is_the_users_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # As written in .env files and systemd units, where no shell expands it: not a folder named `~` here.
    from skyloop.config import Settings

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SKYLOOP_HOME", "~/sky")
    settings = Settings.load()
    assert settings.home == tmp_path / "sky"
    assert settings.resolved_db_url == f"sqlite:///{tmp_path / 'sky' / 'skyloop.db'}"


@pytest.mark.integration
def test_memory_settings_take_sizes_like_the_option(cli_env: dict[str, str], cli, tmp_path: Path) -> None:
    import subprocess
    import sys

    write(tmp_path / "big.py", BIG)
    result = subprocess.run([sys.executable, "-m", "skyloop", "run", "big.py:p"], capture_output=True, text=True,
                            env=cli_env | {"SKYLOOP_EXECUTION__MAX_MEMORY": "512Mi"}, cwd=tmp_path, timeout=120)
    assert result.returncode == 5, result.stderr  # the 512Mi offered is read as a size: 1Gi can never fit
    assert "'memory': '512Mi'" in result.stdout + result.stderr
    assert cli("submit", "big.py:p").returncode == 0
    agent = cli("agent", "--once", "--max-memory", "512Mi")  # the agent takes the option too
    assert agent.returncode == 0, agent.stderr
    runs = json.loads(cli("runs", "list", "--json").stdout)
    assert len(runs) == 2 and all(r["status"] == "FAILED" and "'memory': '512Mi'" in r["error"]
                                  and "lower the request or raise --max-memory" in r["error"] for r in runs)
