"""Scratch folders (a server's metrics and relay sockets, a model's private copy) do not outlive their process:
one that was killed leaves them behind, and the next process to make one removes them, never a live one's."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from skyloop.config import Settings
from skyloop.scratch import Scratch, disown, sweep

HOLD = """
import os, sys, time
from skyloop.scratch import Scratch
scratch = Scratch(sys.argv[2], dir=sys.argv[1])
if sys.argv[3] == "fork" and os.fork() == 0:  # a worker: it holds the folder with its parent
    time.sleep(120)
    os._exit(0)
print(scratch.path, flush=True)
time.sleep(120)
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder of a short path (a relay socket's path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _holders(parent: Path, *modes: str) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    """Processes that each make a scratch folder under `parent` and sleep: (process, folder) per mode."""
    procs: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for mode in modes:
            proc = subprocess.Popen([sys.executable, "-c", HOLD, str(parent), "held", mode],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            procs.append((proc, proc.stdout.readline().strip()))
        yield procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:  # (a pid reaped already may be another process's by now)
                _kill_tree(proc.pid)
            proc.communicate()


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=10)


def test_the_folders_of_a_killed_process_go_with_the_next_scratch_and_live_ones_stay(short_tmp: Path) -> None:
    (short_tmp / "skyloop-unlocked").mkdir()  # not made by Scratch: not ours to judge
    (short_tmp / "other").mkdir()
    with _holders(short_tmp, "alone", "alone", "fork", "alone") as procs:
        (live, live_dir), (killed, killed_dir), (forked, forked_dir), (given, given_dir) = procs
        (worker,) = psutil.Process(forked.pid).children()
        try:
            for proc in (killed, forked, given):  # forked's worker lives on, and holds its folder
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            disown(given_dir)  # given to a server as its PROMETHEUS_MULTIPROC_DIR: its own now
            assert Path(killed_dir).is_dir()  # nobody removed it: the leak
            mine = Scratch("metrics", dir=str(short_tmp))  # the first in this folder sweeps it
            assert not Path(killed_dir).exists()
            assert Path(live_dir).is_dir() and Path(forked_dir).is_dir()
            assert sweep(str(short_tmp)) == []  # this process's own folder is held too
            _kill_tree(live.pid)
            assert sweep(str(short_tmp)) == [live_dir]
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()  # (by its psutil handle: not another process that took its pid)
            psutil.wait_procs([worker], timeout=10)
        mine.remove()  # and sweeps again: the worker is gone now
        assert not Path(mine.path).exists() and not Path(forked_dir).exists()
    assert sorted(p.name for p in short_tmp.iterdir()) == ["other", Path(given_dir).name, "skyloop-unlocked"]


def test_a_killed_servers_folders_are_removed_by_the_next_server(serve: Any, settings: Settings, iris_uri: str,
                                                                  short_tmp: Path) -> None:
    env = {"TMPDIR": str(short_tmp)}
    with serve(settings, iris_uri, workers=2, env=env) as (proc, _):
        first = sorted(p.name for p in short_tmp.iterdir())
        assert [name.split("-")[1] for name in first] == ["metrics", "relay"]
        workers = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for worker in workers:
            worker.kill()
        psutil.wait_procs(workers, timeout=10)
    assert sorted(p.name for p in short_tmp.iterdir()) == first  # the killed server could not remove them
    with serve(settings, iris_uri, workers=2, env=env):
        second = sorted(p.name for p in short_tmp.iterdir())
        assert not set(first) & set(second) and len(second) == 2
    assert list(short_tmp.iterdir()) == []  # stopped, it removed its own


def test_without_file_locks_a_scratch_folder_still_works_and_no_sweep_takes_it(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a file system mounted without locks (Lustre's noflock), serving with workers and python models that
    # load from a folder must go on working, as before scratch folders were locked.
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as patched:
        patched.setattr(fcntl, "flock", no_locks)
        scratch = Scratch("model", dir=str(short_tmp))
    assert [p.name for p in Path(scratch.path).iterdir()] == []  # no lock file left half made
    assert sweep(str(short_tmp)) == [] and Path(scratch.path).is_dir()
    scratch.remove()
    assert list(short_tmp.iterdir()) == []
