"""An unexpected error in one run's bookkeeping fails that run alone: the agent and its other runs go on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyloop import Settings
from skyloop.execution.api import submit
from skyloop.execution.loading import load_file_module
from skyloop.store.models import RunRow, StepRunRow
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent

PIPELINES = '''
import time
from skyloop import pipeline, step
from skyloop.config import Settings
from skyloop.store.models import RunRow
from skyloop.store.workspace import Workspace


@step(cache=False)
def first(x: int) -> int:
    return x


@step(cache=False)
def boom(x: int) -> int:
    return x


@step(cache=False)
def long(x: int) -> int:
    time.sleep(60)
    return x


@pipeline
def faulty(x: int = 1):
    return boom(first(x)), long(x)


@step(cache=False)
def outlast(other: str) -> str:
    """Wait until the run `other` ended (this run is held by the same agent all the while)."""
    ws = Workspace.open(Settings.load())
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with ws.db.read() as session:
                status = session.get(RunRow, other).status
            if status != "RUNNING":
                return status
            time.sleep(0.1)
    finally:
        ws.close()
    raise TimeoutError(f"run {other} never ended")


@pipeline
def bystander(other: str):
    return outlast(other)
'''


@pytest.mark.parametrize("where", ["activate", "launch", "finish"])
def test_an_error_in_one_runs_bookkeeping_fails_that_run_alone(settings: Settings, tmp_path: Path,
                                                                where: str) -> None:
    file = tmp_path / "pipes.py"
    file.write_text(PIPELINES)
    module = load_file_module(file)
    faulty = submit(module.faulty, settings=settings)
    bystander = submit(module.bystander, {"other": faulty}, settings=settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env |= {"SKYLOOP_HOME": str(settings.home), "SKYLOOP_EXECUTION__AGENT_POLL_SECONDS": "0.2"}
    agent = subprocess.run([sys.executable, str(HERE / "faulty_agent.py"), where, "boom", "agent", "--backend",
                            "local", "--max-cpus", "3", "--once"], env=env, capture_output=True, text=True,
                           timeout=240)
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            runs = {r.id: (r.status, r.error) for r in session.query(RunRow)}
            steps = {r.task: r.state for r in session.query(StepRunRow).filter_by(run_id=faulty)}
    finally:
        ws.close()
    assert agent.returncode == 0, agent.stdout + agent.stderr
    fault = {"activate": "activating boom", "launch": "launching boom", "finish": "taking the end of boom"}[where]
    assert runs[faulty] == ("FAILED", f"orchestrator error: InjectedFault: {fault}")
    # The run's other step, still running, was stopped with it; nothing of it is left RUNNING.
    assert steps["long"] == "CANCELLED" and steps["first"] == "SUCCEEDED"
    assert steps.get("boom") in (None, "CRASHED")
    # The other run was held by the same agent while this one failed, and went on to succeed.
    assert runs[bystander] == ("SUCCEEDED", None)
