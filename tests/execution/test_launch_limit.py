"""On the local backend the policy decides what starts next: the orchestrator hands the backend no more
attempts than it has workers, whatever fraction of a CPU (or none) the steps ask for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from skyloop import Settings, run
from skyloop.execution.api import submit
from skyloop.execution.loading import load_file_module
from skyloop.store.models import RunRow, StepRunRow
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration

PIPELINES = '''
import time
from skyloop import Resources, pipeline, step, unmapped

@step(cache=False)
def items(n: int) -> list[int]:
    return list(range(n))

@step(cache=False, resources=Resources(cpus=0.25))
def slow(i: int, pause: float) -> int:
    time.sleep(pause)
    return i

@step(cache=False, resources=Resources(cpus=0))
def free(i: int, pause: float) -> int:
    time.sleep(pause)
    return i

@step(cache=False, resources=Resources(cpus=0.25))
def urgent(x: int) -> int:
    return x

@pipeline
def low(n: int = 12, pause: float = 0.4):
    return slow.map(items(n), unmapped(pause))

@pipeline
def cpuless(n: int = 6, pause: float = 0.2):
    return free.map(items(n), unmapped(pause))

@pipeline
def high(x: int = 1):
    return urgent(x)
'''


def _rows(settings: Settings) -> list[StepRunRow]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            return list(session.query(StepRunRow).all())
    finally:
        ws.close()


def _handed_over_at_once(rows: list[StepRunRow]) -> int:
    """The most attempts launched (from their row's creation to their end) at any one time."""
    spans = [(r.created_at, r.ended_at or datetime.max) for r in rows]
    return max(sum(1 for start, end in spans if start <= at < end) for at, _ in spans)


def test_steps_asking_for_no_cpu_are_launched_no_faster_than_workers_start_them(settings: Settings,
                                                                                tmp_path: Path) -> None:
    (tmp_path / "pipes.py").write_text(PIPELINES)
    settings.execution.max_cpus = 2  # two workers
    result = run(load_file_module(tmp_path / "pipes.py").cpuless, backend="local", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    # (All six at once before: four of them then waited in the backend's queue, out of the policy's reach.)
    assert _handed_over_at_once([r for r in _rows(settings) if r.task == "free"]) <= 2


def test_an_urgent_step_does_not_queue_behind_fractional_ones_handed_over_earlier(settings: Settings,
                                                                                   tmp_path: Path) -> None:
    (tmp_path / "pipes.py").write_text(PIPELINES)
    pipes = load_file_module(tmp_path / "pipes.py")
    low = submit(pipes.low, priority=0, settings=settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env |= {"SKYLOOP_HOME": str(settings.home), "SKYLOOP_EXECUTION__AGENT_POLL_SECONDS": "0.2"}
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "skyloop", "agent", "--backend", "local", "--max-cpus", "1"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not [r for r in _rows(settings) if r.task == "slow"]:
            assert time.monotonic() < deadline and agent.poll() is None, "the low-priority run never started"
            time.sleep(0.05)
        high = submit(pipes.high, priority=10, settings=settings)
        while True:
            ws = Workspace.open(settings)
            try:
                with ws.db.read() as session:
                    states = {r.id: r.status for r in session.query(RunRow)}
            finally:
                ws.close()
            if states[low] != "RUNNING" and states[high] != "RUNNING":
                break
            assert time.monotonic() < deadline + 60 and agent.poll() is None, f"the runs did not end: {states}"
            time.sleep(0.1)
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
    assert states[low] == states[high] == "SUCCEEDED"
    rows = _rows(settings)
    (first,) = [r for r in rows if r.task == "urgent"]
    slow = [r for r in rows if r.task == "slow"]
    # One worker: one attempt handed over at a time (four before, by their quarter CPU each) ...
    assert _handed_over_at_once([*slow, first]) == 1
    # ... so no unit launched before the urgent step waited in the backend to start after it,
    assert not [r for r in slow if r.created_at < first.created_at and r.started_at > first.created_at]
    # and the policy put it before the low-priority units still waiting.
    assert first.started_at < max(r.started_at for r in slow)
