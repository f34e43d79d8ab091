"""Small helpers shared by tests (importable as `tests_support`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psutil
from sqlalchemy import event, inspect

from skyloop.execution.backends.base import Backend
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.db import Database
from skyloop.store.migrations import upgrade

__all__ = ["age_blobs", "agent_env", "at_once", "before_first_update", "calls_made", "collect", "exchange", "post",
           "reap", "replayed_database", "schema_of", "until", "write"]

T = TypeVar("T")


def collect(backend: Backend, count: int, limit: float = 30.0) -> dict[str, TaskResult]:
    """The results of `count` attempts from `backend.wait`, by key; fails after `limit` seconds."""
    results: dict[str, TaskResult] = {}
    deadline = time.monotonic() + limit
    while len(results) < count:
        assert time.monotonic() < deadline, f"only {len(results)} of {count} results after {limit}s"
        for result in backend.wait(deadline - time.monotonic()):
            results[result.key] = result
    return results


def dead_process_owner() -> str:
    """The lease owner id (`process_owner()`) of a process of this host that has ended."""
    code = "from skyloop.store.runs import process_owner; print(process_owner())"
    gone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return gone.stdout.strip()


def run_one(backend: Backend, launch: TaskLaunch) -> TaskResult:
    """Submit one attempt and wait for its result."""
    backend.submit(launch)
    return collect(backend, 1)[launch.key]


def output(tmp_path: Path, result: TaskResult) -> Any:
    """The value a succeeded attempt stored as `output` in the store at `tmp_path / "artifacts"`."""
    assert result.state == TaskState.SUCCEEDED, result.error
    return ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"])


def age_blobs(store: ArtifactStore, seconds: float = 3600.0) -> None:
    """Make every blob of a local store look written `seconds` ago (garbage collection keeps fresh ones)."""
    then = time.time() - seconds
    for path in Path(store.root).rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def write(path: Path, text: str) -> Path:
    """Write dedented text (without the leading newline) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def replayed_database(url: str) -> Database:
    """A database whose schema comes from running every migration script in turn."""
    database = Database(url, migrate=False)
    with database.engine.begin() as conn:
        upgrade(conn)
    return database


def pause_between_writes(pid: int, home: Path, tries: int = 200) -> None:
    """SIGSTOP the process `pid` at a moment it holds no write lock on the SQLite DB in `home`.

    A process paused inside a write transaction stops every other process on SQLite (each waits out its
    busy timeout, then fails with "database is locked"): a fact of SQLite, not what a test of a paused
    agent (a lost lease, a suspended laptop) is about. Paused at a random moment, it did now and then.
    """
    import sqlite3

    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        conn = sqlite3.connect(home / "skyloop.db", timeout=0.2)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock only if the paused process does not hold it
            conn.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)
        finally:
            conn.close()
    raise AssertionError(f"process {pid} held the DB's write lock at each of {tries} tries")


@contextmanager
def before_first_update(db: Database, action: Callable[[], None], verb: str = "UPDATE") -> Iterator[None]:
    """Run `action` (another process's write, committed on its own connection) just before `db` sends its
    first UPDATE (or other `verb`: INSERT, DELETE): the moment between a function's read and its first write."""
    done: list[bool] = []

    def hook(conn: object, cursor: object, statement: str, *args: object) -> None:
        if not done and statement.lstrip().upper().startswith(f"{verb} "):
            done.append(True)
            action()

    event.listen(db.engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(db.engine, "before_cursor_execute", hook)
    assert done, f"no {verb} was sent"


def schema_of(database: Database) -> dict[str, object]:
    """Everything the inspector tells about each table, in a comparable form."""
    with database.engine.connect() as conn:
        found = inspect(conn)
        return {table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in found.get_columns(table)],
            "primary key": found.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in found.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
            "foreign keys": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                                    f["options"].get("ondelete")) for f in found.get_foreign_keys(table)),
        } for table in sorted(found.get_table_names())}


def exchange(port: int, request: bytes, answers: int = 1) -> bytes:
    """Send `request` on one connection (stopping early if the server closes it) and read until `answers`
    responses have come, or the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(request), 1 << 16):
                sock.sendall(request[start:start + (1 << 16)])
        answer = b""
        with contextlib.suppress(ConnectionError):
            while answer.count(b"HTTP/1.1 ") < answers or not answer.endswith(b"}"):
                if not (chunk := sock.recv(1 << 16)):
                    break
                answer += chunk
        return answer


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST `body` as JSON; the status and the decoded JSON answer, for errors too."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def at_once(count: int, call: Callable[[int], T]) -> list[T]:
    """`call(i)` for i in range(count), each in its own thread, released together; what they returned."""
    barrier = threading.Barrier(count)
    results: list[T] = []

    def run(i: int) -> None:
        barrier.wait()
        results.append(call(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == count, f"{count - len(results)} of {count} calls failed or did not finish"
    return results


# -- agents as real processes (tests/execution/test_agent_*.py) ---------------------------------------

def agent_env(home: Path, calls: Path, **extra: str) -> dict[str, str]:
    """The environment of an agent or CLI process on `home` with short leases; steps note their calls in `calls`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env |= {"SKYLOOP_HOME": str(home), "CALLS": str(calls), "SKYLOOP_EXECUTION__LEASE_SECONDS": "2",
            "SKYLOOP_EXECUTION__HEARTBEAT_SECONDS": "0.5", "SKYLOOP_EXECUTION__AGENT_POLL_SECONDS": "0.2"}
    return env | extra


def calls_made(path: Path) -> list[str]:
    """The calls the steps noted in `path` (each note is the call and the pid that made it)."""
    return path.read_text().split()[::2] if path.exists() else []


def until(check: Callable[[], object], timeout: float = 30) -> None:
    """Wait until `check()` is true; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def reap(*procs: subprocess.Popen[str]) -> None:
    """Kill what still runs (stopped ones too) and close the pipes."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process `pid` has ended (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def lease_fence(db: Database) -> None:
    """An agent back from a pause past its lease writes (launches) before anyone adopted its run: that write renews
    the lease, so no agent adopts the run and launches the same steps again; one adopted first is not written."""
    from datetime import timedelta

    import pytest
    from sqlalchemy import update

    from skyloop.errors import Conflict
    from skyloop.execution.recorder import Recorder
    from skyloop.store.models import RunRow
    from skyloop.store.runs import claim_run, claimable_runs, create_run, utcnow

    with db.session() as session:
        for run_id in ("paused", "adopted"):
            create_run(session, run_id=run_id, pipeline="p", spec={}, params={}, backend="local", owner="me",
                       lease_seconds=30)
        session.execute(update(RunRow).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with db.session() as session:
        assert sorted(claimable_runs(session)) == ["adopted", "paused"]
        claim_run(session, "adopted", "other", lease_seconds=30)
    recorder = Recorder(db, owner="me", lease_seconds=60)
    for run_id in ("paused", "adopted"):
        recorder.event(run_id, "step.launched", "a launch after the pause")
    recorder.flush()
    recorder.close()
    assert recorder.lost == {"adopted"}
    with db.session() as session:
        assert claimable_runs(session) == []
        with pytest.raises(Conflict, match="live process"):
            claim_run(session, "paused", "other", lease_seconds=30)
        lease = session.get(RunRow, "paused").lease_expires_at
        assert lease is not None and timedelta(seconds=55) < lease - utcnow() <= timedelta(seconds=60)

