"""The scheduler on real processes: packing, priorities across runs, learned durations, agents."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from skyloop import Settings, run
from skyloop.cli.render import show_run
from skyloop.execution.api import submit
from skyloop.execution.loading import load_file_module
from skyloop.store.models import Event, PoolSlotRow, RunRow, StepRunRow
from skyloop.store.workspace import Workspace

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sched() -> ModuleType:
    return load_file_module(HERE / "sched_pipelines.py")


def _rows(settings: Settings, run_id: str | None = None) -> list[StepRunRow]:
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            query = session.query(StepRunRow)
            if run_id:
                query = query.filter_by(run_id=run_id)
            return list(query.all())
    finally:
        ws.close()


def _peak(rows: list[StepRunRow], field: str) -> float:
    points = sorted({r.started_at for r in rows})
    return max(sum(float(r.resources[field]) for r in rows if r.started_at <= t < r.ended_at) for t in points)


@pytest.mark.integration
def test_mixed_requests_never_overcommit_cpus_or_memory(sched: ModuleType, settings: Settings) -> None:
    settings.execution.max_cpus = 2
    settings.execution.max_memory = 512 * 2**20
    result = run(sched.mixed, {"n": 6, "pause": 0.2}, backend="local", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    rows = [r for r in _rows(settings, result.id) if r.state == "SUCCEEDED" and r.task != "items"]
    assert len(rows) == 19
    for r in rows:
        r.resources["memory"] = {"100Mi": 100, "300Mi": 300, "50Mi": 50}.get(str(r.resources["memory"]),
                                                                             r.resources["memory"])
    assert _peak(rows, "cpus") <= 2.0
    assert _peak(rows, "memory") <= 512
    assert _peak(rows, "cpus") > 1.0  # and it did pack work side by side


def _agent(settings: Settings, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env |= env_extra or {}
    env["SKYLOOP_HOME"] = str(settings.home)
    env["SKYLOOP_EXECUTION__AGENT_POLL_SECONDS"] = "0.2"
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "agents.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "skyloop", "agent", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def _wait_for(settings: Settings, run_ids: list[str], timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        ws = Workspace.open(settings)
        try:
            with ws.db.read() as session:
                states = {r.id: r.status for r in session.query(RunRow).filter(RunRow.id.in_(run_ids))}
        finally:
            ws.close()
        if all(s in ("SUCCEEDED", "FAILED", "CANCELLED") for s in states.values()) and len(states) == len(run_ids):
            return states
        assert time.monotonic() < deadline, f"runs did not finish: {states}"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_high_priority_run_submitted_later_starts_first(sched: ModuleType, settings: Settings) -> None:
    low = submit(sched.fan, {"n": 8, "pause": 0.4}, priority=0, settings=settings)
    agent = _agent(settings, "--max-cpus", "1", "--backend", "local")
    try:
        deadline = time.monotonic() + 30
        while not [r for r in _rows(settings, low) if r.task == "tick"]:
            assert time.monotonic() < deadline and agent.poll() is None, "the low-priority run never started"
            time.sleep(0.05)
        high = submit(sched.fan, {"n": 3, "pause": 0.1}, priority=10, settings=settings)
        assert _wait_for(settings, [low, high]) == {low: "SUCCEEDED", high: "SUCCEEDED"}
    finally:
        _stop(agent)
    low_ticks = sorted(r.started_at for r in _rows(settings, low) if r.task == "tick")
    high_ticks = sorted(r.started_at for r in _rows(settings, high) if r.task == "tick")
    # Once the high-priority run was claimed, its steps went before the low run's remaining ones.
    assert high_ticks[-1] < low_ticks[-3], (high_ticks, low_ticks)


@pytest.mark.integration
def test_runs_sharing_a_pool_feed_it_in_the_order_that_keeps_it_busy(settings: Settings) -> None:
    pools = load_file_module(HERE / "pool_pipelines.py")
    settings.execution.max_cpus = 1
    settings.execution.pools = {"trainer": 1}
    for pipe in (pools.fast, pools.slow):  # history: how long each feed takes
        assert run(pipe, {}, backend="local", settings=settings).status == "SUCCEEDED"
    slow = submit(pools.slow, {}, settings=settings)  # first in: FIFO, and per-run ranks, feed it first
    fast = submit(pools.fast, {}, settings=settings)
    agent = _agent(settings, "--max-cpus", "1", "--backend", "local", "--once",
                   env_extra={"SKYLOOP_EXECUTION__POOLS": '{"trainer": 1}'})
    try:
        assert _wait_for(settings, [slow, fast]) == {slow: "SUCCEEDED", fast: "SUCCEEDED"}
    finally:
        _stop(agent)
    started = {(r.run_id, r.task): r.started_at for r in _rows(settings) if r.run_id in (slow, fast)}
    # Fed first, the fast run starts the trainer while the slow run's feed runs.
    assert started[(fast, "feed_fast")] < started[(slow, "feed_slow")] < started[(fast, "post")]
    assert started[(fast, "train")] < started[(slow, "train")]


@pytest.mark.integration
def test_the_pool_order_comes_from_simulating_the_runs_together(settings: Settings) -> None:
    pools = load_file_module(HERE / "pool_pipelines.py")
    settings.execution.max_cpus, settings.execution.max_gpus = 4, 1
    settings.execution.pools = {"trainer": 1}
    for pipe in (pools.fanned, pools.gpu_fed):  # history: how long each feed takes
        assert run(pipe, {}, backend="local", settings=settings).status == "SUCCEEDED"
    hog = submit(pools.hogging, {}, priority=1, settings=settings)
    fanned = submit(pools.fanned, {}, settings=settings)  # first in, and first in Schrage's plan
    gpu_fed = submit(pools.gpu_fed, {}, settings=settings)
    agent = _agent(settings, "--max-cpus", "4", "--max-gpus", "1", "--backend", "local", "--once",
                   env_extra={"SKYLOOP_EXECUTION__POOLS": '{"trainer": 1}'})
    try:
        assert _wait_for(settings, [hog, fanned, gpu_fed]) == dict.fromkeys([hog, fanned, gpu_fed], "SUCCEEDED")
    finally:
        _stop(agent)
    started = {(r.run_id, r.task): r.started_at for r in _rows(settings) if r.run_id in (fanned, gpu_fed)}
    # The GPU-fed run was fed first (its embed beside the hog, ahead of the chunks) and trained first.
    chunks = sorted(at for (run_id, task), at in started.items() if run_id == fanned and task.startswith("chunk"))
    assert started[(gpu_fed, "embed")] <= chunks[1], (started[(gpu_fed, "embed")], chunks)
    assert started[(gpu_fed, "fit")] < started[(fanned, "fit")]


def _owners(settings: Settings, run_ids: list[str]) -> set[str]:
    """The processes that ran `run_ids` (from their adoption events)."""
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            return {e.message.removeprefix("run adopted by ") for e in session.query(Event)
                    .filter(Event.run_id.in_(run_ids), Event.kind == "run.adopted")}
    finally:
        ws.close()


POOLED = {"SKYLOOP_EXECUTION__POOLS": '{"trainer": 1}'}


@pytest.mark.integration
def test_a_pool_of_one_runs_one_member_at_a_time_across_two_agents(settings: Settings) -> None:
    pools = load_file_module(HERE / "pool_pipelines.py")
    run_ids = [submit(pools.fast, {}, settings=settings) for _ in range(4)]
    # One run each at a time: before pools were held in the DB, each agent ran its own trainer.
    agents = [_agent(settings, "--max-runs", "1", "--max-cpus", "1", "--backend", "local", env_extra=POOLED)
              for _ in range(2)]
    try:
        assert _wait_for(settings, run_ids) == dict.fromkeys(run_ids, "SUCCEEDED")
    finally:
        for agent in agents:
            _stop(agent)
    assert len(_owners(settings, run_ids)) == 2  # both agents ran some of them
    trains = sorted((r.started_at, r.ended_at) for r in _rows(settings) if r.task == "train")
    assert len(trains) == 4
    for (_, ended), (started, _) in itertools.pairwise(trains):
        assert started >= ended, trains
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            assert session.query(PoolSlotRow).count() == 0  # each freed at its attempt's end
    finally:
        ws.close()


@pytest.mark.integration
def test_the_pool_slot_of_an_agent_killed_mid_step_does_not_block_the_pool(settings: Settings) -> None:
    pools = load_file_module(HERE / "pool_pipelines.py")
    first_run = submit(pools.fast, {}, settings=settings)
    first = _agent(settings, "--backend", "local", env_extra=POOLED)
    try:
        deadline = time.monotonic() + 30
        while not [r for r in _rows(settings, first_run) if r.task == "train"]:
            assert time.monotonic() < deadline and first.poll() is None, "the trainer never started"
            time.sleep(0.05)
        first.kill()  # holding the pool's one slot
        first.wait()
    finally:
        _stop(first)
    second_run = submit(pools.fast, {}, settings=settings)
    second = _agent(settings, "--backend", "local", "--once", env_extra=POOLED)
    try:
        assert _wait_for(settings, [first_run, second_run], timeout=60) == dict.fromkeys([first_run, second_run],
                                                                                         "SUCCEEDED")
    finally:
        _stop(second)


@pytest.mark.integration
def test_second_run_is_faster_with_learned_durations(sched: ModuleType, settings: Settings) -> None:
    settings.execution.max_cpus = 2
    params = {"n": 6, "pause": 0.3, "seconds": 2.0}
    first = run(sched.critical, params, backend="local", settings=settings)
    second = run(sched.critical, params, backend="local", settings=settings)
    assert first.status == second.status == "SUCCEEDED"
    assert first.steps["slow"].estimate_source == "default"
    assert second.steps["slow"].estimate_source == "history"
    assert second.steps["slow"].estimate == pytest.approx(2.0, abs=0.3)

    def makespan(run_id: str) -> float:
        rows = [r for r in _rows(settings, run_id) if r.task in ("quick", "slow")]
        return (max(r.ended_at for r in rows) - min(r.started_at for r in rows)).total_seconds()

    def slow_start(run_id: str) -> float:
        rows = _rows(settings, run_id)
        begin = min(r.started_at for r in rows if r.task in ("quick", "slow"))
        return next((r.started_at - begin).total_seconds() for r in rows if r.task == "slow")

    timings = {"first": (slow_start(first.id), makespan(first.id)),
               "second": (slow_start(second.id), makespan(second.id))}
    assert timings["second"][0] < 0.2 < timings["first"][0], timings  # the long step now goes first
    assert timings["second"][1] < timings["first"][1] - 0.4, timings


@pytest.mark.integration
def test_two_agents_never_run_a_step_twice(sched: ModuleType, settings: Settings) -> None:
    run_ids = [submit(sched.fan, {"n": 3, "pause": 0.05 * i}, settings=settings) for i in range(6)]
    agents = [_agent(settings, "--max-runs", "2", "--backend", "local") for _ in range(2)]
    try:
        states = _wait_for(settings, run_ids)
    finally:
        for agent in agents:
            _stop(agent)
    assert set(states.values()) == {"SUCCEEDED"}
    rows = [r for r in _rows(settings) if r.run_id in run_ids]
    units = [(r.run_id, r.task, r.map_index) for r in rows]
    assert len(units) == len(set(units)) == 6 * 4  # one attempt per unit: items + 3 ticks
    assert all(r.attempt == 1 for r in rows)


@pytest.mark.integration
def test_runs_of_a_killed_agent_are_adopted_and_finished(sched: ModuleType, settings: Settings) -> None:
    run_id = submit(sched.fan, {"n": 6, "pause": 0.5}, settings=settings)
    first = _agent(settings, "--max-cpus", "1", "--backend", "local")
    try:
        deadline = time.monotonic() + 30
        while len([r for r in _rows(settings, run_id) if r.task == "tick" and r.state == "SUCCEEDED"]) < 2:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        first.kill()
        first.wait()
    finally:
        _stop(first)
    second = _agent(settings, "--backend", "local", "--once")
    try:
        assert _wait_for(settings, [run_id]) == {run_id: "SUCCEEDED"}
    finally:
        _stop(second)
    ticks = [r for r in _rows(settings, run_id) if r.task == "tick"]
    done = {r.map_index for r in ticks if r.state == "SUCCEEDED"}
    assert done == set(range(6))
    # Units that had finished under the first agent were not run again.
    assert len([r for r in ticks if r.state == "SUCCEEDED"]) == 6


SIZED = '''
import time
from skyloop import pipeline, step

@step(cache=False)
def make(n: int) -> list[int]:
    return list(range(n))

@step(cache=False)
def work(xs: list[int]) -> int:
    time.sleep(len(xs) / 100_000)  # time grows with the input's size
    return len(xs)

@pipeline
def sized(n: int = 1000):
    return work(make(n))
'''


def test_a_steps_estimate_is_fitted_to_the_size_of_its_inputs(settings: Settings, tmp_path: Path) -> None:
    file = tmp_path / "sized.py"
    file.write_text(SIZED)
    pipe = load_file_module(file).sized
    seen = []
    for n in (2_000, 4_000, 8_000):  # three sizes of history
        result = run(pipe, {"n": n}, backend="inline", settings=settings)
        assert result.status == "SUCCEEDED", result.error
        seen.append(result.steps["work"].actual or 0.0)
    result = run(pipe, {"n": 16_000}, backend="inline", settings=settings)
    work = result.steps["work"]
    assert work.estimate_source == "history-scaled"
    assert work.estimate is not None and work.estimate > 1.3 * max(seen)  # the median of history would say 0.04 s
    console = Console(record=True, width=120)
    show_run(console, result, as_json=False)
    assert "(by size)" in console.export_text()  # `runs show` says where the figure came from


LICENSED = '''
import time
from skyloop import Resources, pipeline, step, unmapped

@step(cache=False)
def items(n: int) -> list[int]:
    return list(range(n))

@step(cache=False, resources=Resources(cpus=0.5, custom={"license": 1}))
def licensed(x: int, pause: float) -> int:
    time.sleep(pause)
    return x

@pipeline
def seats(n: int = 3, pause: float = 0.3):
    return licensed.map(items(n), unmapped(pause))
'''


def test_custom_resources_declared_in_the_settings_are_never_over_committed(settings: Settings,
                                                                            tmp_path: Path) -> None:
    file = tmp_path / "licensed.py"
    file.write_text(LICENSED)
    pipe = load_file_module(file).seats
    settings.execution.max_cpus = 3
    undeclared = run(pipe, {"n": 3}, backend="local", settings=settings)
    assert undeclared.status == "FAILED"
    assert "lower the request or declare 'license' in the settings' execution.resources" in \
        (undeclared.steps["licensed"].error or "")
    settings.execution.resources = {"license": 1}
    result = run(pipe, {"n": 3}, backend="local", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    rows = [r for r in _rows(settings, result.id) if r.task == "licensed" and r.state == "SUCCEEDED"]
    assert len(rows) == 3
    spans = sorted((r.started_at, r.ended_at) for r in rows)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # one seat: one at once
