"""An agent's claims: what it must not take (a run cancelled or ended while it imported it), what it must
honour (a cancel asked of the run's previous holder), what it must survive (one run it cannot read or import),
what it leaves clean (the attempts of a run it cannot prepare) and in which order it is offered orphaned runs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from tests_support import agent_env, calls_made, reap, until, write

from skyloop import Settings
from skyloop.errors import Conflict
from skyloop.store.db import Database
from skyloop.store.models import Event, RunRow, StepRunRow
from skyloop.store.runs import claim_run, claimable_runs, create_run, disown_runs, release_run, utcnow
from skyloop.store.workspace import Workspace

STEPS = '''
import os
import subprocess
import sys
import time
from pathlib import Path

from skyloop import pipeline, step

# What another process does while the agent imports this file (the window between its listing the run
# and its claim): `cancel RUN` is the user's `skyloop runs cancel`, `fail RUN` another agent that ran the
# run and ended it FAILED. Done once.
_ORDER = Path(__file__).with_name("while_imported")
if _ORDER.exists():
    what, run_id = _ORDER.read_text().split()
    _ORDER.unlink()
    if what == "cancel":
        subprocess.run([sys.executable, "-m", "skyloop", "runs", "cancel", run_id], check=True)
    else:
        subprocess.run([sys.executable, "-c", f"""
from skyloop import Settings
from skyloop.store.runs import claim_run, release_run
from skyloop.store.workspace import Workspace
ws = Workspace.open(Settings.load())
with ws.db.session() as session:
    claim_run(session, "{run_id}", "otherhost:1:aaaaaa", 30, "local")
    release_run(session, "{run_id}", "otherhost:1:aaaaaa", "FAILED", "step 'work' FAILED: boom")
ws.close()
"""], check=True)

@step(cache=False)
def work(x: int) -> int:
    with open(os.environ["CALLS"], "a") as fh:
        fh.write(f"work {os.getpid()}\\n")
    time.sleep(x)
    return x + 1

@pipeline
def p(x: int = 0):
    return work(x)
'''

OTHER = "otherhost:1:abcdef"
"""An owner on another host: only its lease says whether it lives."""


def _cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skyloop", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _submit(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = _cli(cwd, env, "submit", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()[-1]


def _agent_once(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _cli(cwd, env, "agent", "--backend", "inline", "--once")


def _runs(settings: Settings) -> dict[str, tuple[str, str]]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            rows = session.execute(select(RunRow.id, RunRow.status, RunRow.error)).tuples().all()
        return {run_id: (status, error or "") for run_id, status, error in rows}
    finally:
        ws.close()


def _attempts(settings: Settings, run_id: str) -> list[tuple[str, str]]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            return [(r.task, r.state) for r in session.query(StepRunRow).filter(StepRunRow.run_id == run_id)]
    finally:
        ws.close()


@pytest.mark.integration
@pytest.mark.parametrize(("what", "status"), [("cancel", "CANCELLED"), ("fail", "FAILED")])
def test_a_run_cancelled_or_ended_while_the_agent_imports_it_is_not_run(settings: Settings, tmp_path: Path,
                                                                       what: str, status: str) -> None:
    """Before: the claim only asked that nobody held the run, so a run cancelled (or run and ended by another
    agent) in that window was set RUNNING again and its steps ran."""
    write(tmp_path / "steps.py", STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    run_id = _submit(tmp_path, env, "steps.py:p")
    (tmp_path / "while_imported").write_text(f"{what} {run_id}")
    agent = _agent_once(tmp_path, env)
    assert agent.returncode == 0, agent.stdout + agent.stderr
    assert not (tmp_path / "while_imported").exists()  # the other process did act while the agent imported
    assert _runs(settings)[run_id][0] == status
    assert calls_made(calls) == []  # the step never ran
    assert _attempts(settings, run_id) == []


def _hold_elsewhere(settings: Settings, run_id: str) -> None:
    ws = Workspace.open(settings)
    try:
        with ws.db.session() as session:
            claim_run(session, run_id, OTHER, lease_seconds=60, backend="inline")
    finally:
        ws.close()


def _let_go(settings: Settings, run_id: str, how: str) -> None:
    """The holder goes before reading the request: it dies (its lease runs out) or is stopped (it lets go)."""
    ws = Workspace.open(settings)
    try:
        with ws.db.session() as session:
            if how == "died":
                session.execute(update(RunRow).where(RunRow.id == run_id)
                                .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
            else:
                disown_runs(session, [run_id], OTHER)
    finally:
        ws.close()


@pytest.mark.integration
@pytest.mark.parametrize("how", ["died", "stopped"])
def test_a_cancel_asked_of_a_holder_that_went_is_honoured_by_the_agent_that_takes_the_run(
        settings: Settings, tmp_path: Path, how: str) -> None:
    """Before: the adopting agent only looked for requests newer than its own adoption, so the request the
    previous holder never read was lost and the run ran to its end."""
    write(tmp_path / "steps.py", STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    run_id = _submit(tmp_path, env, "steps.py:p")
    _hold_elsewhere(settings, run_id)
    cancelled = _cli(tmp_path, env, "runs", "cancel", run_id)
    assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    _let_go(settings, run_id, how)
    agent = _agent_once(tmp_path, env)
    assert agent.returncode == 0, agent.stdout + agent.stderr
    status, error = _runs(settings)[run_id]
    assert (status, error) == ("CANCELLED", "cancelled by the user (skyloop runs cancel)"), agent.stdout
    assert calls_made(calls) == []
    # An explicit resume after the cancel still runs it: the old request does not cancel it again.
    resumed = _cli(tmp_path, env, "run", "--resume", run_id, "--backend", "inline")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _runs(settings)[run_id][0] == "SUCCEEDED"
    assert calls_made(calls) == ["work"]


def _damage(settings: Settings, run_id: str, *, spec: str | None = None, params: str | None = None) -> None:
    """Write a stored spec or parameters as another version of skyloop (or a broken disk) might have."""
    with sqlite3.connect(settings.home / "skyloop.db") as conn:
        if spec is not None:
            conn.execute("UPDATE runs SET spec = ? WHERE id = ?", (spec, run_id))
        if params is not None:
            conn.execute("UPDATE runs SET params = ? WHERE id = ?", (params, run_id))
    conn.close()


@pytest.mark.integration
def test_runs_the_agent_cannot_read_or_import_fail_alone_and_the_agent_goes_on(settings: Settings,
                                                                              tmp_path: Path) -> None:
    """Before: a run whose stored spec no longer validated (or whose row was damaged, or whose module raised on
    import) crashed the agent (exit 70), failed the runs it held, and stayed QUEUED to crash the next one."""
    write(tmp_path / "steps.py", STEPS)
    write(tmp_path / "envmod.py", '''
        import os
        from skyloop import pipeline, step

        REGION = os.environ["REGION"]  # set where the run was submitted, missing where the agent runs

        @step(cache=False)
        def work(x: int) -> int:
            return x + 1

        @pipeline
        def p(x: int = 1):
            return work(x)
        ''')
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    good = _submit(tmp_path, env, "steps.py:p", "-p", "x=1")
    other_version = _submit(tmp_path, env, "steps.py:p")
    damaged = _submit(tmp_path, env, "steps.py:p")
    env_only = _submit(tmp_path, env | {"REGION": "eu"}, "envmod:p")
    _damage(settings, other_version, spec='{"name": "p", "tasks": "not a list"}')
    _damage(settings, damaged, params="{not json")
    agent = _agent_once(tmp_path, env)
    assert agent.returncode == 0, agent.stdout + agent.stderr
    assert "internal error" not in agent.stdout + agent.stderr
    runs = _runs(settings)
    assert runs[good] == ("SUCCEEDED", "")
    assert runs[other_version][0] == "FAILED"
    assert "cannot prepare the run: invalid stored pipeline spec: tasks" in runs[other_version][1]
    assert runs[damaged][0] == "FAILED" and "is damaged in the metadata DB" in runs[damaged][1]
    assert runs[env_only][0] == "FAILED" and "KeyError: 'REGION'" in runs[env_only][1]
    assert f"run {other_version[:12]}: cannot prepare the run" in agent.stdout
    assert calls_made(calls) == ["work"]  # the good run's step, once
    again = _agent_once(tmp_path, env)  # nothing left for the next agent to trip on
    assert again.returncode == 0 and "0 run(s) claimed" in again.stdout, again.stdout + again.stderr


@pytest.mark.integration
def test_a_run_the_agent_cannot_prepare_again_fails_with_its_lost_attempts_crashed(settings: Settings,
                                                                                  tmp_path: Path) -> None:
    """Before: the run was marked FAILED while the attempt its killed process ran stayed RUNNING forever."""
    write(tmp_path / "steps.py", STEPS)
    calls = tmp_path / "calls"
    env = agent_env(settings.home, calls)
    first = subprocess.Popen([sys.executable, "-m", "skyloop", "run", "steps.py:p", "-p", "x=60", "--backend",
                              "inline"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        until(lambda: "work" in calls_made(calls))
        os.kill(first.pid, signal.SIGKILL)  # inline: the step dies with it
        first.wait(30)
    finally:
        reap(first)
    (run_id,) = _runs(settings)
    assert _attempts(settings, run_id) == [("work", "RUNNING")]
    (tmp_path / "steps.py").rename(tmp_path / "moved.py")  # not where the run's spec says any more
    agent = _agent_once(tmp_path, env)
    assert agent.returncode == 0, agent.stdout + agent.stderr
    status, error = _runs(settings)[run_id]
    assert status == "FAILED" and "cannot prepare the run" in error and "does not exist" in error
    assert _attempts(settings, run_id) == [("work", "CRASHED")]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'claims.db'}")
    yield database
    database.dispose()


def _orphan(db: Database, run_id: str, *, priority: int = 0, queued_for: str | None = None,
            queued: bool = True) -> None:
    """A run whose holder died (lease expired): queued first (for `queued_for`), or started by `skyloop run`."""
    with db.session() as session:
        create_run(session, run_id=run_id, pipeline="p", spec={}, params={}, backend=queued_for if queued else "local",
                   owner=None if queued else OTHER, lease_seconds=60, priority=priority)
    with db.session() as session:
        if queued:
            claim_run(session, run_id, OTHER, lease_seconds=60, backend=queued_for or "local")
        session.execute(update(RunRow).where(RunRow.id == run_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_orphaned_runs_are_offered_by_priority_with_the_queue_and_only_to_their_backend(db: Database) -> None:
    """Before: orphans came after every queued run (cut off by the agent's room: never offered while the queue
    was busy), whatever their priority, and to an agent of any backend."""
    with db.session() as session:
        for i in range(3):
            create_run(session, run_id=f"queued-{i}", pipeline="p", spec={}, params={}, backend=None, owner=None,
                       lease_seconds=0)
    _orphan(db, "orphan-hi", priority=100)
    _orphan(db, "orphan-ray", queued_for="ray")
    _orphan(db, "orphan-started", queued=False)  # by `skyloop run` on local: any agent may finish it
    with db.session() as session:
        assert claimable_runs(session, limit=3, backend="local") == ["orphan-hi", "queued-0", "queued-1"]
        local = claimable_runs(session, limit=10, backend="local")
        assert local == ["orphan-hi", "queued-0", "queued-1", "queued-2", "orphan-started"]
        assert "orphan-ray" in claimable_runs(session, limit=10, backend="ray")
        assert "orphan-started" in claimable_runs(session, limit=10, backend="inline")
        assert set(claimable_runs(session, limit=10)) == {*local, "orphan-ray"}
        # The backend the orphan ran on is not the one it asked for: a run queued for any goes to any agent.
        assert session.get(RunRow, "orphan-hi").backend == "local"  # type: ignore[union-attr]
        assert "orphan-hi" in claimable_runs(session, limit=10, backend="inline")
        kinds = session.scalars(select(Event.kind).where(Event.run_id == "orphan-ray")).all()
        assert kinds == ["run.queued", "run.adopted"]


def test_a_damaged_running_run_does_not_stop_an_agent_finding_the_others(db: Database, tmp_path: Path) -> None:
    """Before: every RUNNING run was read whole at each poll, so one whose stored JSON no longer parsed made
    every poll fail."""
    _orphan(db, "damaged")
    _orphan(db, "fine")
    with sqlite3.connect(tmp_path / "claims.db") as conn:
        conn.execute("UPDATE runs SET spec = '{not json' WHERE id = 'damaged'")
    conn.close()
    with db.session() as session:
        assert claimable_runs(session, backend="local") == ["damaged", "fine"]
        # and the damaged one can still be claimed (to be marked FAILED by the agent that cannot read it)
        assert claim_run(session, "damaged", "me:1:cccccc", lease_seconds=60, resume=False).status == "RUNNING"


def test_an_agents_claim_takes_no_run_that_ended_but_a_resume_does(db: Database) -> None:
    """The store side of the first test: the agent's claim (`resume=False`) is refused for an ended run."""
    for status in ("FAILED", "CANCELLED"):
        with db.session() as session:
            create_run(session, run_id=status, pipeline="p", spec={}, params={}, backend=None, owner=OTHER,
                       lease_seconds=60)
            release_run(session, status, OTHER, status, "ended")
        with pytest.raises(Conflict, match=f"already ended {status}; an agent does not run it again"), \
                db.session() as session:
            claim_run(session, status, "agent:1:aaaaaa", lease_seconds=60, resume=False)
        with db.session() as session:
            assert claim_run(session, status, "me:1:bbbbbb", lease_seconds=60).status == "RUNNING"
