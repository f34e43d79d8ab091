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
from skyloop.scratch import Scratch, sweep

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
    with _holders(short_tmp, "alone", "alone", "fork") as ((live, live_dir), (killed, killed_dir),
                                                           (forked, forked_dir)):
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        worker = psutil.Process(forked.pid).children()
        assert len(worker) == 1
        forked.send_signal(signal.SIGKILL)  # its forked worker lives on, and holds the folder
        forked.wait()
        assert Path(killed_dir).is_dir()  # nobody removed it: the leak
        mine = Scratch("metrics", dir=str(short_tmp))  # the first in this folder sweeps it
        try:
            assert not Path(killed_dir).exists()
            assert Path(live_dir).is_dir() and Path(forked_dir).is_dir()
            assert sweep(str(short_tmp)) == []  # this process's own folder is held too
            _kill_tree(live.pid)
            assert sweep(str(short_tmp)) == [live_dir]
            _kill_tree(worker[0].pid)
            assert sweep(str(short_tmp)) == [forked_dir]
        finally:
            mine.remove()
        assert not Path(mine.path).exists()
    assert sorted(p.name for p in short_tmp.iterdir()) == ["other", "skyloop-unlocked"]


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
