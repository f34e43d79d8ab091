"""Processes a step leaves running end with its attempt: the next attempt on the warm worker is measured and
logged alone, and the worker itself (and its neighbours) live on."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests_support import collect, output, run_one

from skyloop.config import ExecutionSettings
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources

pytestmark = pytest.mark.integration

STEPS = '''\
import os, subprocess, sys, time

HOLD = """
import sys, time
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("holding", flush=True)
time.sleep(60)
"""


def leave_child(pid_file, megabytes=0):
    """Start a child that holds `megabytes` for a minute; return once it holds them, leaving it running."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(megabytes)], stdout=subprocess.PIPE)
    child.stdout.readline()
    with open(pid_file, "w") as fh:
        fh.write(str(child.pid))
    return os.getpid()


def leave_orphan(pid_file):
    """Start a grandchild through a shell that exits at once (`cmd &`): its parent is gone when the step ends."""
    subprocess.run(["sh", "-c", 'sleep 60 & echo $! > "$1"', "sh", pid_file], check=True)
    return os.getpid()


def leave_late_printer(text, seconds):
    """Return at once, leaving a child that prints `text` after `seconds` (to this step's output)."""
    subprocess.Popen(["sh", "-c", 'sleep "$1"; echo "$2"', "sh", str(seconds), text])
    return os.getpid()


def say_after(text, seconds):
    time.sleep(seconds)
    print(text, flush=True)
    return os.getpid()
'''


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("leftover") / "leftover_steps.py"
    path.write_text(STEPS)
    return str(path)


@pytest.fixture
def pool() -> Iterator[LocalBackend]:
    backend = LocalBackend(ExecutionSettings(max_workers=1, memory_poll_seconds=0.05))
    backend.start()
    yield backend
    backend.shutdown()  # reaps its workers by PID


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """PIDs of processes that steps start: any still there after the test is killed."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def launch(steps: str, tmp_path: Path, qualname: str, memory: str | int = 0, **inputs: object) -> TaskLaunch:
    key = f"{qualname}-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name=qualname, step=StepRef(module=steps, qualname=qualname),
        inputs={name: Literal_(value) for name, value in inputs.items()}, output_names=["output"],
        multi_output=False, resources=Resources(memory=memory), timeout=None,
        log_path=str(tmp_path / "logs" / f"{key}.log"), artifacts_url=str(tmp_path / "artifacts"))




def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pid(pid_file: Path, pids: list[int]) -> int:
    pid = int(pid_file.read_text())
    pids.append(pid)
    return pid


@pytest.mark.parametrize("qualname", ["leave_child", "leave_orphan"])
def test_a_process_a_step_leaves_is_gone_when_its_attempt_ends(pool: LocalBackend, steps: str, tmp_path: Path,
                                                               pids: list[int], qualname: str) -> None:
    pid_file = tmp_path / "left.pid"
    result = run_one(pool, launch(steps, tmp_path, qualname, pid_file=str(pid_file)))
    worker = output(tmp_path, result)
    left = read_pid(pid_file, pids)
    assert not running(left), f"process {left} that the step left outlived its attempt"
    if qualname == "leave_child":
        assert not psutil.pid_exists(left), "the worker should reap what it killed"
    # The worker itself lives on and takes the next launch.
    assert running(worker)
    assert output(tmp_path, run_one(pool, launch(steps, tmp_path, "say_after", text="next", seconds=0))) == worker


def test_the_next_attempt_is_not_charged_for_the_memory_of_a_leftover(pool: LocalBackend, steps: str,
                                                                      tmp_path: Path, pids: list[int]) -> None:
    pid_file = tmp_path / "left.pid"
    first = run_one(pool, launch(steps, tmp_path, "leave_child", pid_file=str(pid_file), megabytes=150))
    worker = output(tmp_path, first)
    read_pid(pid_file, pids)
    # Asks for 64Mi and uses nothing: a leftover holding 150 MiB would make it OUT_OF_MEMORY.
    second = run_one(pool, launch(steps, tmp_path, "say_after", memory="64Mi", text="small", seconds=1.0))
    assert second.state == TaskState.SUCCEEDED, second.error
    assert output(tmp_path, second) == worker


def test_output_of_a_leftover_lands_in_no_later_attempts_log(pool: LocalBackend, steps: str,
                                                             tmp_path: Path) -> None:
    first = launch(steps, tmp_path, "leave_late_printer", text="late output", seconds=0.3)
    second = launch(steps, tmp_path, "say_after", text="own output", seconds=1.0)
    worker = output(tmp_path, run_one(pool, first))
    assert output(tmp_path, run_one(pool, second)) == worker
    assert Path(second.log_path).read_text() == "own output\n"
    time.sleep(0.3)
    assert not Path(first.log_path).exists()
    assert "late output" not in "".join(p.read_text() for p in (tmp_path / "logs").iterdir())


def test_other_workers_and_their_steps_are_left_alone(steps: str, tmp_path: Path, pids: list[int]) -> None:
    pool = LocalBackend(ExecutionSettings(max_workers=2))
    try:
        pool.start()
        busy = launch(steps, tmp_path, "say_after", text="busy", seconds=1.5)
        pool.submit(busy)
        pid_file = tmp_path / "left.pid"
        leaving = run_one(pool, launch(steps, tmp_path, "leave_child", pid_file=str(pid_file)))
        assert not running(read_pid(pid_file, pids))
        assert len(pool.pids()) == 2 and all(running(pid) for pid in pool.pids())
        assert output(tmp_path, collect(pool, 1)[busy.key]) != output(tmp_path, leaving)
    finally:
        pool.shutdown()
    assert sys.platform != "linux" or not any(p.pid in pids for p in psutil.Process().children(recursive=True))
