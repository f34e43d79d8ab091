"""Leases between processes that drive runs: a process held up past its lease writes nothing more there,
an agent stopped by the user hands its runs back, and attempts lost with their orchestrator cost no retry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests_support import agent_env, calls_made, pause_between_writes, reap, until

from skyloop import Settings
from skyloop.store.models import RunRow, StepRunRow
from skyloop.store.workspace import Workspace

STEPS = '''
import os
import time
from skyloop import pipeline, step

def note(name: str) -> None:
    with open(os.environ["CALLS"], "a") as fh:
        fh.write(f"{name} {os.getpid()}\\n")

@step(cache=False)
def first(x: int) -> int:
    note("first")
    return x + 1

@step(cache=False, retries=1, retry_delay=0)
def slow(x: int) -> int:
    note("slow")
    time.sleep(float(os.environ.get("SLOW", "2")))
    return x * 10

@step(cache=False)
def last(x: int) -> int:
    note("last")
    return x + 5

@pipeline
def chain(x: int = 1):
    return last(slow(first(x)))
'''








def _attempts(settings: Settings) -> tuple[list[tuple[str, str]], list[tuple[str, int, str]]]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            runs = [(r.status, r.error or "") for r in session.query(RunRow)]
            rows = [(r.task, r.attempt, r.state) for r in session.query(StepRunRow).order_by(StepRunRow.created_at)]
        return runs, rows
    finally:
        ws.close()




@pytest.mark.integration
def test_a_process_held_up_past_its_lease_writes_and_launches_nothing_more(settings: Settings,
                                                                          tmp_path: Path) -> None:
    (tmp_path / "leased.py").write_text(STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    old = subprocess.Popen([sys.executable, "-m", "skyloop", "run", "leased.py:chain"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent: subprocess.Popen[str] | None = None
    try:
        until(lambda: "slow" in calls_made(calls))
        pause_between_writes(old.pid, settings.home)  # held up (a long pause, a suspended laptop) while `slow` runs
        time.sleep(2.6)  # its lease runs out
        agent = subprocess.Popen([sys.executable, "-m", "skyloop", "agent", "--once"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        until(lambda: calls_made(calls).count("slow") == 2)  # the agent adopted the run and runs `slow` again
        os.kill(old.pid, signal.SIGCONT)  # the old process wakes with its own `slow` finished
        out, _ = old.communicate(timeout=60)
        agent_out, _ = agent.communicate(timeout=60)
    finally:
        reap(old, *([agent] if agent else []))
    assert old.returncode == 4, out  # a Conflict: the run goes on elsewhere
    assert "was adopted by another process" in out
    assert agent.returncode == 0, agent_out
    runs, rows = _attempts(settings)
    assert runs == [("SUCCEEDED", "")]
    assert rows == [("first", 1, "SUCCEEDED"), ("slow", 1, "CRASHED"), ("slow", 2, "SUCCEEDED"),
                    ("last", 1, "SUCCEEDED")]
    assert calls_made(calls).count("last") == 1  # launched by the agent only


@pytest.mark.integration
def test_an_agent_stopped_with_ctrl_c_hands_its_runs_back(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "leased.py").write_text(STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls, SLOW="30")
    subprocess.run([sys.executable, "-m", "skyloop", "submit", "leased.py:chain"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    # As a terminal's foreground job starts it: where the tests themselves run in the background, SIGINT is
    # ignored (SIG_IGN), which a child inherits and, rightly, keeps.
    foreground = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  "sys.argv = ['skyloop', 'agent']; runpy.run_module('skyloop', run_name='__main__', alter_sys=True)")
    agent = subprocess.Popen([sys.executable, "-c", foreground], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: "slow" in calls_made(calls))
        agent.send_signal(signal.SIGINT)
        out, _ = agent.communicate(timeout=30)
    finally:
        reap(agent)
    assert agent.returncode == 130, out
    runs, rows = _attempts(settings)
    assert runs == [("RUNNING", "")]  # not FAILED: back to the queue
    assert rows[-1] == ("slow", 1, "CANCELLED")
    again = subprocess.run([sys.executable, "-m", "skyloop", "agent", "--once"], cwd=tmp_path,
                           env=env | {"SLOW": "0"}, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _attempts(settings)[0] == [("SUCCEEDED", "")]


FLAKY = '''
import os
import time
from pathlib import Path
from skyloop import pipeline, step

@step(cache=False, retries=1, retry_delay=0)
def flaky(x: int) -> int:
    calls = Path(os.environ["CALLS"])
    n = len(calls.read_text().split()) + 1 if calls.exists() else 1
    calls.write_text(calls.read_text() + " x" if calls.exists() else "x")
    if n == 1:
        time.sleep(60)  # its orchestrator is killed meanwhile
    if n == 2:
        raise RuntimeError("a real failure")
    return x

@pipeline
def once(x: int = 1):
    return flaky(x)
'''


@pytest.mark.integration
def test_an_attempt_lost_with_its_orchestrator_spends_no_retry(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    first = subprocess.Popen([sys.executable, "-m", "skyloop", "run", "flaky.py:once", "--backend", "inline"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: calls.exists())
        first.kill()  # the orchestrator dies with attempt 1 running
    finally:
        reap(first)
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            (run_id,) = [r.id for r in session.query(RunRow)]
    finally:
        ws.close()
    again = subprocess.run([sys.executable, "-m", "skyloop", "run", "--resume", run_id, "--backend", "inline"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    runs, rows = _attempts(settings)
    assert runs == [("SUCCEEDED", "")]
    # Attempt 1 was the orchestrator's loss, not the step's: the one retry still covers attempt 2's failure.
    assert rows == [("flaky", 1, "CRASHED"), ("flaky", 2, "FAILED"), ("flaky", 3, "SUCCEEDED")]
