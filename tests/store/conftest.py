"""Fixtures of the store tests: temporary workspaces, a two-step pipeline file, a private PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pg_support import PgCluster, pg_bindir

from skyloop import Settings  # the `settings` fixture comes from tests/conftest.py
from skyloop.execution.loading import load_file_module
from skyloop.store.db import Database
from skyloop.store.workspace import Workspace

CHAIN_SOURCE = '''
from skyloop import pipeline, step


@step
def make(n: int) -> list:
    return list(range(n))


@step
def total(xs: list) -> int:
    return sum(xs)


@pipeline
def chain(n: int = 4):
    return total(make(n))
'''


@pytest.fixture
def workspace(settings: Settings) -> Iterator[Workspace]:
    """The opened stores behind `settings`."""
    ws = Workspace.open(settings)
    yield ws
    ws.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'meta.db'}"


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    """A migrated SQLite metadata DB."""
    database = Database(sqlite_url)
    yield database
    database.dispose()


@pytest.fixture
def write_module(tmp_path: Path) -> Callable[[str, str], ModuleType]:
    """Write `source` as `<tmp_path>/<name>.py` and import it the way `skyloop run file.py:...` does."""

    def write(name: str, source: str) -> ModuleType:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return load_file_module(path)

    return write


@pytest.fixture
def chain(write_module: Callable[[str, str], ModuleType]) -> ModuleType:
    """A module with `chain`: `make(n) -> list(range(n))` feeding `total(xs) -> sum(xs)`."""
    return write_module("chain_pipeline", CHAIN_SOURCE)


# -- several processes writing at once ----------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from skyloop.store.db import Database
    from skyloop.store.runs import add_event, create_run

    url, name, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    Path(f"{go}.{name}").touch()
    while not go.exists():
        time.sleep(0.001)
    db = Database(url)  # every process migrates the same fresh file at once: the lock must hold
    for i in range(count):
        with db.session() as session:
            create_run(session, run_id=f"{name}-{i}", pipeline="p", spec={}, params={"i": i},
                       backend="local", owner=name, lease_seconds=30)
            add_event(session, f"{name}-{i}", "custom", f"{name} wrote {i}")
    db.dispose()
    print("ok", flush=True)
""")


def _start_writers(url: str, tmp_path: Path, workers: int, count: int,
                   procs: list[subprocess.Popen[str]]) -> None:
    go = tmp_path / "go"
    for n in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-c", _WRITER, url, f"w{n}", str(count), str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.w{n}").exists() for n in range(workers)):
        assert time.monotonic() < deadline, "the writer processes did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()


def _wait_writers(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
        assert err == ""


@pytest.fixture
def concurrent_writers(tmp_path: Path) -> Iterator[Callable[[str, int, int], None]]:
    """Run `workers` processes that open the DB at `url` at the same moment and each write `count` runs
    (`w<n>-<i>`, owner `w<n>`) with one `custom` event each, one transaction per run; fails on any error."""
    procs: list[subprocess.Popen[str]] = []

    def write(url: str, workers: int, count: int) -> None:
        _start_writers(url, tmp_path, workers, count, procs)
        _wait_writers(procs)

    yield write
    for proc in procs:  # only after a failure: stop the writers this fixture started
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- PostgreSQL -------------------------------------------------------------------------------------

def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server of `server_url`; returns its URL."""
    import psycopg

    base = server_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server for the session; yields the URL of its `skyloop_test` database."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'skyloop[postgres]'")
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql")
    cluster = PgCluster(bindir)
    try:
        cluster.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", "") or ""
        cluster.stop()
        pytest.fail(f"could not start PostgreSQL from {bindir}: {exc}\n{output}\n{cluster.log_tail()}")
    try:
        yield create_database(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", "skyloop_test")
    finally:
        cluster.stop()


@pytest.fixture
def new_pg_url(postgres_url: str) -> Callable[[], str]:
    """Makes a fresh, empty database on the session's server, so that tests share no rows (nor cache hits)."""
    return lambda: create_database(postgres_url, f"skyloop_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def pg_url(new_pg_url: Callable[[], str]) -> str:
    """A fresh, empty database on the session's server."""
    return new_pg_url()

