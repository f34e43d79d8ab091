"""The `inline` backend: attempts run in the test process itself, at submit time."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from skyloop.execution.backends.base import Backend
from skyloop.execution.backends.inline import InlineBackend
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskResult, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore

pytestmark = pytest.mark.integration

STEPS = str(Path(__file__).with_name("steps_for_backend.py"))


def make_launch(tmp_path: Path, qualname: str, timeout: float | None = None,
                env: dict[str, str] | None = None, **inputs: object) -> TaskLaunch:
    key = f"{qualname}-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name=qualname, step=StepRef(module=STEPS, qualname=qualname),
        inputs={name: Literal_(value) for name, value in inputs.items()}, output_names=["output"],
        multi_output=False, resources=Resources(), timeout=timeout,
        log_path=str(tmp_path / "logs" / f"{key}.log"), artifacts_url=str(tmp_path / "artifacts"),
        env=env or {},
    )


def run_one(backend: InlineBackend, launch: TaskLaunch) -> TaskResult:
    backend.submit(launch)
    [result] = backend.wait(0)
    assert result.key == launch.key
    return result


def test_is_a_backend_with_a_capacity() -> None:
    backend = InlineBackend()
    assert isinstance(backend, Backend)
    assert backend.name == "inline"
    assert backend.capacity() == Resources(cpus=os.cpu_count() or 1, memory=psutil.virtual_memory().total)
    assert InlineBackend(Resources(cpus=2)).capacity() == Resources(cpus=2)


def test_wait_returns_results_at_once_and_sleeps_out_its_timeout_without_any(tmp_path: Path) -> None:
    backend = InlineBackend()
    backend.submit(make_launch(tmp_path, "noop"))
    started = time.monotonic()
    assert len(backend.wait(30.0)) == 1
    assert time.monotonic() - started < 10  # not the 30 s timeout
    # With none, nothing can come before the caller acts again (a retry delay): it sleeps, not spins.
    started = time.monotonic()
    assert backend.wait(0.3) == []
    assert time.monotonic() - started >= 0.3


def test_step_result_is_stored(tmp_path: Path) -> None:
    result = run_one(InlineBackend(), make_launch(tmp_path, "add", a=2, b=3))
    assert result.state == TaskState.SUCCEEDED, result.error
    assert ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"]) == 5
    assert result.worker == f"inline:{os.getpid()}"
    assert result.started_at is not None and result.ended_at is not None


def test_python_output_lands_in_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    launch = make_launch(tmp_path, "chatty", text="hi")
    result = run_one(InlineBackend(), launch)
    assert result.state == TaskState.SUCCEEDED, result.error
    log = Path(launch.log_path).read_text()
    assert "print hi\n" in log and "stderr hi\n" in log
    assert "print hi" not in capsys.readouterr().out


def test_env_applies_to_the_step_only(tmp_path: Path) -> None:
    assert "SKYLOOP_T" not in os.environ
    result = run_one(InlineBackend(), make_launch(tmp_path, "getenv", env={"SKYLOOP_T": "on"}, name="SKYLOOP_T"))
    assert ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"]) == "on"
    assert "SKYLOOP_T" not in os.environ


@pytest.mark.parametrize(("qualname", "inputs", "error"), [
    ("boom", {}, "ValueError: boom from step"),
    ("exit_", {"code": 4}, "SystemExit: 4"),
])
def test_step_errors_fail_the_task(tmp_path: Path, qualname: str, inputs: dict[str, Any], error: str) -> None:
    result = run_one(InlineBackend(), make_launch(tmp_path, qualname, **inputs))
    assert result.state == TaskState.FAILED
    assert result.error == error
    assert result.traceback is not None and qualname in result.traceback


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_a_step_past_its_timeout_is_interrupted(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGALRM)
    outer = signal.setitimer(signal.ITIMER_REAL, 100.0)  # a timer of the caller's (e.g. pytest-timeout)
    try:
        started = time.monotonic()
        result = run_one(InlineBackend(), make_launch(tmp_path, "sleep", timeout=0.2, seconds=10))
        assert result.state == TaskState.TIMED_OUT
        assert result.error == "timed out after 0.2s"
        assert time.monotonic() - started < 5
        assert signal.getsignal(signal.SIGALRM) is previous
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_a_quick_step_with_a_timeout_leaves_timers_as_they_were(tmp_path: Path) -> None:
    before = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout may have one running
    result = run_one(InlineBackend(), make_launch(tmp_path, "add", timeout=5, a=1, b=1))
    assert result.state == TaskState.SUCCEEDED
    after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert after == before == 0 or 0 < before - after < 1


def test_cancel_and_shutdown_are_harmless(tmp_path: Path) -> None:
    backend = InlineBackend()
    backend.start()
    result = run_one(backend, make_launch(tmp_path, "noop"))
    backend.cancel(result.key)
    assert backend.wait(0) == []
    backend.shutdown()
    backend.shutdown()
