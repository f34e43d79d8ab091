"""Agents that lose their runs to another agent (held up past the lease) and come back: they let go of those
runs cleanly, fail nothing, and do not take them back in a way that stalls them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_support import PgCluster, pg_bindir
from tests_support import agent_env, calls_made, pause_between_writes, reap, until

from skyloop import Settings
from skyloop.store.models import Event, RunRow, StepRunRow
from skyloop.store.workspace import Workspace

STEPS = '''
import os
import time
from skyloop import pipeline, step

def note(name: str) -> None:
    with open(os.environ["CALLS"], "a") as fh:
        fh.write(f"{name} {os.getpid()}\\n")

@step(cache=False)
def items(n: int) -> list[int]:
    return list(range(n))

@step(cache=False)
def unit(i: int) -> int:
    note(f"unit{i}")
    time.sleep(float(os.environ.get("UNIT_SECONDS", "1.5")))
    return i * i

@step(cache=False)
def total(xs: list[int]) -> int:
    return sum(xs)

@pipeline
def fan(n: int = 6):
    return total(unit.map(items(n)))
'''








def _run_row(settings: Settings) -> tuple[str, str, str | None]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            (row,) = session.query(RunRow).all()
            return row.id, row.status, row.owner
    finally:
        ws.close()


def _agent(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "skyloop", "agent", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)




@pytest.mark.integration
def test_an_agent_back_from_a_pause_lets_go_of_the_runs_it_lost_without_failing(settings: Settings,
                                                                               tmp_path: Path) -> None:
    """Back from a pause, its first launch finds the run adopted (the fenced flush): it must let go of the
    run's queued steps too, not die with "step(s) wait for resources that will never free up" and fail runs."""
    (tmp_path / "fan.py").write_text(STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    subprocess.run([sys.executable, "-m", "skyloop", "submit", "fan.py:fan"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    first = _agent(tmp_path, env, "--max-cpus", "2", "--once")
    second: subprocess.Popen[str] | None = None
    try:
        until(lambda: len(calls_made(calls)) >= 2)  # two units run, four wait for room
        pause_between_writes(first.pid, settings.home)  # held up past its lease; its two units end meanwhile
        time.sleep(2.5)
        second = _agent(tmp_path, env, "--max-cpus", "2", "--once")
        until(lambda: (_run_row(settings)[2] or "").split(":")[1:2] == [str(second.pid)])  # adopted
        os.kill(first.pid, signal.SIGCONT)  # back with room for two more units of a run it lost
        out, _ = first.communicate(timeout=60)
        second_out, _ = second.communicate(timeout=90)
    finally:
        reap(first, *([second] if second else []))
    assert "will never free up" not in out, out
    assert first.returncode == 0, out
    assert second.returncode == 0, second_out
    run_id, status, _ = _run_row(settings)
    assert status == "SUCCEEDED"
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            kinds = [e.kind for e in session.query(Event).filter(Event.run_id == run_id)]
            ok = [(r.task, r.map_index) for r in session.query(StepRunRow) if r.state == "SUCCEEDED"]
    finally:
        ws.close()
    assert "run.failed" not in kinds  # nobody claimed to have failed it
    assert sorted(ok) == sorted([("items", -1), ("total", -1), *(("unit", i) for i in range(6))])


@pytest.mark.integration
def test_an_agent_takes_back_a_run_it_lost_once_its_adopter_died(settings: Settings, tmp_path: Path) -> None:
    """A run lost to another agent stays adoptable by the first: when the adopter dies too, the first takes it
    back and finishes it (it must not let go of it again and again for having lost it once)."""
    (tmp_path / "fan.py").write_text(STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls, UNIT_SECONDS="1")
    subprocess.run([sys.executable, "-m", "skyloop", "submit", "fan.py:fan", "-p", "n=4"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    first = _agent(tmp_path, env, "--max-cpus", "2")
    second: subprocess.Popen[str] | None = None
    try:
        until(lambda: len(calls_made(calls)) >= 1)
        pause_between_writes(first.pid, settings.home)
        time.sleep(2.5)
        second = _agent(tmp_path, env, "--max-cpus", "2")
        until(lambda: (_run_row(settings)[2] or "").split(":")[1:2] == [str(second.pid)])
        second.kill()  # the adopter dies too; the first agent, back, is the only one left
        second.wait()
        os.kill(first.pid, signal.SIGCONT)
        until(lambda: _run_row(settings)[1] != "RUNNING", timeout=60)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=30)
    finally:
        reap(first, *([second] if second else []))
    assert first.returncode == 0, out
    assert _run_row(settings)[1] == "SUCCEEDED", out


# -- the metadata DB away for a moment --------------------------------------------------------------

@pytest.fixture
def pg_server() -> Iterator[PgCluster]:
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'skyloop[postgres]'")
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql")
    server = PgCluster(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.postgres
def test_an_agent_hands_its_runs_back_when_the_db_restarts_instead_of_failing_them(
        settings: Settings, tmp_path: Path, pg_server: PgCluster) -> None:
    """The DB server restarts under a busy agent (its connections break): the runs are not failed, the agent
    does not die; it hands them back, adopts them again once the DB answers, and finishes them."""
    (tmp_path / "fan.py").write_text(STEPS)
    calls = tmp_path / "calls"
    url = f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"
    settings = settings.model_copy(update={"db_url": url})
    env = agent_env(settings.home, calls, SKYLOOP_DB_URL=url, UNIT_SECONDS="1")
    subprocess.run([sys.executable, "-m", "skyloop", "submit", "fan.py:fan", "-p", "n=8"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    agent = _agent(tmp_path, env, "--max-cpus", "2")
    try:
        until(lambda: len(calls_made(calls)) >= 2)
        pg_server.restart()  # every connection the agent holds breaks
        until(lambda: _run_row(settings)[1] != "RUNNING" or agent.poll() is not None, timeout=90)
        alive = agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
    finally:
        reap(agent)
    assert alive, out
    assert _run_row(settings)[1] == "SUCCEEDED", out
    assert "metadata DB unreachable" in out
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            kinds = [e.kind for e in session.query(Event)]
            running = [r.task for r in session.query(StepRunRow) if r.state == "RUNNING"]
    finally:
        ws.close()
    assert "run.failed" not in kinds
    assert running == []


@pytest.mark.integration
def test_an_agent_back_from_a_pause_goes_on_with_the_runs_it_still_holds(settings: Settings, tmp_path: Path) -> None:
    """Back from a pause, the steps it picks first belong to a run adopted meanwhile (taken back unlaunched): the
    steps of the run it still holds, which waited behind them, launch at the next turn; it must not take them
    for steps that wait for resources that will never free up (and fail that run)."""
    (tmp_path / "fan.py").write_text(STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)

    def submit(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "skyloop", "submit", "fan.py:fan", *args], cwd=tmp_path, env=env,
                             check=True, capture_output=True, text=True).stdout
        return out.split()[-1]

    urgent, other = submit("--priority", "5"), submit()  # the urgent run's units go first
    first = _agent(tmp_path, env, "--max-cpus", "2", "--once")
    resumer: subprocess.Popen[str] | None = None
    try:
        until(lambda: len(calls_made(calls)) >= 2)  # two units of the urgent run; the other run's wait
        pause_between_writes(first.pid, settings.home)
        time.sleep(2.5)
        resumer = subprocess.Popen([sys.executable, "-m", "skyloop", "run", "--resume", urgent], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        until(lambda: _owner(settings, urgent).split(":")[1:2] == [str(resumer.pid)])
        os.kill(first.pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=90)
        resumer_out, _ = resumer.communicate(timeout=90)
    finally:
        reap(first, *([resumer] if resumer else []))
    assert "will never free up" not in out, out
    assert first.returncode == 0, out
    assert resumer.returncode == 0, resumer_out
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            statuses = {r.id: r.status for r in session.query(RunRow)}
    finally:
        ws.close()
    assert statuses == {urgent: "SUCCEEDED", other: "SUCCEEDED"}, out


def _owner(settings: Settings, run_id: str) -> str:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            row = session.get(RunRow, run_id)
            return (row.owner if row else None) or ""
    finally:
        ws.close()
