"""Ray processes of the tests' own, each reached from a subprocess (a process connects to one Ray at a time).

One test lets the backend start (and stop) a Ray itself; one starts a separate head with `ray start`
and runs a pipeline against it by address, then stops exactly the processes of that head, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest
from ray_support import RAY_ENV

from skyloop import Settings
from skyloop.store.models import StepRunRow
from skyloop.store.workspace import Workspace

HERE = Path(__file__).parent
STEPS = str(HERE / "ray_steps.py")
SAMPLE = str(HERE / "sample_pipelines.py")
CHAINS = str(HERE / "chain_pipelines.py")

integration = pytest.mark.integration


def _rows(settings: Settings, run_id: str) -> list[StepRunRow]:
    workspace = Workspace.open(settings)
    try:
        with workspace.db.session() as session:
            return list(session.query(StepRunRow).filter_by(run_id=run_id).all())
    finally:
        workspace.close()


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


KILLED = """\
import json, sys
from pathlib import Path
import psutil
from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
home, chains = sys.argv[1:3]
result = run(load_file_module(chains).killed_after_slow, {"seconds": 0.2, "trace": home + "/trace"}, backend="ray",
             settings=Settings.for_home(Path(home)))
_, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=20)
print(json.dumps({"status": result.status, "error": result.error, "id": result.id, "alive": [p.pid for p in alive]}))
"""


@integration
def test_a_run_on_a_ray_of_its_own_leaves_no_spare_log_file_though_a_worker_was_killed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    child = subprocess.run([sys.executable, "-c", KILLED, str(home), CHAINS], env={**os.environ, **RAY_ENV},
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    answer: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    for pid in answer["alive"]:  # not expected; but never leave them behind
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert (answer["status"], answer["alive"]) == ("SUCCEEDED", []), answer["error"]
    rows = _rows(Settings.for_home(home), answer["id"])
    assert sorted((r.task, r.attempt, r.state) for r in rows) == [
        ("add_one", 1, "SUCCEEDED"), ("killed_first", 1, "CRASHED"), ("killed_first", 2, "SUCCEEDED"),
        ("slow", 1, "SUCCEEDED")]
    # The log of the attempt whose worker was SIGKILLed keeps what it printed; the quiet attempts left no
    # log; and no worker left its spare log file, though Ray ended them all without letting them remove it.
    logs = home / "logs" / answer["id"]
    assert sorted(path.name for path in logs.iterdir()) == ["killed_first.1.log"]
    assert (logs / "killed_first.1.log").read_text() == "about to be killed\n"


DECLARED = """\
import json, sys, time, uuid
from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.backends.ray import RayBackend
from skyloop.execution.tasks import Literal_, TaskLaunch
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
steps, folder, nowhere = sys.argv[1:4]
started = time.monotonic()
try:
    RayBackend(ExecutionSettings(), address=nowhere).start()
except BackendError as exc:
    refused = [str(exc), time.monotonic() - started]
backend = RayBackend(ExecutionSettings(max_cpus=2, max_gpus=2, gpu_ids=[2, 3], resources={"license": 2}))
backend.start()
capacity = backend.capacity()
def launch(resources):
    key = uuid.uuid4().hex[:8]
    return TaskLaunch(key=key, task_name="getenv", step=StepRef(module=steps, qualname="getenv"),
                      inputs={"name": Literal_("CUDA_VISIBLE_DEVICES")}, output_names=["output"],
                      multi_output=False, resources=resources, timeout=None, log_path=folder + "/" + key + ".log",
                      artifacts_url=folder)
gpu, cpu, licensed = launch(Resources(cpus=1, gpus=1)), launch(Resources(cpus=1)), launch(
    Resources(cpus=1, custom={"license": 1}))
for each in (gpu, cpu, licensed):
    backend.submit(each)
results = {}
while len(results) < 3:
    results.update((r.key, r) for r in backend.wait(30))
from skyloop.store.artifacts import ArtifactStore
store = ArtifactStore(folder)
seen = {name: store.get(results[each.key].outputs["output"]) if results[each.key].outputs else results[each.key].error
        for name, each in (("gpu", gpu), ("cpu", cpu), ("licensed", licensed))}
backend.shutdown()
print(json.dumps({"refused": refused, "gpus": capacity.gpus, "custom": capacity.custom, "seen": seen}))
"""


@integration
def test_a_ray_started_by_the_backend_offers_the_declared_devices_and_resources(tmp_path: Path) -> None:
    (nowhere,) = _free_ports(1)  # nothing listens there
    child = subprocess.run([sys.executable, "-c", DECLARED, STEPS, str(tmp_path), f"127.0.0.1:{nowhere}"],
                           env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=180)
    assert child.returncode == 0, child.stderr
    answer: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    message, seconds = answer["refused"]
    assert f"cannot connect to the Ray cluster at 127.0.0.1:{nowhere}: nothing answers there" in message
    assert seconds < 30  # at once, not after Ray's own minutes of retries
    assert (answer["gpus"], answer["custom"]) == (2, {"license": 2.0})
    # The GPU step gets one of the declared devices; the CPU steps see none, as on the local backend.
    assert answer["seen"]["gpu"] in ("2", "3") and answer["seen"]["cpu"] == answer["seen"]["licensed"] == "", answer


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
settings.execution.max_cpus = 8  # sizes only a Ray skyloop starts: the head has 2
greedy = run(load_file_module(sys.argv[4]).greedy, {}, backend="ray", settings=settings)
print(json.dumps({"status": result.status, "error": result.error, "outputs": result.outputs, "id": result.id,
                  "greedy": [greedy.status, greedy.error]}))
"""

GREEDY = """\
from skyloop import Resources, pipeline, step

@step(resources=Resources(cpus=4))
def big() -> int:
    return 1

@pipeline
def greedy():
    return big()
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
    # Ray 2.5x+ may turn on token auth for `ray start --head` (a token in ~/.ray): off, on this loopback-only head.
    env = {**os.environ, **RAY_ENV, "RAY_AUTH_MODE": "disabled"}
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
        (tmp_path / "greedy.py").write_text(GREEDY)
        client = subprocess.run([sys.executable, "-c", CLIENT, address, str(home), SAMPLE, str(tmp_path / "greedy.py")],
                                env=env, capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        answer: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
        assert answer["status"] == "SUCCEEDED", answer["error"]
        squares = sum(i * i for i in range(6))
        assert answer["outputs"] == {"output": squares + sum(range(6)) * 1000 + 5}
        status, error = answer["greedy"]  # more CPUs than the cluster has: the cure is in the cluster
        assert status == "FAILED" and f"add it to the nodes of the Ray cluster at {address}" in error, error
        # The steps ran in workers of that head: their logs are in its session folder.
        pids = {(r.worker or "").rsplit(":", 1)[1] for r in _rows(Settings.for_home(home), answer["id"])}
        logs = " ".join(path.name for path in Path(temp_dir).glob("session_*/logs/*"))
        assert pids and all(f"-{pid}.out" in logs for pid in pids), (pids, logs)
    finally:
        head = [*head, *(p for p in _head_processes(temp_dir, address) if p not in head)]
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in head if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# -- a cluster of two nodes -------------------------------------------------------------------------

TWO_NODES = """\
import json, sys, time
from pathlib import Path
import psutil
from ray.cluster_utils import Cluster
from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
home, pipes = sys.argv[1:3]
node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": 80 * 2**20}
cluster = Cluster(initialize_head=True, head_node_args=node)
cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
cluster.wait_for_nodes()
try:
    settings = Settings.for_home(Path(home))
    settings.execution.ray_address = cluster.address
    started = time.monotonic()
    result = run(load_file_module(pipes).too_wide, {}, backend="ray", settings=settings)
    seconds = time.monotonic() - started
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
_, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=20)
print(json.dumps({"status": result.status, "steps": {n: [s.state.value, s.error] for n, s in result.steps.items()},
                  "seconds": seconds, "alive": [p.pid for p in alive]}))
"""

TOO_WIDE = """\
from skyloop import Resources, pipeline, step

@step(resources=Resources(cpus=1))
def small() -> int:
    return 1

@step(resources=Resources(cpus=2), timeout=5, retries=1)
def wide(x: int) -> int:
    return x

@pipeline
def too_wide():
    return wide(small())
"""


@integration
def test_a_step_that_fits_the_cluster_but_no_node_fails_at_once_naming_the_nodes(tmp_path: Path) -> None:
    # Two nodes of 1 CPU: a 2-CPU step fits the cluster's total, but Ray can place it nowhere and holds it as
    # infeasible for ever. Before, such a step stayed RUNNING without end (or, with a timeout, spent its retries
    # TIMED_OUT though it never started).
    (tmp_path / "wide.py").write_text(TOO_WIDE)
    child = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path / "home"), str(tmp_path / "wide.py")],
                           env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=180)
    assert child.returncode == 0, child.stderr
    answer: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    for pid in answer["alive"]:  # not expected; but never leave them behind
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert answer["status"] == "FAILED" and answer["alive"] == [], answer
    assert answer["steps"]["small"][0] == "SUCCEEDED"
    state, error = answer["steps"]["wide"]
    assert state == "FAILED" and "which no single node of the ray cluster offers" in error, error
    assert '"cpus": 1.0' in error and "add a node that large" in error
    assert answer["seconds"] < 5  # at once: not after its timeout, twice
