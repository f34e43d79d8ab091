"""Whole workflows through the real command: compile/run YAML, caching after edits, crash + resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tests_support import write

CHAIN = '''
import time
from skyloop import pipeline, step

@step
def base(n: int) -> int:
    return n + 1

@step
def double(x: int) -> int:
    return x * 2

@step
def side(n: int) -> int:
    return n - 1

@step
def combine(a: int, b: int) -> int:
    return a + b

@pipeline
def chain(n: int = 3):
    return combine(double(base(n)), side(n))
'''

SLOW = '''
import os, time
from pathlib import Path
from skyloop import pipeline, step

@step
def first(marker: str) -> int:
    Path(marker + ".first").open("a").write("x")
    return 1

@step
def second(marker: str, x: int) -> int:
    Path(marker + ".second").open("a").write("x")
    Path(marker + ".second.pid").write_text(str(os.getpid()))
    time.sleep(3)
    return x + 1

@step
def third(marker: str, x: int) -> int:
    Path(marker + ".third").open("a").write("x")
    return x + 1

@pipeline
def slow(marker: str):
    return third(marker, second(marker, first(marker)))
'''


def _states(cli, run_id: str) -> dict[str, str]:
    shown = cli("runs", "show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    return {name: step["state"] for name, step in json.loads(shown.stdout)["steps"].items()}


def _last_run(cli) -> dict[str, object]:
    listed = cli("runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    runs: list[dict[str, object]] = json.loads(listed.stdout)
    return runs[0]


@pytest.mark.integration
def test_compiled_yaml_runs_on_its_own(cli, tmp_path: Path) -> None:
    write(tmp_path / "flow" / "chain.py", CHAIN)
    compiled = cli("pipeline", "compile", "flow/chain.py:chain", "-o", "specs/chain.yaml")
    assert compiled.returncode == 0, compiled.stderr
    text = (tmp_path / "specs" / "chain.yaml").read_text()
    assert "module: ../flow/chain.py" in text  # relative to the spec file, so the pair can move together
    assert cli("pipeline", "validate", "specs/chain.yaml").returncode == 0
    ran = cli("run", "specs/chain.yaml", "-p", "n=5", "--json")
    assert ran.returncode == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert data["status"] == "SUCCEEDED" and data["params"] == {"n": 5}
    assert set(data["steps"]) == {"base", "double", "side", "combine"}


@pytest.mark.integration
def test_editing_one_step_reruns_only_it_and_its_dependents(cli, tmp_path: Path) -> None:
    source = write(tmp_path / "chain.py", CHAIN)
    assert cli("run", "chain.py:chain").returncode == 0
    again = cli("run", "chain.py:chain")
    assert again.returncode == 0
    assert set(_states(cli, str(_last_run(cli)["id"])).values()) == {"CACHED"}
    source.write_text(source.read_text().replace("return x * 2", "return x * 3"))
    edited = cli("run", "chain.py:chain", "--json")
    assert edited.returncode == 0, edited.stderr
    states = {n: s["state"] for n, s in json.loads(edited.stdout)["steps"].items()}
    assert states == {"base": "CACHED", "double": "SUCCEEDED", "side": "CACHED", "combine": "SUCCEEDED"}


@pytest.mark.integration
def test_sigkill_then_resume_finishes_without_rerunning_finished_steps(
        cli, cli_env: dict[str, str], tmp_path: Path, home: Path) -> None:
    write(tmp_path / "slow.py", SLOW)
    marker = str(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "skyloop", "run", "slow.py:slow", "-p", f"marker={marker}"],
                            cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not Path(marker + ".second.pid").exists():
            assert time.monotonic() < deadline, "the second step never started"
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        worker = int(Path(marker + ".second.pid").read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The orphaned worker notices its parent died and exits by itself.
    deadline = time.monotonic() + 10
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"worker {worker} outlived its orchestrator"
        time.sleep(0.1)

    with sqlite3.connect(home / "skyloop.db") as conn:
        run_id, status = conn.execute("select id, status from runs").fetchone()
    assert status == "RUNNING"  # as the killed process left it

    resumed = cli("run", "--resume", run_id[:10], "--json")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["status"] == "SUCCEEDED"
    assert data["steps"]["first"] == {**data["steps"]["first"], "state": "SUCCEEDED", "attempts": 1}
    assert data["steps"]["second"]["attempts"] == 2  # the attempt in flight was lost, then run again
    assert Path(marker + ".first").read_text() == "x"  # finished step not re-run
    assert Path(marker + ".second").read_text() == "xx"
    assert Path(marker + ".third").read_text() == "x"
    with sqlite3.connect(home / "skyloop.db") as conn:
        states = conn.execute("select state from step_runs where task='second' order by attempt").fetchall()
        assert states == [("CRASHED",), ("SUCCEEDED",)]
        assert conn.execute("select count(*) from step_runs where state='RUNNING'").fetchone() == (0,)


@pytest.mark.integration
def test_runs_logs_and_gc_commands(cli, tmp_path: Path) -> None:
    write(tmp_path / "chain.py", CHAIN.replace("return n + 1", "print('base says hi'); return n + 1"))
    assert cli("run", "chain.py:chain", "--backend", "inline").returncode == 0
    run_id = str(_last_run(cli)["id"])
    logs = cli("runs", "logs", run_id, "base")
    assert logs.returncode == 0 and "base says hi" in logs.stdout
    dry = cli("artifacts", "gc", "--older-than", "0s", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["artifacts"] == 4  # n+1, doubled, side, combined: none pinned, run finished
    gone = cli("artifacts", "gc", "--older-than", "0s", "--json")
    assert {k: json.loads(gone.stdout)[k] for k in ("artifacts", "orphans", "orphan_bytes")} == \
        {"artifacts": 4, "orphans": 0, "orphan_bytes": 0}
    rerun = cli("run", "chain.py:chain", "--backend", "inline", "--json")
    assert {s["state"] for s in json.loads(rerun.stdout)["steps"].values()} == {"SUCCEEDED"}
