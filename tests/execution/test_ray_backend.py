"""The `ray` backend on a real Ray: results, logs, failures, crashes, timeouts, cancels, resources.

One local Ray (2 CPUs, loopback only) serves the whole module: the backend on its own, whole
pipelines, and an orchestrator process (a second driver of the same Ray) killed mid-run and resumed.
Rays of the tests' own are in `test_ray_cluster.py`.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from ray_support import RAY_ENV
from tests_support import collect

from skyloop import Settings, run
from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.backends.base import Backend
from skyloop.execution.backends.ray import RayBackend
from skyloop.execution.backends.ray_task import DriverContext, pickled, run_attempt
from skyloop.execution.loading import load_file_module
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskResult, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.models import Lineage, RunRow, StepRunRow
from skyloop.store.workspace import Workspace

HERE = Path(__file__).parent
STEPS = str(HERE / "ray_steps.py")
SAMPLE = str(HERE / "sample_pipelines.py")
EXAMPLE = str(HERE.parent.parent / "examples" / "train.py")

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def backend(ray_session: ModuleType) -> Iterator[RayBackend]:
    engine = RayBackend(ExecutionSettings())
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def sample() -> ModuleType:
    return load_file_module(SAMPLE)


def make_launch(tmp_path: Path, qualname: str, timeout: float | None = None, resources: Resources | None = None,
                env: dict[str, str] | None = None, **inputs: object) -> TaskLaunch:
    key = f"{qualname}-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name=qualname, step=StepRef(module=STEPS, qualname=qualname),
        inputs={name: Literal_(value) for name, value in inputs.items()}, output_names=["output"],
        multi_output=False, resources=resources or Resources(), timeout=timeout,
        log_path=str(tmp_path / "logs" / f"{key}.log"), artifacts_url=str(tmp_path / "artifacts"), env=env or {},
    )



def run_all(backend: RayBackend, *launches: TaskLaunch) -> list[TaskResult]:
    for launch in launches:
        backend.submit(launch)
    results = collect(backend, len(launches))
    return [results[launch.key] for launch in launches]


def test_without_ray_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'skyloop\[ray\]'"):
        RayBackend(ExecutionSettings()).start()


def test_a_fraction_of_a_cpu_is_refused_for_a_local_ray() -> None:
    # Ray counts whole CPUs: started with 1 for --max-cpus 0.5, it ran twice what the local backend allows.
    with pytest.raises(BackendError, match=r"--max-cpus 0.5 is not a whole number of CPUs, which a local Ray needs; "
                                           r"give 1, or use --backend local"):
        RayBackend(ExecutionSettings(max_cpus=0.5)).start()


@integration
def test_is_a_backend_with_the_cluster_capacity(backend: RayBackend, ray_session: ModuleType) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "ray"
    capacity = backend.capacity()
    assert (capacity.cpus, capacity.gpus, capacity.custom) == (2.0, 0, {})  # no node:* internals
    assert capacity.memory > 0
    started = time.monotonic()
    assert backend.wait(5.0) == []  # nothing runs: no wait
    assert time.monotonic() - started < 0.5


@integration
def test_outputs_go_to_the_store_and_output_to_the_log(backend: RayBackend, tmp_path: Path) -> None:
    small, large, chatty = run_all(backend, make_launch(tmp_path, "add", a=2, b=3),
                                   make_launch(tmp_path, "big", n=5000),
                                   launch := make_launch(tmp_path, "chatty", text="hi"))
    assert [r.state for r in (small, large, chatty)] == [TaskState.SUCCEEDED] * 3, [small, large, chatty]
    store = ArtifactStore(str(tmp_path / "artifacts"))
    assert store.get(small.outputs["output"]) == 5
    ref = large.outputs["output"]
    assert ref.data is None and store.exists(ref.digest)  # a blob written by the worker, not sent back
    assert store.get(ref) == list(range(5000))
    log = Path(launch.log_path).read_text()
    for line in ("print hi", "stderr hi", "fd1 hi", "child hi"):
        assert line in log
    assert small.worker is not None and small.worker.startswith("ray:127.0.0.1:")
    assert int(small.worker.rsplit(":", 1)[1]) != os.getpid()
    assert small.started_at is not None and small.ended_at is not None and small.max_rss


@integration
def test_environment_and_folder_are_put_back_between_attempts(backend: RayBackend, tmp_path: Path) -> None:
    one_cpu = Resources(cpus=2)  # one attempt at a time, so the next one can share the worker
    with_env, moved = run_all(backend, make_launch(tmp_path, "getenv", resources=one_cpu, env={"SKY_X": "1"},
                                                   name="SKY_X"),
                              make_launch(tmp_path, "chdir", resources=one_cpu, path=str(tmp_path)))
    without, cwd = run_all(backend, make_launch(tmp_path, "getenv", resources=one_cpu, name="SKY_X"),
                           make_launch(tmp_path, "cwd", resources=one_cpu))
    store = ArtifactStore(str(tmp_path / "artifacts"))
    # Ray hands one attempt at a time to its most recently used idle worker: all four share it.
    assert len({r.worker for r in (with_env, moved, without, cwd)}) == 1
    assert store.get(with_env.outputs["output"]) == "1"
    assert store.get(without.outputs["output"]) is None
    assert store.get(moved.outputs["output"]) == str(tmp_path)
    assert store.get(cwd.outputs["output"]) != str(tmp_path)


@integration
def test_step_errors_fail_the_attempt_not_the_worker(backend: RayBackend, tmp_path: Path) -> None:
    raised, exited, interrupted = run_all(backend, make_launch(tmp_path, "boom"),
                                          make_launch(tmp_path, "exit_", code=4), make_launch(tmp_path, "interrupt"))
    assert raised.state == exited.state == interrupted.state == TaskState.FAILED
    assert raised.error == "ValueError: boom from step" and "boom from step" in (raised.traceback or "")
    assert exited.error == "SystemExit: 4"
    # Before, Ray took it for a cancel: "TaskCancelledError: ... was cancelled".
    assert interrupted.error == "KeyboardInterrupt: from the step"


@integration
def test_inputs_of_classes_defined_in_a_function_reach_the_step(backend: RayBackend, tmp_path: Path) -> None:
    class Local:  # plain pickle cannot name it; it travels by value, as in a notebook
        pass

    (result,) = run_all(backend, make_launch(tmp_path, "type_of", value=Local()))
    assert result.state == TaskState.SUCCEEDED, result.error
    assert ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"]) == "Local"


@integration
def test_a_dead_worker_is_crashed(backend: RayBackend, tmp_path: Path) -> None:
    (result,) = run_all(backend, make_launch(tmp_path, "leave", code=3))
    assert result.state == TaskState.CRASHED
    assert "died" in (result.error or "")


@integration
def test_timeout_kills_the_task_and_the_next_one_runs(backend: RayBackend, tmp_path: Path) -> None:
    started = time.monotonic()
    (result,) = run_all(backend, make_launch(tmp_path, "sleep", timeout=1.0, seconds=60))
    assert result.state == TaskState.TIMED_OUT
    assert result.error == "timed out after 1s"
    assert time.monotonic() - started < 4
    (after,) = run_all(backend, make_launch(tmp_path, "add", a=1, b=1))
    assert after.state == TaskState.SUCCEEDED


@integration
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_step_that_returns_after_the_kill_reached_its_child_is_stopped_not_succeeded(
        backend: RayBackend, tmp_path: Path, how: str) -> None:
    # Ray's force-cancel kills the step's child first; the step then returns what that left it with. That
    # result came after the stop: the attempt ended as stopped, and nothing it returned is kept.
    launch = make_launch(tmp_path, "child_sleep", timeout=1.0 if how == "timeout" else None, seconds=60)
    backend.submit(launch)
    if how == "cancel":
        assert backend.wait(1.0) == []
        backend.cancel(launch.key)
    result = collect(backend, 1)[launch.key]
    expected = (TaskState.TIMED_OUT, "timed out after 1s") if how == "timeout" else (TaskState.CANCELLED, "cancelled")
    assert (result.state, result.error, result.outputs) == (*expected, {}), result
    (after,) = run_all(backend, make_launch(tmp_path, "add", a=1, b=1))
    assert after.state == TaskState.SUCCEEDED


@integration
def test_cancel_stops_running_and_queued_tasks(backend: RayBackend, tmp_path: Path) -> None:
    whole = Resources(cpus=2)
    running = make_launch(tmp_path, "sleep", resources=whole, seconds=60)
    queued = make_launch(tmp_path, "sleep", resources=whole, seconds=60)
    backend.submit(running)
    backend.submit(queued)
    assert backend.wait(0.5) == []
    started = time.monotonic()
    backend.cancel(queued.key)
    backend.cancel(running.key)
    results = collect(backend, 2)
    assert {r.state for r in results.values()} == {TaskState.CANCELLED}
    assert time.monotonic() - started < 3


@integration
def test_two_steps_of_all_cpus_never_overlap(backend: RayBackend, tmp_path: Path) -> None:
    whole = Resources(cpus=2)
    first, second = run_all(backend, make_launch(tmp_path, "sleep", resources=whole, seconds=0.5),
                            make_launch(tmp_path, "sleep", resources=whole, seconds=0.5))
    assert first.state == second.state == TaskState.SUCCEEDED
    spans = sorted([(first.started_at or 0, first.ended_at or 0), (second.started_at or 0, second.ended_at or 0)])
    assert spans[0][1] <= spans[1][0], spans


@integration
def test_admits_queue_factor_times_its_capacity(backend: RayBackend) -> None:
    admission, capacity = backend.admission(), backend.capacity()
    assert admission.cpus == capacity.cpus * backend.queue_factor == 16.0
    assert admission.memory >= capacity.memory * 7 and admission.gpus == 0


@integration
def test_a_launch_with_a_timeout_waits_for_room_before_its_clock_runs(backend: RayBackend, tmp_path: Path) -> None:
    # Both CPUs busy for 1.5 s: queued in Ray, an attempt with a 1 s timeout would time out before it
    # started. Held by the backend, it goes to Ray (and its clock starts) once a CPU is free; the
    # launch after it waits behind it, so the order holds.
    busy = [make_launch(tmp_path, "sleep", seconds=1.5) for _ in range(2)]
    timed = make_launch(tmp_path, "sleep", timeout=1.0, seconds=0.2)
    after = make_launch(tmp_path, "sleep", seconds=0.0)
    results = run_all(backend, *busy, timed, after)
    assert [r.state for r in results] == [TaskState.SUCCEEDED] * 4, [r.error for r in results]
    first_free = min(r.ended_at or 0 for r in results[:2])
    assert (results[2].started_at or 0) >= first_free - 0.05
    assert (results[3].started_at or 0) >= (results[2].started_at or 0) - 0.05


@integration
def test_a_launch_behind_a_held_one_goes_at_once_into_room_the_held_one_does_not_need(
        backend: RayBackend, tmp_path: Path) -> None:
    # Memory keeps the timed launch waiting (60% of it is taken, it asks for 60% more); the CPU-only launch after
    # it fits beside both at once. Before, it waited behind the held launch: a CPU step idled behind a GPU step.
    memory = int(backend.capacity().memory * 0.6)
    busy = make_launch(tmp_path, "sleep", resources=Resources(cpus=0.5, memory=memory), seconds=1.5)
    timed = make_launch(tmp_path, "sleep", timeout=10.0, resources=Resources(cpus=0.5, memory=memory), seconds=0.0)
    after = make_launch(tmp_path, "sleep", resources=Resources(cpus=0.5), seconds=0.0)
    results = run_all(backend, busy, timed, after)
    assert [r.state for r in results] == [TaskState.SUCCEEDED] * 3, [r.error for r in results]
    assert (results[2].ended_at or 0) < (results[0].ended_at or 0) - 0.5  # ran while `busy` did
    assert (results[1].started_at or 0) >= (results[0].ended_at or 0) - 0.05  # the timed one still waited


@integration
def test_a_held_launch_is_cancelled_at_once(backend: RayBackend, tmp_path: Path) -> None:
    busy = [make_launch(tmp_path, "sleep", seconds=1.0) for _ in range(2)]
    timed = make_launch(tmp_path, "sleep", timeout=5.0, seconds=0.0)
    for launch in (*busy, timed):
        backend.submit(launch)
    started = time.monotonic()
    backend.cancel(timed.key)
    (cancelled,) = backend.wait(0.5)
    assert (cancelled.key, cancelled.state) == (timed.key, TaskState.CANCELLED)
    assert time.monotonic() - started < 0.5
    results = collect(backend, 2)
    assert {r.state for r in results.values()} == {TaskState.SUCCEEDED}


@integration
def test_an_attempt_on_another_node_sends_its_log_back(ray_session: ModuleType, tmp_path: Path) -> None:
    launch = make_launch(tmp_path, "chatty", text="far")
    elsewhere = pickle.dumps(DriverContext(node_id="another-node", sys_path=()))
    answer = ray_session.get(ray_session.remote(run_attempt).remote(pickle.dumps(launch), elsewhere))
    result, tail = pickle.loads(answer)
    assert result.state == TaskState.SUCCEEDED
    assert tail is not None and b"fd1 far" in tail and b"child far" in tail
    assert not Path(launch.log_path).exists()  # the driver's log folder was not written there


def _quick(launch: TaskLaunch, task_name: str | None = None) -> TaskLaunch:
    """The launch as the orchestrator sends one whose step is known to take a millisecond."""
    return replace(launch, estimate=0.001, task_name=task_name or launch.task_name)


@integration
def test_quick_attempts_travel_in_packs_with_their_own_results_and_logs(backend: RayBackend, tmp_path: Path) -> None:
    launches = [_quick(make_launch(tmp_path, "chatty", text=f"n{i}")) for i in range(12)]
    sent = backend.tasks_sent
    results = run_all(backend, *launches)
    assert backend.tasks_sent - sent == 2  # 12 one-CPU attempts on 2 CPUs: two packs of six
    assert [r.state for r in results] == [TaskState.SUCCEEDED] * 12, results
    store = ArtifactStore(str(tmp_path / "artifacts"))
    assert [store.get(r.outputs["output"]) for r in results] == [f"n{i}" for i in range(12)]
    for i, launch in enumerate(launches):
        log = Path(launch.log_path).read_text()
        assert f"print n{i}\n" in log and f"child n{i}\n" in log
        assert f"n{(i + 1) % 12}\n" not in log  # each attempt its own log
    assert all(r.max_rss and r.started_at and r.ended_at for r in results)


@integration
def test_cancelling_one_attempt_of_a_pack_sends_the_others_again(backend: RayBackend, tmp_path: Path) -> None:
    launches = [_quick(make_launch(tmp_path, "sleep", seconds=0.5)) for _ in range(4)]
    for launch in launches:
        backend.submit(launch)
    assert backend.wait(0.2) == []  # two packs of two, each running its first attempt
    sent = backend.tasks_sent
    backend.cancel(launches[0].key)
    results = collect(backend, 4)
    assert results[launches[0].key].state == TaskState.CANCELLED
    assert [results[launch.key].state for launch in launches[1:]] == [TaskState.SUCCEEDED] * 3
    assert backend.tasks_sent - sent == 1  # the other attempt of the cancelled one's pack, on its own


@integration
def test_a_worker_that_dies_takes_its_pack_with_it(backend: RayBackend, tmp_path: Path) -> None:
    launches = [_quick(make_launch(tmp_path, "add", a=1, b=2), "mixed"),
                _quick(make_launch(tmp_path, "leave", code=3), "mixed"),
                _quick(make_launch(tmp_path, "add", a=2, b=2), "mixed"),
                _quick(make_launch(tmp_path, "add", a=3, b=2), "mixed")]
    results = run_all(backend, *launches)
    # Packs of two, in order: the first attempt had ended, but its result died with the worker.
    assert [r.state for r in results] == [TaskState.CRASHED, TaskState.CRASHED, TaskState.SUCCEEDED,
                                          TaskState.SUCCEEDED]
    assert all("died" in (r.error or "") for r in results[:2])


@integration
def test_a_map_of_quick_steps_learns_from_its_units_and_matches_inline(sample: ModuleType, tmp_path: Path) -> None:
    params = {"n": 60, "pause": 0.0}
    on_ray = run(sample.diamond_fanout, params, backend="ray", settings=Settings.for_home(tmp_path / "ray"))
    inline = run(sample.diamond_fanout, params, backend="inline", settings=Settings.for_home(tmp_path / "inline"))
    assert on_ray.status == "SUCCEEDED", on_ray.error
    assert on_ray.outputs == inline.outputs
    assert on_ray.output("work") == [i * i for i in range(60)]
    units = [r for r in _rows(Settings.for_home(tmp_path / "ray"), on_ray.id) if r.task == "work"]
    # The first units go out before any ended, with the default; once three have, the rest are
    # estimated from them (and, being quick, travel in packs).
    sources = {r.estimate_source for r in units}
    assert sources == {"default", "siblings"}
    assert all(r.estimate_seconds is not None and r.estimate_seconds < 1.0 for r in units
               if r.estimate_source == "siblings")


def _rows(settings: Settings, run_id: str) -> list[StepRunRow]:
    workspace = Workspace.open(settings)
    try:
        with workspace.db.session() as session:
            return list(session.query(StepRunRow).filter_by(run_id=run_id).all())
    finally:
        workspace.close()


@integration
def test_pipeline_results_match_inline(ray_session: ModuleType, sample: ModuleType, tmp_path: Path) -> None:
    params = {"n": 8, "pause": 0.05}
    on_ray = run(sample.diamond_fanout, params, backend="ray", settings=Settings.for_home(tmp_path / "ray"))
    inline = run(sample.diamond_fanout, params, backend="inline", settings=Settings.for_home(tmp_path / "inline"))
    assert on_ray.status == "SUCCEEDED", on_ray.error
    assert on_ray.outputs == inline.outputs
    assert on_ray.output("work") == inline.output("work") == [i * i for i in range(8)]
    rows = _rows(Settings.for_home(tmp_path / "ray"), on_ray.id)
    assert rows and all((r.worker or "").startswith("ray:127.0.0.1:") for r in rows)
    assert ray_session.is_initialized()  # the backend did not stop the Ray it found
    # All eight one-CPU units were launched (recorded RUNNING) before any of them ended, though Ray
    # runs two at a time: the backend admits more than its capacity and queues the rest.
    units = [r for r in rows if r.task == "work"]
    assert len(units) == 8
    assert max(r.created_at for r in units) < min(r.ended_at or datetime.max.replace(tzinfo=UTC) for r in units)


@integration
def test_killed_worker_is_retried_and_timeout_ends_the_step(ray_session: ModuleType, sample: ModuleType,
                                                              tmp_path: Path) -> None:
    settings = Settings.for_home(tmp_path / "home")
    markers = {"marker": str(tmp_path / "flaky"), "crash_marker": str(tmp_path / "crash")}
    result = run(sample.retrying, markers, backend="ray", settings=settings)
    assert result.status == "SUCCEEDED", result.error
    assert result.outputs == {"flaky": 2, "crash": "survived"}
    states = {(r.task, r.attempt): r.state for r in _rows(settings, result.id)}
    assert states[("crashes_once", 1)] == "CRASHED" and states[("crashes_once", 2)] == "SUCCEEDED"
    assert states[("flaky", 1)] == "FAILED" and states[("flaky", 2)] == "SUCCEEDED"

    slow = run(sample.timing_out, {"seconds": 60.0}, backend="ray", settings=settings)
    info = slow.steps["too_slow"]
    assert (slow.status, info.state.value) == ("FAILED", "TIMED_OUT")
    assert info.seconds is not None and info.seconds < 10


# -- an orchestrator killed mid-run, resumed by another process -------------------------------------

DRIVER = """\
import sys
from pathlib import Path
from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
address, home, sample, marker = sys.argv[1:5]
settings = Settings.for_home(Path(home))
settings.execution.ray_address = address
markers = {"marker_a": marker + ".a", "marker_b": marker + ".b", "marker_c": marker + ".c"}
run(load_file_module(sample).resumable, {**markers, "seconds": 60.0}, backend="ray", settings=settings)
"""


def _states(home: Path, task: str) -> list[str]:
    workspace = Workspace.open(Settings.for_home(home))
    try:
        with workspace.db.read() as session:
            return [row.state for row in session.query(StepRunRow).filter_by(task=task)]
    finally:
        workspace.close()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@integration
def test_sigkill_of_the_orchestrator_then_resume_on_ray(ray_session: ModuleType, tmp_path: Path) -> None:
    home, marker = tmp_path / "home", str(tmp_path / "m")
    address = ray_session.get_runtime_context().gcs_address
    with (tmp_path / "driver.err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, address, str(home), SAMPLE, marker],
                                env={**os.environ, **RAY_ENV}, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while not Path(marker + ".b.pid").exists():  # the slow middle step runs in a Ray worker
            assert proc.poll() is None, (tmp_path / "driver.err").read_text()
            assert time.monotonic() < deadline, "the slow step never started"
            time.sleep(0.05)
        worker = int(Path(marker + ".b.pid").read_text())
        # The first step's end is committed while the second runs (within FLUSH_SECONDS of it).
        while "SUCCEEDED" not in _states(home, "slow_mark"):
            assert time.monotonic() < deadline, "the first step's end was never committed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Ray kills the tasks of a driver that died: the attempt in flight does not run on unowned.
    deadline = time.monotonic() + 30
    while not _gone(worker):
        assert time.monotonic() < deadline, f"Ray worker {worker} kept running the killed driver's step"
        time.sleep(0.1)
    settings = Settings.for_home(home)
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            (run_id,) = [row.id for row in session.query(RunRow)]
            assert session.get(RunRow, run_id).status == "RUNNING"  # as the killed process left it
    finally:
        workspace.close()

    resumed = run(resume=run_id, settings=settings)  # on the backend recorded with the run: ray

    assert (resumed.id, resumed.status, resumed.backend) == (run_id, "SUCCEEDED", "ray"), resumed.error
    assert resumed.outputs == {"output": 4}
    attempts = sorted((r.task, r.attempt, r.state, (r.worker or "").startswith("ray:127.0.0.1:"))
                      for r in _rows(settings, run_id))
    assert attempts == [
        ("slow_mark", 1, "SUCCEEDED", True),  # finished before the kill: not run again
        ("slow_mark-2", 1, "CRASHED", False),  # in flight when the driver died
        ("slow_mark-2", 2, "SUCCEEDED", True),
        ("slow_mark-3", 1, "SUCCEEDED", True),
    ]
    assert [Path(marker + x).read_text() for x in (".a", ".b", ".c")] == ["x", "xx", "x"]


# -- the example pipeline ---------------------------------------------------------------------------


def _output_digests(settings: Settings, run_id: str) -> dict[tuple[str, int, str], str]:
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            rows = session.query(StepRunRow).filter_by(run_id=run_id, state="SUCCEEDED").all()
            tasks = {r.id: (r.task, r.map_index) for r in rows}
            edges = session.query(Lineage).filter(Lineage.step_run_id.in_(list(tasks)),
                                                  Lineage.direction == "out").all()
            return {(*tasks[e.step_run_id], e.name): e.artifact for e in edges}
    finally:
        workspace.close()


@integration
def test_example_training_pipeline_matches_local(ray_session: ModuleType, tmp_path: Path) -> None:
    example = load_file_module(EXAMPLE)
    params: dict[str, Any] = {"dataset": "iris", "n_estimators": 8, "min_accuracy": 0.5}
    runs = {}
    for name in ("ray", "local"):
        settings = Settings.for_home(tmp_path / name)
        settings.execution.max_cpus = 2
        result = run(example.training_pipeline, params, backend=name, settings=settings)
        assert result.status == "SUCCEEDED", result.error
        runs[name] = (result, _output_digests(settings, result.id))
    (on_ray, ray_digests), (local, local_digests) = runs["ray"], runs["local"]
    assert on_ray.outputs == local.outputs
    assert on_ray.outputs["report"].startswith("best model on iris: accuracy ")
    # Every step output, bit for bit: the split, the four forests (fixed seeds), their scores, the pick.
    assert len(ray_digests) == len(local_digests) >= 14
    assert ray_digests == local_digests


# -- what travels to the workers ---------------------------------------------------------------------

_LOAD_ELSEWHERE = "import pickle, sys; print(repr(pickle.loads(sys.stdin.buffer.read()).value))"


def _load_in_a_fresh_process(data: bytes) -> str:
    """What a process that never saw the pickling one's classes makes of `data` (a Ray worker's view)."""
    done = subprocess.run([sys.executable, "-c", _LOAD_ELSEWHERE], input=data, capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def test_launch_payloads_are_plain_pickles_unless_something_must_go_by_value(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    plain = Literal_({"n": [1, 2.5, "x"]})
    assert pickled(plain) == pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL)
    assert _load_in_a_fresh_process(pickled(plain)) == "{'n': [1, 2.5, 'x']}"

    class Local:  # pickle refuses a local class
        def __repr__(self) -> str:
            return "Local()"

    assert _load_in_a_fresh_process(pickled(Literal_(Local()))) == "Local()"

    # A class of `__main__` (a notebook's, a script's): pickle would name it, and a worker's `__main__`
    # has no such class; it must travel by value.
    main = type("FromMain", (), {"__repr__": lambda self: "FromMain()", "__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "FromMain", main, raising=False)
    pickle.dumps(main())  # pickle itself would take it, by name
    assert _load_in_a_fresh_process(pickled(Literal_(main()))) == "FromMain()"

