"""The run loop on real backends: DAG shapes, caching, retries, timeouts, crashes, resources."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import select

from skyloop import Resources, Settings, pipeline, run, step
from skyloop.errors import NotFound
from skyloop.execution import orchestrator as run_loop
from skyloop.execution.api import prepare
from skyloop.execution.backends.inline import InlineBackend
from skyloop.execution.loading import load_file_module
from skyloop.execution.orchestrator import FLUSH_SECONDS, Orchestrator
from skyloop.execution.tasks import TaskLaunch, TaskResult
from skyloop.store.db import Database
from skyloop.store.models import Event, StepRunRow
from skyloop.store.workspace import Workspace

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sample() -> ModuleType:
    return load_file_module(HERE / "sample_pipelines.py")


def _rows(settings: Settings, run_id: str) -> list[StepRunRow]:
    ws = Workspace.open(settings)
    with ws.db.session() as session:
        return list(session.query(StepRunRow).filter_by(run_id=run_id).all())


@pytest.mark.integration
def test_diamond_and_fanout_on_local_never_overcommit(sample: ModuleType, settings: Settings) -> None:
    settings.execution.max_cpus = 2
    result = run(sample.diamond_fanout, {"n": 20, "pause": 0.15}, backend="local", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    assert result.steps["work"].units == 20
    squares = sum(i * i for i in range(20))
    assert result.outputs["output"] == squares + sum(range(20)) * 1000 + 19
    assert result.output("work") == [i * i for i in range(20)]

    # Every attempt's recorded interval holds its resources; at no instant may they exceed 2 cpus.
    rows = [r for r in _rows(settings, result.id) if r.state == "SUCCEEDED"]
    points = sorted({r.started_at for r in rows} | {r.ended_at for r in rows})
    peak = 0.0
    for t in points:
        live = [r for r in rows if r.started_at <= t < r.ended_at]
        peak = max(peak, sum(r.resources["cpus"] for r in live))
    assert 1.0 < peak <= 2.0, peak  # ran in parallel, within the limit


def test_a_map_over_an_empty_list_succeeds_with_a_row_that_says_so(settings: Settings) -> None:
    fan = load_file_module(HERE / "sched_pipelines.py").fan
    result = run(fan, {"n": 0, "pause": 0.0}, backend="inline", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    assert (result.steps["tick"].state.value, result.steps["tick"].attempts) == ("SUCCEEDED", 1)
    assert result.outputs["output"] == []
    (row,) = [r for r in _rows(settings, result.id) if r.task == "tick"]
    assert (row.state, row.error) == ("SUCCEEDED", "mapped over an empty list: no unit to run")


@pytest.mark.integration
def test_rerun_is_all_cached_and_runs_nothing(sample: ModuleType, settings: Settings) -> None:
    first = run(sample.diamond_fanout, {"n": 6, "pause": 0.0}, backend="local", settings=settings)
    second = run(sample.diamond_fanout, {"n": 6, "pause": 0.0}, backend="local", settings=settings)
    assert first.status == second.status == "SUCCEEDED"
    assert {s.state.value for s in second.steps.values()} == {"CACHED"}
    assert second.outputs == first.outputs
    assert all(not info.log_paths for info in second.steps.values())  # nothing was launched
    cached = _rows(settings, second.id)
    assert all(r.cached_from for r in cached)
    # A changed parameter misses the cache only where it flows.
    third = run(sample.diamond_fanout, {"n": 6, "pause": 0.001}, backend="local", settings=settings)
    states = {name: s.state.value for name, s in third.steps.items()}
    assert states == {"source": "CACHED", "left": "CACHED", "right": "CACHED", "join": "CACHED",
                      "work": "SUCCEEDED", "collect": "CACHED"}  # equal squares -> same collect inputs


@pytest.mark.integration
def test_condition_skips_and_runs(sample: ModuleType, settings: Settings) -> None:
    ran = run(sample.gated, {"n": 3, "threshold": 20}, backend="inline", settings=settings)
    assert ran.steps["describe"].state.value == "SUCCEEDED"
    assert ran.outputs == {"output": "value=3"}
    skipped = run(sample.gated, {"n": 1, "threshold": 20}, backend="inline", settings=settings)
    assert skipped.status == "SUCCEEDED"
    assert skipped.steps["describe"].state.value == "SKIPPED"
    assert skipped.outputs == {"output": None}  # what the skipped step would have returned
    with pytest.raises(NotFound, match="has no outputs"):
        skipped.output("describe")


@pytest.mark.integration
def test_retries_after_failure_and_worker_crash(sample: ModuleType, settings: Settings, tmp_path: Path) -> None:
    result = run(sample.retrying, {"marker": str(tmp_path / "flaky"), "crash_marker": str(tmp_path / "crash")},
                 backend="local", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    assert result.outputs == {"flaky": 2, "crash": "survived"}
    states = {(r.task, r.attempt): r.state for r in _rows(settings, result.id)}
    assert states[("flaky", 1)] == "FAILED" and states[("flaky", 2)] == "SUCCEEDED"
    assert states[("crashes_once", 1)] == "CRASHED" and states[("crashes_once", 2)] == "SUCCEEDED"
    ws = Workspace.open(settings)
    with ws.db.session() as session:
        kinds = [e.kind for e in session.query(Event).filter_by(run_id=result.id)]
    assert kinds.count("step.retry") == 2


@pytest.mark.integration
def test_timeout_kills_the_step(sample: ModuleType, settings: Settings) -> None:
    result = run(sample.timing_out, {"seconds": 30.0}, backend="local", settings=settings)
    assert result.status == "FAILED"
    info = result.steps["too_slow"]
    assert info.state.value == "TIMED_OUT"
    assert info.seconds is not None and info.seconds < 10
    assert "timed out" in (info.error or "")


@pytest.mark.integration
def test_failure_stops_dependents_but_not_independent_branches(sample: ModuleType, settings: Settings) -> None:
    result = run(sample.partly_failing, {"n": 3}, backend="local", settings=settings)
    assert result.status == "FAILED"
    states = {n: s.state.value for n, s in result.steps.items()}
    assert states["boom"] == "FAILED"
    assert states["after_boom"] == "UPSTREAM_FAILED"
    assert states["right"] == "SUCCEEDED"
    assert "ValueError: bad value 3" in (result.steps["boom"].error or "")
    assert "boom" in (result.error or "")


def test_request_beyond_capacity_fails_with_the_numbers(sample: ModuleType, settings: Settings) -> None:
    settings.execution.max_cpus = 2
    result = run(sample.too_big, backend="local", settings=settings)
    assert result.status == "FAILED"
    assert "64" in (result.steps["greedy"].error or "") and "--max-cpus" in (result.error or "")


@pytest.mark.integration
def test_steps_defined_in_a_notebook_run_on_local_workers(settings: Settings) -> None:
    factor = 7  # closed over: only pickling by value can carry it to a worker

    @step(resources=Resources(cpus=0.5))
    def times(x: int) -> int:
        return x * factor

    @pipeline
    def nb(x: int = 3):
        return times(x)

    result = run(nb, {"x": 6}, backend="local", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    assert result.outputs == {"output": 42}


def test_pipeline_logs_are_captured_per_attempt(sample: ModuleType, settings: Settings, tmp_path: Path) -> None:
    @step
    def chatty(n: int) -> int:
        print(f"hello from the step {n}")
        return n

    @pipeline
    def talk(n: int = 5):
        return chatty(n)

    result = run(talk, backend="inline", settings=settings)
    assert "hello from the step 5" in result.logs("chatty")


class _RowProbe(InlineBackend):
    """The inline backend, noting the state of each attempt's row when it is submitted and when it ends.

    Each attempt "runs" for `seconds` after its submit: `wait` returns nothing before then (sleeping
    at most its timeout, as a real backend blocks), so the orchestrator may commit in between.
    """

    def __init__(self, db: Database, die_with_driver: bool, seconds: float = 0.0) -> None:
        super().__init__()
        self.db, self.attempts_die_with_driver, self.seconds = db, die_with_driver, seconds
        self.seen: list[tuple[str, str | None]] = []
        self._due: list[tuple[float, TaskLaunch]] = []

    def _state(self, key: str) -> str | None:
        with self.db.read() as session:
            row = session.get(StepRunRow, key)
            return None if row is None else row.state

    def submit(self, launch: TaskLaunch) -> None:
        self.seen.append(("submit", self._state(launch.key)))
        self._due.append((time.monotonic() + self.seconds, launch))

    def wait(self, timeout: float) -> list[TaskResult]:
        if self._due and self._due[0][0] > time.monotonic():
            time.sleep(max(0.0, min(timeout, self._due[0][0] - time.monotonic())))
        while self._due and self._due[0][0] <= time.monotonic():
            launch = self._due.pop(0)[1]
            self.seen.append(("end", self._state(launch.key)))
            super().submit(launch)
        return super().wait(0.0)


def _probe_chain(settings: Settings, backend: _RowProbe, x: int = 0) -> None:
    @step
    def plus_one(x: int) -> int:
        return x + 1

    @pipeline
    def chain(x: int = 0):
        return plus_one(plus_one(plus_one(x)))

    workspace = Workspace.open(settings)
    orchestrator = Orchestrator(settings, workspace.db, workspace.store, backend)
    try:
        run_id = orchestrator.start(prepare(chain, {"x": x}))
        assert orchestrator.finished[run_id] == ("SUCCEEDED", None)
        with workspace.db.read() as session:
            states = session.scalars(select(StepRunRow.state).where(StepRunRow.run_id == run_id)).all()
        assert states == ["SUCCEEDED"] * 3
    finally:
        orchestrator.close()
        workspace.close()


def test_running_rows_are_committed_before_launch(settings: Settings) -> None:
    backend = _RowProbe(Workspace.open(settings).db, die_with_driver=False)
    _probe_chain(settings, backend)
    assert backend.seen == [("submit", "RUNNING"), ("end", "RUNNING")] * 3


def test_where_attempts_die_with_the_driver_rows_are_committed_in_groups(settings: Settings,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # An attempt that runs longer than FLUSH_SECONDS is RUNNING in the DB while it runs.
    slow = _RowProbe(Workspace.open(settings).db, die_with_driver=True, seconds=FLUSH_SECONDS * 10)
    _probe_chain(settings, slow)
    assert slow.seen == [("submit", None), ("end", "RUNNING")] * 3
    # Launches go before their rows: quick attempts are inserted and ended in one commit, not one each
    # (here the run's end, with a flush interval no turn reaches).
    monkeypatch.setattr(run_loop, "FLUSH_SECONDS", 60.0)
    quick = _RowProbe(Workspace.open(settings).db, die_with_driver=True)
    _probe_chain(settings, quick, x=10)
    assert quick.seen == [("submit", None), ("end", None)] * 3


def test_a_long_lived_orchestrator_forgets_every_attempt_that_ended(settings: Settings, tmp_path: Path) -> None:
    # The agent's shape: one orchestrator, run after run. An ended attempt still counted as running
    # by the queue would keep its pool slot (here the pool's only one) and block the next run.
    settings.execution.pools = {"one": 1}
    marker = tmp_path / "failed-once"

    @step(pool="one", retries=1)
    def flaky(x: int) -> int:
        if not marker.exists():
            marker.write_text("1")
            raise RuntimeError("the first attempt fails")
        return x * 2

    @step(pool="one")
    def double(x: int) -> int:
        return x * 2

    @pipeline
    def twice(x: int = 1):
        return double(flaky(x))

    workspace = Workspace.open(settings)
    orchestrator = Orchestrator(settings, workspace.db, workspace.store, InlineBackend())
    try:
        for x in (1, 2):
            run_id = orchestrator.start(prepare(twice, {"x": x}))
            assert orchestrator.finished[run_id] == ("SUCCEEDED", None)
            assert orchestrator.queue.running == [] and len(orchestrator.queue) == 0
        with workspace.db.read() as session:
            states = session.scalars(select(StepRunRow.state).where(StepRunRow.task == "flaky")).all()
        assert sorted(states) == ["FAILED", "SUCCEEDED", "SUCCEEDED"]  # the retry, then the second run
    finally:
        orchestrator.close()
        workspace.close()


def test_runs_sharing_a_pool_with_a_step_beyond_capacity_fail_that_run_alone(settings: Settings) -> None:
    # The pool plan simulates the held runs together; a step no machine here can run must not stop
    # that (the simulator refuses it), only fail its own run with the numbers, as without a pool.
    settings.execution.pools = {"one": 1}

    @step(pool="one")
    def fit(x: int) -> int:
        return x + 1

    @step(resources=Resources(cpus=10_000))
    def huge(x: int) -> int:
        return x

    @pipeline
    def fine(x: int = 1):
        return fit(fit(x))

    @pipeline
    def too_big(x: int = 1):
        return fit(huge(fit(x)))

    workspace = Workspace.open(settings)
    orchestrator = Orchestrator(settings, workspace.db, workspace.store, InlineBackend())
    try:
        good = orchestrator.create(prepare(fine, {}))
        bad = orchestrator.create(prepare(too_big, {}))
        orchestrator.drive_until_done(good)
        orchestrator.drive_until_done(bad)
        assert orchestrator.finished[good] == ("SUCCEEDED", None)
        status, error = orchestrator.finished[bad]
        assert status == "FAILED" and error is not None and "10000" in error.replace(",", "")
    finally:
        orchestrator.close()


def test_the_scheduling_settings_reach_the_policy(settings: Settings) -> None:
    settings.execution.fair_share_seconds, settings.execution.aging_seconds = 30.0, 45.0
    workspace = Workspace.open(settings)
    orchestrator = Orchestrator(settings, workspace.db, workspace.store, InlineBackend())
    try:
        assert (orchestrator.config.fair_share_seconds, orchestrator.config.aging_seconds) == (30.0, 45.0)
    finally:
        orchestrator.close()
        workspace.close()
