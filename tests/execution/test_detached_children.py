"""Processes a step started in a session of their own (helpers, daemons) end with its attempt however it ends:
timeout, cancel, shutdown, a worker that crashes or is killed, and an orchestrator that dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from tests_support import collect, gone, write

from skyloop.config import ExecutionSettings
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources

pytestmark = pytest.mark.integration

STEPS = '''
import os, subprocess, sys, time


def detach(pid_file, exit_code=None):
    """Start a helper in a session of its own and a daemon (forked twice, in its own session); write both ids,
    then leave with `exit_code`, or work for two minutes."""
    helper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    subprocess.run(["sh", "-c", 'sleep 120 & echo $! > "$1"', "sh", pid_file + ".daemon"],
                   start_new_session=True, check=True)
    with open(pid_file + ".daemon") as fh:
        daemon = fh.read().strip()
    with open(pid_file + ".tmp", "w") as fh:
        fh.write(f"{helper.pid} {daemon}")
    os.rename(pid_file + ".tmp", pid_file)
    if exit_code is not None:
        os._exit(exit_code)
    time.sleep(120)
'''

PARENT = """
import time
from skyloop.config import ExecutionSettings
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import Literal_, TaskLaunch
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources

backend = LocalBackend(ExecutionSettings(max_workers=1))
backend.submit(TaskLaunch(
    key="detach", task_name="detach", step=StepRef(module={steps!r}, qualname="detach"),
    inputs={{"pid_file": Literal_({pid_file!r})}}, output_names=["output"], multi_output=False,
    resources=Resources(), timeout=None, log_path={log!r}, artifacts_url={artifacts!r}))
print(*backend.pids(), flush=True)
time.sleep(120)
"""


def make_launch(tmp_path: Path, pid_file: Path, timeout: float | None = None,
                exit_code: int | None = None) -> TaskLaunch:
    steps = tmp_path / "detach_steps.py"
    if not steps.exists():
        write(steps, STEPS)
    key = f"detach-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name="detach", step=StepRef(module=str(steps), qualname="detach"),
        inputs={"pid_file": Literal_(str(pid_file)), "exit_code": Literal_(exit_code)}, output_names=["output"],
        multi_output=False, resources=Resources(), timeout=timeout,
        log_path=str(tmp_path / "logs" / f"{key}.log"), artifacts_url=str(tmp_path / "artifacts"),
    )


def started(pid_file: Path, limit: float = 20.0) -> list[int]:
    """The ids of the helper and the daemon, once the step has written them."""
    deadline = time.monotonic() + limit
    while not pid_file.exists():
        assert time.monotonic() < deadline, f"{pid_file} was not written in {limit}s"
        time.sleep(0.02)
    return [int(pid) for pid in pid_file.read_text().split()]


def end(pids: list[int]) -> None:
    """Kill what a failed test left running (by id)."""
    for pid in pids:
        if not gone(pid, within=0):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ending", ["timeout", "cancel", "shutdown", "crash", "killed worker"])
def test_processes_in_their_own_session_end_with_the_attempt(tmp_path: Path, ending: str) -> None:
    pid_file = tmp_path / "detached.pid"
    launch = make_launch(tmp_path, pid_file, timeout=3 if ending == "timeout" else None,
                         exit_code=3 if ending == "crash" else None)
    pool = LocalBackend(ExecutionSettings(max_workers=1))
    pids: list[int] = []
    try:
        pool.submit(launch)
        pids = started(pid_file)
        assert len(pids) == 2 and not any(gone(pid, within=0) for pid in pids)
        if ending == "cancel":
            pool.cancel(launch.key)
        elif ending == "killed worker":
            [worker] = pool.pids()
            os.kill(worker, signal.SIGKILL)
        if ending == "shutdown":
            pool.shutdown()
        else:
            result = collect(pool, 1)[launch.key]
            expected = {"timeout": TaskState.TIMED_OUT, "cancel": TaskState.CANCELLED}.get(ending, TaskState.CRASHED)
            assert result.state == expected, result.error
        for pid in pids:
            assert gone(pid), f"process {pid} outlived its attempt ({ending})"
    finally:
        pool.shutdown()
        end(pids)


def test_processes_in_their_own_session_end_when_the_orchestrator_dies(tmp_path: Path) -> None:
    write(tmp_path / "detach_steps.py", STEPS)
    pid_file = tmp_path / "detached.pid"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT.format(
        steps=str(tmp_path / "detach_steps.py"), pid_file=str(pid_file), log=str(tmp_path / "detach.log"),
        artifacts=str(tmp_path / "artifacts"))))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 1
        pids = started(pid_file)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for pid in [*workers, *pids]:
            assert gone(pid), f"process {pid} outlived its orchestrator"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        end([*pids, *workers])
