"""The `ray` backend on a real Ray: results, logs, failures, crashes, timeouts, cancels, resources.

One local Ray (2 CPUs, loopback only) serves the whole module; one more test starts a separate head
with `ray start` and runs a pipeline against it by address from a subprocess (a process can only be
connected to one Ray at a time), then stops exactly the processes of that head, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from skyloop import Settings, run
from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.backends.base import Backend
from skyloop.execution.backends.ray import RayBackend
from skyloop.execution.backends.ray_task import DriverContext, run_attempt
from skyloop.execution.loading import load_file_module
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskResult, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.models import StepRunRow
from skyloop.store.workspace import Workspace

HERE = Path(__file__).parent
STEPS = str(HERE / "ray_steps.py")
SAMPLE = str(HERE / "sample_pipelines.py")
# Every Ray listener on 127.0.0.1, and no usage report: set before Ray starts (and before `import ray`).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_session() -> Iterator[ModuleType]:
    """One local Ray for the module: 2 CPUs, a small object store, nothing but loopback."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():
            patch.setenv(name, value)
        ray = pytest.importorskip("ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=100 * 2**20, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


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


def collect(backend: RayBackend, count: int, limit: float = 30.0) -> dict[str, TaskResult]:
    results: dict[str, TaskResult] = {}
    deadline = time.monotonic() + limit
    while len(results) < count:
        assert time.monotonic() < deadline, f"only {len(results)} of {count} results after {limit}s"
        for result in backend.wait(deadline - time.monotonic()):
            results[result.key] = result
    return results


def run_all(backend: RayBackend, *launches: TaskLaunch) -> list[TaskResult]:
    for launch in launches:
        backend.submit(launch)
    results = collect(backend, len(launches))
    return [results[launch.key] for launch in launches]


def test_without_ray_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'skyloop\[ray\]'"):
        RayBackend(ExecutionSettings()).start()


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
    raised, exited = run_all(backend, make_launch(tmp_path, "boom"), make_launch(tmp_path, "exit_", code=4))
    assert raised.state == exited.state == TaskState.FAILED
    assert raised.error == "ValueError: boom from step" and "boom from step" in (raised.traceback or "")
    assert exited.error == "SystemExit: 4"


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
def test_an_attempt_on_another_node_sends_its_log_back(ray_session: ModuleType, tmp_path: Path) -> None:
    launch = make_launch(tmp_path, "chatty", text="far")
    elsewhere = pickle.dumps(DriverContext(node_id="another-node", sys_path=()))
    answer = ray_session.get(ray_session.remote(run_attempt).remote(pickle.dumps(launch), elsewhere))
    result, tail = pickle.loads(answer)
    assert result.state == TaskState.SUCCEEDED
    assert tail is not None and b"fd1 far" in tail and b"child far" in tail
    assert not Path(launch.log_path).exists()  # the driver's log folder was not written there


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


# -- Ray processes of their own: run in subprocesses (a process connects to one Ray at a time) -----

OWN_RAY = """\
import json, os, sys, time, uuid
import psutil
from skyloop.config import ExecutionSettings
from skyloop.execution.backends.ray import RayBackend
from skyloop.execution.tasks import Literal_, TaskLaunch
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
steps, folder = sys.argv[1:3]
backend = RayBackend(ExecutionSettings(max_cpus=1))
backend.start()
cpus = backend.capacity().cpus
launch = TaskLaunch(key=uuid.uuid4().hex, task_name="add", step=StepRef(module=steps, qualname="add"),
                    inputs={"a": Literal_(1), "b": Literal_(2)}, output_names=["output"], multi_output=False,
                    resources=Resources(), timeout=None, log_path=folder + "/add.log", artifacts_url=folder)
backend.submit(launch)
results = []
while not results:
    results = backend.wait(30)
ray_procs = psutil.Process().children(recursive=True)
listening = sorted({c.laddr.ip for p in ray_procs for c in p.net_connections("inet") if c.status == "LISTEN"})
import ray
backend.shutdown()
_, alive = psutil.wait_procs(ray_procs, timeout=20)
print(json.dumps({"cpus": cpus, "state": results[0].state, "worker": results[0].worker, "listening": listening,
                  "initialized": ray.is_initialized(), "alive": [p.pid for p in alive]}))
"""


@integration
def test_a_ray_started_by_the_backend_is_sized_on_loopback_and_stopped(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the backend must ask for loopback itself
    child = subprocess.run([sys.executable, "-c", OWN_RAY, STEPS, str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    answer: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    for pid in answer["alive"]:  # not expected; but never leave them behind
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert (answer["cpus"], answer["state"], answer["initialized"], answer["alive"]) == (1.0, "SUCCEEDED", False, [])
    assert answer["worker"].startswith("ray:127.0.0.1:")
    assert answer["listening"] and set(answer["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, answer


# -- a separate head, reached by address ------------------------------------------------------------

CLIENT = """\
import json, sys
from pathlib import Path
from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
address, home, sample = sys.argv[1:4]
settings = Settings.for_home(Path(home))
settings.execution.ray_address = address
result = run(load_file_module(sample).diamond_fanout, {"n": 6, "pause": 0.0}, backend="ray", settings=settings)
print(json.dumps({"status": result.status, "error": result.error, "outputs": result.outputs, "id": result.id}))
"""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _head_processes(temp_dir: str, gcs_address: str) -> list[psutil.Process]:
    """The processes of the head started with `--temp-dir=temp_dir`, and everything they started."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        args: list[str] = proc.info["cmdline"] or []
        if any(temp_dir in arg or gcs_address in arg for arg in args):
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update((child.pid, child) for child in proc.children(recursive=True))
    return list(found.values())


def _stop(procs: list[psutil.Process]) -> None:
    """Workers and agents first, then the raylet, then the other daemons, the GCS server last."""

    def named(proc: psutil.Process, name: str) -> bool:
        try:
            return proc.name() == name
        except psutil.NoSuchProcess:
            return False

    raylets = [p for p in procs if named(p, "raylet")]
    gcs = [p for p in procs if named(p, "gcs_server")]
    below: list[psutil.Process] = []
    for raylet in raylets:
        with contextlib.suppress(psutil.NoSuchProcess):
            below.extend(raylet.children(recursive=True))
    rest = [p for p in procs if p not in raylets and p not in gcs and p not in below]
    for group in (below, raylets, rest, gcs):
        for proc in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(group, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


@integration
def test_pipeline_runs_on_a_separate_head_by_address(tmp_path: Path) -> None:
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip("the ray command is not installed next to this Python")
    port, client_port, dashboard_port, agent_port, metrics_port = _free_ports(5)
    address = f"127.0.0.1:{port}"
    # Short on purpose: Ray's socket paths under it must fit in 107 bytes, which tmp_path may not.
    temp_dir = tempfile.mkdtemp(prefix="skyray-", dir="/tmp")
    env = {**os.environ, **RAY_ENV}
    head: list[psutil.Process] = []
    try:
        started = subprocess.run(
            [str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             f"--ray-client-server-port={client_port}", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={agent_port}", f"--metrics-export-port={metrics_port}",
             "--object-store-memory=100000000"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        head = _head_processes(temp_dir, address)
        assert started.returncode == 0, started.stdout + started.stderr
        home = tmp_path / "home"
        client = subprocess.run([sys.executable, "-c", CLIENT, address, str(home), SAMPLE], env=env,
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        answer: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
        assert answer["status"] == "SUCCEEDED", answer["error"]
        squares = sum(i * i for i in range(6))
        assert answer["outputs"] == {"output": squares + sum(range(6)) * 1000 + 5}
        # The steps ran in workers of that head: their logs are in its session folder.
        pids = {(r.worker or "").rsplit(":", 1)[1] for r in _rows(Settings.for_home(home), answer["id"])}
        logs = " ".join(path.name for path in Path(temp_dir).glob("session_*/logs/*"))
        assert pids and all(f"-{pid}.out" in logs for pid in pids), (pids, logs)
    finally:
        head = [*head, *(p for p in _head_processes(temp_dir, address) if p not in head)]
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in head if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
