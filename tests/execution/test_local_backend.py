"""The `local` backend with real worker processes: results, logs, failures, crashes, timeouts, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from tests_support import collect, gone, run_one

from skyloop.config import ExecutionSettings
from skyloop.execution.backends.base import Backend
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskResult, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore

pytestmark = pytest.mark.integration

STEPS = str(Path(__file__).with_name("steps_for_backend.py"))


def make_launch(tmp_path: Path, qualname: str, timeout: float | None = None,
                env: dict[str, str] | None = None, log: str | None = None, **inputs: object) -> TaskLaunch:
    key = f"{qualname}-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name=qualname, step=StepRef(module=STEPS, qualname=qualname),
        inputs={name: Literal_(value) for name, value in inputs.items()}, output_names=["output"],
        multi_output=False, resources=Resources(), timeout=timeout,
        log_path=str(tmp_path / "logs" / f"{log or key}.log"), artifacts_url=str(tmp_path / "artifacts"),
        env=env or {},
    )




def worker_pid(result: TaskResult) -> int:
    assert result.worker is not None and result.worker.startswith("local:")
    return int(result.worker.split(":")[1])


def wait_for_pid(pid_file: Path, limit: float = 20.0) -> int:
    deadline = time.monotonic() + limit
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, f"{pid_file} was not written in {limit}s"
        time.sleep(0.02)
    return int(pid_file.read_text())


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    pool = LocalBackend(ExecutionSettings(max_workers=2))
    pool.start()
    yield pool
    pool.shutdown()


def test_is_a_backend_with_the_configured_capacity() -> None:
    pool = LocalBackend(ExecutionSettings(max_cpus=3, max_memory=2**30, max_gpus=1))
    assert isinstance(pool, Backend)
    assert pool.name == "local"
    assert pool.capacity() == Resources(cpus=3, memory=2**30, gpus=1)
    assert pool.max_workers == 3
    default = LocalBackend(ExecutionSettings()).capacity()
    assert default.cpus == os.cpu_count() and default.memory == psutil.virtual_memory().total


def test_wait_sleeps_out_its_timeout_when_nothing_runs(backend: LocalBackend) -> None:
    # Nothing can end before the caller acts again (say, at the end of a retry delay): no spinning.
    started, cpu = time.monotonic(), time.process_time()
    assert backend.wait(0.5) == []
    assert time.monotonic() - started >= 0.5
    assert time.process_time() - cpu < 0.25


def test_step_result_is_stored(backend: LocalBackend, tmp_path: Path) -> None:
    result = run_one(backend, make_launch(tmp_path, "add", a=2, b=3))
    assert result.state == TaskState.SUCCEEDED, result.error
    assert ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"]) == 5
    assert result.started_at is not None and result.ended_at is not None
    assert result.max_rss is not None and result.max_rss > 10 * 2**20


def test_warm_workers_are_reused(backend: LocalBackend, tmp_path: Path) -> None:
    first = run_one(backend, make_launch(tmp_path, "pid"))
    second = run_one(backend, make_launch(tmp_path, "pid"))
    store = ArtifactStore(str(tmp_path / "artifacts"))
    assert worker_pid(first) == worker_pid(second) == store.get(first.outputs["output"])


def test_output_of_python_fds_and_child_processes_lands_in_the_log(backend: LocalBackend, tmp_path: Path) -> None:
    first = run_one(backend, make_launch(tmp_path, "chatty", log="chatty", text="one"))
    second = run_one(backend, make_launch(tmp_path, "chatty", log="chatty", text="two"))
    other = run_one(backend, make_launch(tmp_path, "chatty", log="other", text="three"))
    assert {first.state, second.state, other.state} == {TaskState.SUCCEEDED}
    log = (tmp_path / "logs" / "chatty.log").read_text()
    for text in ("one", "two"):  # appended, from print, stderr, os.write(1) and a child process
        for source in ("print", "stderr", "fd1", "child"):
            assert f"{source} {text}\n" in log
    assert "three" not in log


def test_a_quiet_step_leaves_no_log_file_and_one_that_prints_does(backend: LocalBackend, tmp_path: Path) -> None:
    launches = [make_launch(tmp_path, "noop"), make_launch(tmp_path, "chatty", text="hi"),
                make_launch(tmp_path, "noop"), make_launch(tmp_path, "noop")]
    results = [run_one(backend, launch) for launch in launches]
    assert {r.state for r in results} == {TaskState.SUCCEEDED}
    quiet = [Path(launch.log_path) for launch in launches if launch.task_name == "noop"]
    assert not any(path.exists() for path in quiet)
    loud = Path(launches[1].log_path)
    assert "print hi\n" in loud.read_text()
    # Nothing else there but each worker's one spare file, named as the next attempt's log when it starts.
    others = {p.name for p in (tmp_path / "logs").iterdir()} - {loud.name}
    assert others <= {f".spare-{worker_pid(r)}" for r in results} and others


def test_a_log_is_there_while_its_step_runs_and_after_its_worker_died(backend: LocalBackend, tmp_path: Path) -> None:
    running = make_launch(tmp_path, "say_then_sleep", text="still going", seconds=30.0)
    backend.submit(running)
    deadline = time.monotonic() + 10
    while "still going" not in (Path(running.log_path).read_text() if Path(running.log_path).exists() else ""):
        assert time.monotonic() < deadline, "the running step's output never showed in its log"
        time.sleep(0.05)
    backend.cancel(running.key)
    assert collect(backend, 1)[running.key].state == TaskState.CANCELLED
    dead = make_launch(tmp_path, "say_then_leave", text="last words", code=3)
    assert run_one(backend, dead).state == TaskState.CRASHED
    assert Path(dead.log_path).read_text() == "last words\n"


def test_a_worker_killed_while_idle_leaves_no_spare_log_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    pool = LocalBackend(ExecutionSettings(max_workers=1))
    try:
        pid = worker_pid(run_one(pool, make_launch(tmp_path, "noop")))
        spare = logs / f".spare-{pid}"
        assert spare.exists()  # kept to be named as the worker's next log
        os.kill(pid, signal.SIGKILL)  # idle, as the kernel's OOM killer may pick it
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead (and left for the pool to reap)
        after = run_one(pool, make_launch(tmp_path, "noop"))  # the pool finds it dead, reaps it, starts another
        assert after.state == TaskState.SUCCEEDED and worker_pid(after) != pid
        assert not spare.exists()
        # Something wrote to the spare after the step ended: that text is the step's log. (Not a process the
        # step left: those end with their attempt. One outside the worker's tree that got the file, say.)
        late = make_launch(tmp_path, "noop")
        pid = worker_pid(run_one(pool, late))
        spare = logs / f".spare-{pid}"
        with spare.open("a") as fh:
            fh.write("said late\n")
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    finally:
        pool.shutdown()
    assert Path(late.log_path).read_text() == "said late\n"
    assert sorted(p.name for p in logs.iterdir()) == [Path(late.log_path).name]


def test_env_applies_to_one_task_only(backend: LocalBackend, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    with_env = run_one(backend, make_launch(tmp_path, "getenv", env={"SKYLOOP_T": "on"}, name="SKYLOOP_T"))
    without = run_one(backend, make_launch(tmp_path, "getenv", name="SKYLOOP_T"))
    assert store.get(with_env.outputs["output"]) == "on"
    assert store.get(without.outputs["output"]) is None


@pytest.mark.parametrize(("qualname", "inputs", "error"), [
    ("boom", {}, "ValueError: boom from step"),
    ("exit_", {"code": 4}, "SystemExit: 4"),
])
def test_step_errors_fail_the_task_and_keep_the_worker(backend: LocalBackend, tmp_path: Path, qualname: str,
                                                        inputs: dict[str, Any], error: str) -> None:
    failed = run_one(backend, make_launch(tmp_path, qualname, **inputs))
    assert failed.state == TaskState.FAILED
    assert failed.error == error
    assert failed.traceback is not None and qualname in failed.traceback
    after = run_one(backend, make_launch(tmp_path, "noop"))
    assert after.state == TaskState.SUCCEEDED and worker_pid(after) == worker_pid(failed)


def test_a_step_changing_folder_does_not_move_the_next_one(backend: LocalBackend, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    moved = run_one(backend, make_launch(tmp_path, "chdir", path=str(tmp_path)))
    after = run_one(backend, make_launch(tmp_path, "cwd"))
    assert worker_pid(moved) == worker_pid(after)
    assert store.get(moved.outputs["output"]) == str(tmp_path)
    assert store.get(after.outputs["output"]) == os.getcwd()


def test_launches_that_cannot_travel_fail_cleanly(backend: LocalBackend, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    unpicklable = run_one(backend, make_launch(tmp_path, "identity", value=lambda: 1))
    assert unpicklable.state == TaskState.FAILED
    assert unpicklable.error is not None and unpicklable.error.startswith("cannot pass the launch to a worker")

    only_here = ModuleType("skyloop_only_in_the_parent")
    only_here.Thing = type("Thing", (), {"__module__": only_here.__name__})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, only_here.__name__, only_here)
    unreadable = run_one(backend, make_launch(tmp_path, "identity", value=only_here.Thing()))
    assert unreadable.state == TaskState.FAILED
    assert unreadable.error is not None and "ModuleNotFoundError" in unreadable.error
    after = run_one(backend, make_launch(tmp_path, "noop"))
    assert after.state == TaskState.SUCCEEDED and worker_pid(after) == worker_pid(unreadable)


def test_a_dying_worker_is_reported_and_replaced(backend: LocalBackend, tmp_path: Path) -> None:
    crashed = run_one(backend, make_launch(tmp_path, "leave", code=3))
    pid = worker_pid(crashed)
    assert crashed.state == TaskState.CRASHED
    assert crashed.error == f"worker process {pid} died with exit code 3"
    assert gone(pid, within=0)
    after = run_one(backend, make_launch(tmp_path, "add", a=1, b=1))
    assert after.state == TaskState.SUCCEEDED and worker_pid(after) != pid


def test_a_killed_worker_names_the_signal(backend: LocalBackend, tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    launch = make_launch(tmp_path, "sleep_writing_pid", seconds=30, pid_file=str(pid_file))
    backend.submit(launch)
    pid = wait_for_pid(pid_file)
    os.kill(pid, signal.SIGKILL)
    result = collect(backend, 1)[launch.key]
    assert result.state == TaskState.CRASHED
    assert result.error == f"worker process {pid} died with exit code -9 (signal SIGKILL)"


def test_a_task_past_its_timeout_is_killed_with_its_children(backend: LocalBackend, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    result = run_one(backend, make_launch(tmp_path, "sleep_with_child", timeout=0.5, seconds=30,
                                          pid_file=str(pid_file)))
    assert result.state == TaskState.TIMED_OUT
    assert result.error == "timed out after 0.5s"
    assert time.monotonic() - started < 10
    assert gone(worker_pid(result), within=0)
    assert gone(int(pid_file.read_text()))


def test_cancel_drops_queued_and_kills_running_tasks(backend: LocalBackend, tmp_path: Path) -> None:
    running = [make_launch(tmp_path, "sleep", seconds=30) for _ in range(backend.max_workers)]
    queued = make_launch(tmp_path, "noop")
    for launch in [*running, queued]:
        backend.submit(launch)
    backend.cancel(queued.key)
    assert [r.state for r in backend.wait(0)] == [TaskState.CANCELLED]
    pids = backend.pids()
    for launch in running:
        backend.cancel(launch.key)
    results = collect(backend, len(running), limit=5)
    assert {r.state for r in results.values()} == {TaskState.CANCELLED}
    assert all(gone(pid, within=0) for pid in pids)
    backend.cancel("no-such-task")  # a no-op
    assert backend.wait(0) == []


def test_more_launches_than_workers_queue_without_overlap(backend: LocalBackend, tmp_path: Path) -> None:
    assert backend.max_workers == 2
    for _ in range(4):
        backend.submit(make_launch(tmp_path, "sleep", seconds=0.3))
    assert len(backend.pids()) == 2
    results = collect(backend, 4)
    assert {r.state for r in results.values()} == {TaskState.SUCCEEDED}
    spans = [(r.started_at, r.ended_at) for r in results.values()]
    for start, _ in spans:
        assert start is not None
        overlapping = sum(1 for s, e in spans if s is not None and e is not None and s <= start < e)
        assert overlapping <= 2
    assert len({r.worker for r in results.values()}) == 2


def test_workers_see_the_parents_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"skyloop_test_mod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    launch = make_launch(tmp_path, "add", x=2)
    launch.step = StepRef(module=module, qualname="triple")
    with LocalBackend(ExecutionSettings(max_workers=1)) as pool:
        result = run_one(pool, launch)
    assert result.state == TaskState.SUCCEEDED, result.error
    assert ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"]) == 6


def test_a_worker_keeps_the_gpus_of_its_first_task(tmp_path: Path) -> None:
    def pid_with(devices: str) -> int:
        result = run_one(pool, make_launch(tmp_path, "pid", env={"CUDA_VISIBLE_DEVICES": devices}))
        return worker_pid(result)

    with LocalBackend(ExecutionSettings(max_workers=1)) as pool:
        first = pid_with("0")
        assert pid_with("0") == first
        second = pid_with("1")  # CUDA in `first` may already be bound to device 0
        assert second != first and gone(first, within=0)
        assert pid_with("1") == second


def test_memory_peak_is_measured_per_task(backend: LocalBackend, tmp_path: Path) -> None:
    big = run_one(backend, make_launch(tmp_path, "allocate", megabytes=200))
    small = run_one(backend, make_launch(tmp_path, "noop"))
    assert big.max_rss is not None and big.max_rss >= 200 * 2**20
    if sys.platform == "linux" and worker_pid(big) == worker_pid(small):
        assert small.max_rss is not None and small.max_rss < big.max_rss - 150 * 2**20


def test_shutdown_reaps_every_worker(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children()}
    pool = LocalBackend(ExecutionSettings(max_workers=2))
    pool.start()
    pool.submit(make_launch(tmp_path, "sleep", seconds=30))
    pool.submit(make_launch(tmp_path, "noop"))
    collect(pool, 1)
    pids = pool.pids()
    assert len(pids) == 2
    started = time.monotonic()
    pool.shutdown()
    pool.shutdown()
    assert time.monotonic() - started < 5
    assert {p.pid for p in psutil.Process().children()} == before
    assert pool.pids() == [] and pool.wait(0) == []


PARENT = """
import sys, time
from skyloop.config import ExecutionSettings
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import Literal_, TaskLaunch
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources

backend = LocalBackend(ExecutionSettings(max_workers=2))
for i in range(2):
    backend.submit(TaskLaunch(
        key=f"t{{i}}", task_name="sleep", step=StepRef(module={steps!r}, qualname="sleep_with_child"),
        inputs={{"seconds": Literal_(60), "pid_file": Literal_(f"{tmp}/child{{i}}.pid")}},
        output_names=["output"], multi_output=False, resources=Resources(), timeout=None,
        log_path=f"{tmp}/t{{i}}.log", artifacts_url="{tmp}/artifacts"))
print(*backend.pids(), flush=True)
time.sleep(120)
"""


IDLE_PARENT = """
import time
from skyloop.config import ExecutionSettings
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import TaskLaunch
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources

backend = LocalBackend(ExecutionSettings(max_workers=1))
backend.submit(TaskLaunch(
    key="quiet", task_name="noop", step=StepRef(module={steps!r}, qualname="noop"), inputs={{}},
    output_names=["output"], multi_output=False, resources=Resources(), timeout=None,
    log_path="{tmp}/logs/quiet.log", artifacts_url="{tmp}/artifacts"))
while not backend.wait(30):
    pass
print(*backend.pids(), flush=True)
time.sleep(120)
"""


def test_an_idle_worker_removes_its_spare_log_file_when_the_orchestrator_dies(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(IDLE_PARENT.format(steps=STEPS, tmp=tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 1
        spare = tmp_path / "logs" / f".spare-{workers[0]}"
        assert spare.exists()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert gone(workers[0], within=5), "the worker outlived its orchestrator"
        assert not spare.exists()
        assert list((tmp_path / "logs").iterdir()) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:
            if not gone(pid, within=0):
                os.kill(pid, signal.SIGKILL)
        if parent.stdout is not None:
            parent.stdout.close()


def test_workers_exit_when_the_orchestrator_dies(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT.format(steps=STEPS, tmp=tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
        child_files = [tmp_path / f"child{i}.pid" for i in range(2)]
        deadline = time.monotonic() + 20
        while not all(f.exists() and f.read_text() for f in child_files):  # both steps are running
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        children = [int(f.read_text()) for f in child_files]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for pid in [*workers, *children]:
            assert gone(pid, within=5), f"process {pid} outlived its orchestrator"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
