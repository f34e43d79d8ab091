"""A Ray replica that hangs (its actor's process stopped with SIGSTOP) is found by the liveness probes, taken out
of the gateway's pool and killed; its host starts a new actor in its place. A local Ray (2 CPUs, loopback only)
and a controller in this process, on a thread, as in `test_ray_replica_failures`."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from deploy_support import Env, Load, in_process_controller
from ray_support import local_ray

from skyloop.deploy.api import apply_deployment
from skyloop.deploy.liveness import FAILURES, PROBE_EVERY, PROBE_TIMEOUT
from skyloop.deploy.spec import load_deployment_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A local Ray, a home with `iris/1`, and a controller running in this process (on a thread)."""
    with local_ray(), in_process_controller(tmp_path_factory.mktemp("rayhung")) as (env, _):
        yield env


def replicas(env: Env, name: str) -> list[dict[str, Any]]:
    return list(env.info(name).state["predictors"]["main"]["replicas"])


def release(proc: psutil.Process | None) -> None:
    """Let go of a process the test stopped, unless it is gone already (psutil checks the pid was not reused)."""
    if proc is not None:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)


def gone(proc: psutil.Process, timeout: float = 10.0) -> bool:
    """Whether `proc` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_hung_ray_replica_is_killed_and_replaced_alone(ray_env: Env) -> None:
    env, name = ray_env, "rayhung"
    doc = {"name": name, "backend": "ray",
           "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 2, "traffic": 100,
                           "resources": {"cpus": 0.5}}]}
    info = apply_deployment(load_deployment_spec(doc), env.settings, start=False, timeout=120)
    stopped: psutil.Process | None = None
    try:
        assert info.status == "Healthy", info.reason
        victim, sibling = replicas(env, name)
        with Load(env.url(name), env.X, env.y, clients=2) as load:
            try:
                time.sleep(0.5)
                stopped = psutil.Process(victim["pid"])
                stopped.send_signal(signal.SIGSTOP)
                detection = FAILURES * (PROBE_EVERY + PROBE_TIMEOUT) + 10.0
                # Before, nothing noticed: Ray's address calls to it just waited, as did the requests sent there.
                env.wait(name, lambda _: "replica_hung" in [e.kind for e in env.history(name)], timeout=detection,
                         what="a replica_hung event")
                hung = next(e for e in env.history(name) if e.kind == "replica_hung")
                assert f"replica {victim['index']} (pid {victim['pid']})" in hung.reason, hung.reason
                assert gone(stopped), "the hung actor's process was not killed"
                after = env.wait(name, lambda i: i.status == "Healthy" and len(replicas(env, name)) == 2 and all(
                    not r["down"] and not r["draining"] for r in replicas(env, name)) and victim["pid"] not in
                    [r["pid"] for r in replicas(env, name)], timeout=90, what="Healthy with a new actor")
                recovered = time.monotonic()
                time.sleep(1.0)
            finally:
                release(stopped)
        assert psutil.pid_exists(sibling["pid"])  # only the hung replica was replaced
        assert sibling["pid"] in [r["pid"] for r in replicas(env, name)]
        assert after.status == "Healthy", after.reason
        kinds = [e.kind for e in env.history(name)]
        assert "replica_recovered" in kinds, kinds
        # Those waiting on the hung replica are sent again when it is killed (or, on a slow machine, past the
        # gateway's retry window, answered 503); none after that fails.
        assert load.answers and len(load.failed) <= load.clients, load.failed
        late = [a for a in load.answers if a.at > recovered]
        assert late and all(a.status == 200 for a in late)
    finally:
        release(stopped)
        with contextlib.suppress(Exception):
            from skyloop.deploy.api import delete_deployment

            delete_deployment(env.settings, name)
