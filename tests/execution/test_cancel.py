"""`skyloop runs cancel`: a queued run at once, a held one by the process holding it, an orphaned one in place."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select, update
from tests_support import agent_env, calls_made, reap, until

from skyloop import Settings
from skyloop.errors import Conflict
from skyloop.store.db import Database
from skyloop.store.models import Event, RunRow, StepRunRow
from skyloop.store.runs import (
    cancel_requested,
    claim_run,
    create_run,
    get_run,
    release_run,
    request_cancel,
    utcnow,
)
from skyloop.store.workspace import Workspace

STEPS = '''
import os
import time
from skyloop import pipeline, step

@step(cache=False)
def first(x: int) -> int:
    with open(os.environ["CALLS"], "a") as fh:
        fh.write(f"first {os.getpid()}\\n")
    return x + 1

@step(cache=False, retries=3, retry_delay=0)
def slow(x: int) -> int:
    with open(os.environ["CALLS"], "a") as fh:
        fh.write(f"slow {os.getpid()}\\n")
    time.sleep(x)
    return x * 10

@step(cache=False)
def last(x: int) -> int:
    return x + 5

@pipeline
def chain(x: int = 59):  # `slow` sleeps x + 1 seconds
    return last(slow(first(x)))
'''

@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'cancel.db'}")
    yield database
    database.dispose()


OTHER = "otherhost:1:abcdef"
"""An owner on another host: only its lease says whether it lives."""


def new_run(db: Database, run_id: str, owner: str | None) -> None:
    with db.session() as session:
        create_run(session, run_id=run_id, pipeline="p", spec={"name": "p"}, params={}, backend=None, owner=owner,
                   lease_seconds=60)


def test_a_queued_run_is_cancelled_at_once_and_an_ended_one_is_refused(db: Database) -> None:
    new_run(db, "queued", owner=None)
    with db.session() as session:
        assert request_cancel(session, "queued") == ("queued", "CANCELLED")
    with db.session() as session:
        row = get_run(session, "queued")
        assert (row.status, row.ended_at is not None) == ("CANCELLED", True)
        assert "before it started" in (row.error or "")
        with pytest.raises(Conflict, match="already ended CANCELLED; nothing to cancel"):
            request_cancel(session, "queued")


def test_a_held_run_gets_a_request_its_holder_reads_until_the_run_is_adopted_again(db: Database) -> None:
    new_run(db, "held", owner=OTHER)
    with db.session() as session:
        assert request_cancel(session, "held") == ("held", "REQUESTED")
        assert get_run(session, "held").status == "RUNNING"  # its holder ends it
        assert cancel_requested(session, ["held", "other"]) == {"held"}
        release_run(session, "held", OTHER, "CANCELLED", "cancelled")
    with db.session() as session:  # resumed after the cancel: the old request does not cancel it again
        claim_run(session, "held", "me:2:aaaaaa", lease_seconds=60)
        assert cancel_requested(session, ["held"]) == set()


def test_a_running_run_nobody_holds_is_cancelled_in_place_with_its_attempts(db: Database) -> None:
    new_run(db, "orphan", owner=OTHER)
    now = utcnow()
    with db.session() as session:
        session.execute(update(RunRow).where(RunRow.id == "orphan")
                        .values(lease_expires_at=now - timedelta(seconds=5)))
        session.add(StepRunRow(id="s1", run_id="orphan", task="slow", map_index=-1, attempt=1, state="RUNNING",
                               step_ref="m:slow", resources={}, created_at=now, started_at=now))
    with db.session() as session:
        assert request_cancel(session, "orphan") == ("orphan", "CANCELLED")
    with db.session() as session:
        assert get_run(session, "orphan").status == "CANCELLED"
        assert session.get(StepRunRow, "s1").state == "CANCELLED"  # type: ignore[union-attr]


def _states(settings: Settings) -> tuple[dict[str, str], list[tuple[str, str]], list[str]]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            runs = {r.id: r.status for r in session.query(RunRow)}
            steps = [(r.task, r.state) for r in session.query(StepRunRow).order_by(StepRunRow.created_at)]
            kinds = list(session.scalars(select(Event.kind).order_by(Event.id)))
        return runs, steps, kinds
    finally:
        ws.close()


@pytest.mark.integration
def test_a_run_an_agent_holds_is_cancelled_by_it_and_the_agent_goes_on(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "chain.py").write_text(STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    submitted = subprocess.run([sys.executable, "-m", "skyloop", "submit", "chain.py:chain"], cwd=tmp_path, env=env,
                               check=True, capture_output=True, text=True)
    run_id = submitted.stdout.split()[-1]
    agent = subprocess.Popen([sys.executable, "-m", "skyloop", "agent", "--backend", "local"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: "slow" in calls_made(calls))
        step_pid = int(calls.read_text().split()[-1])
        started = time.monotonic()
        cancelled = subprocess.run([sys.executable, "-m", "skyloop", "runs", "cancel", run_id, "--wait", "30"],
                                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        assert "cancel requested" in cancelled.stdout and "ended CANCELLED" in cancelled.stdout
        assert time.monotonic() - started < 15  # within a heartbeat or two, not the step's 60 s
        until(lambda: not psutil.pid_exists(step_pid) or psutil.Process(step_pid).status() == psutil.STATUS_ZOMBIE)
        # The agent goes on: a run queued after it is claimed and finished.
        again = subprocess.run([sys.executable, "-m", "skyloop", "submit", "chain.py:chain", "-p", "x=-1"],
                               cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
        second = again.stdout.split()[-1]
        until(lambda: _states(settings)[0].get(second) in ("SUCCEEDED", "FAILED"), timeout=60)
    finally:
        reap(agent)
    runs, steps, kinds = _states(settings)
    assert runs[run_id] == "CANCELLED" and runs[second] == "SUCCEEDED"
    assert steps.count(("slow", "CANCELLED")) == 1  # not retried, though it has retries left
    assert ("last", "PENDING") not in steps and steps.count(("last", "SUCCEEDED")) == 1  # only the second run's
    assert "run.cancel_requested" in kinds and "run.cancelled" in kinds
    assert calls_made(calls).count("slow") == 2  # one per run: the cancelled attempt was not run again


def _run_stopped(settings: Settings, tmp_path: Path, backend: str, handler: str, signals: list[int]) -> int:
    """`skyloop run chain.py:chain` in a child whose SIGINT/SIGTERM handling `handler` sets, sent `signals` (a
    second apart) once its `slow` step runs; returns its exit code once it has ended, and checks that the run
    ended CANCELLED with no attempt left RUNNING."""
    (tmp_path / "chain.py").write_text(STEPS)
    calls = tmp_path / "calls"
    code = (f"import runpy, signal, sys; {handler}; "
            f"sys.argv = ['skyloop', 'run', 'chain.py:chain', '--backend', '{backend}']; "
            "runpy.run_module('skyloop', run_name='__main__', alter_sys=True)")
    command = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=agent_env(settings.home, calls),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: "slow" in calls_made(calls))
        for index, signum in enumerate(signals):
            if index:
                time.sleep(1)
            command.send_signal(signum)
        out, _ = command.communicate(timeout=30)
    finally:
        reap(command)
    runs, steps, _ = _states(settings)
    assert list(runs.values()) == ["CANCELLED"], (runs, steps, out)
    assert ("slow", "CANCELLED") in steps and not [s for s in steps if s[1] == "RUNNING"], steps
    return command.returncode


@pytest.mark.integration
def test_ctrl_c_pressed_twice_still_ends_the_run_cancelled(settings: Settings, tmp_path: Path) -> None:
    # The first Ctrl-C cancels the attempts and waits (up to 5 s) for their ends; users press it again. That
    # second one broke out of the cleanup: the run stayed RUNNING with its step, then was reaped as FAILED.
    # As a terminal's foreground job starts it (see test_agent_leases); the inline backend runs the step in a
    # thread, which a cancel cannot stop: the wait for its end lasts the whole 5 s.
    foreground = "signal.signal(signal.SIGINT, signal.default_int_handler)"
    assert _run_stopped(settings, tmp_path, "inline", foreground, [signal.SIGINT, signal.SIGINT]) == 130


@pytest.mark.integration
def test_a_run_stopped_by_a_signal_that_raises_system_exit_ends_cancelled(settings: Settings, tmp_path: Path) -> None:
    # Ray's driver turns SIGTERM into SystemExit; that was recorded as "orchestrator error: SystemExit: 1" and
    # the run FAILED. A stop it is, as Ctrl-C: CANCELLED, to be finished with `run --resume`.
    as_ray_does = "signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))"
    assert _run_stopped(settings, tmp_path, "local", as_ray_does, [signal.SIGTERM]) == 1
