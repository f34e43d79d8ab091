"""An orchestrator waiting out a retry delay, with nothing else to run, sleeps rather than spins."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests_support import write

import skyloop
from skyloop import pipeline, step
from skyloop.config import Settings
from skyloop.execution.tasks import TaskState

pytestmark = pytest.mark.integration

PIPELINE = """
import os
from skyloop import pipeline, step


@step(cache=False, retries=1, retry_delay=3)
def flaky(marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("the first attempt fails")
    return 1


@pipeline
def once_more(marker: str):
    return flaky(marker)
"""


class Clock:
    """Records the wall-clock and CPU time of this process at each change of a task."""

    def __init__(self) -> None:
        self.marks: list[tuple[TaskState, float, float]] = []

    def task_changed(self, task: str, state: TaskState, done: int, total: int) -> None:
        self.marks.append((state, time.monotonic(), time.process_time()))

    def run_changed(self, run_id: str, status: str) -> None:
        pass


@pytest.mark.parametrize("backend", ["local", "inline"])
def test_the_orchestrator_sleeps_through_a_retry_delay(tmp_path: Path, settings: Settings, backend: str) -> None:
    target = write(tmp_path / "flaky_pipeline.py", PIPELINE)
    clock = Clock()
    run = skyloop.run(f"{target}:once_more", {"marker": str(tmp_path / "failed-once")}, backend=backend,
                      settings=settings, observer=clock)
    assert run.status == "SUCCEEDED" and run.steps["flaky"].attempts == 2
    # From the first attempt's start to the retry's end: the 3 s delay, and no other work of this process.
    (_, wall_0, cpu_0), (_, wall_1, cpu_1) = clock.marks[0], clock.marks[-1]
    wall, cpu = wall_1 - wall_0, cpu_1 - cpu_0
    assert wall >= 3
    assert cpu < 0.25 * wall, f"the orchestrator used {cpu:.1f}s of CPU in {wall:.1f}s waiting for a retry"


def test_a_huge_backoff_retries_without_overflowing(settings: Settings) -> None:
    # retry_delay=0 with retry_backoff=1e10: the delay of the 40th retry, 0 * 1e10 ** 39, overflowed a float and
    # the error failed every run the orchestrator held.
    @step(cache=False, retries=40, retry_delay=0, retry_backoff=1e10)
    def always_fails(x: int) -> int:
        raise RuntimeError(f"boom {x}")

    @pipeline
    def doomed(x: int = 1):
        return always_fails(x)

    run = skyloop.run(doomed, backend="inline", settings=settings)
    assert run.status == "FAILED" and "boom 1" in (run.error or "")
    assert run.steps["always_fails"].attempts == 41
