"""Ray replicas that die and whose new actors fail to load: only the dead replica is replaced, with backoff,
and why it died is told. A local Ray (2 CPUs, loopback only) and a controller in this process, on a thread,
as in `test_ray_deployments`."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from deploy_support import Env, Load, in_process_controller
from ray_support import local_ray

from skyloop.deploy.api import apply_deployment, delete_deployment
from skyloop.deploy.spec import load_deployment_spec
from skyloop.store import deployments as store

pytestmark = pytest.mark.integration

FICKLE = '''
import os


class Fickle:
    """TRANSFORMER: notes each load in `log`; fails to load while the file `marker` exists (with `crash`, its
    process dies: a native crash, an OOM kill)."""

    def __init__(self, marker, log, crash=False):
        with open(log, "a") as out:
            out.write("load\\n")
        if os.path.exists(marker):
            if crash:
                os._exit(1)
            raise RuntimeError("the weights file is corrupt")

    def transform_input(self, X):
        return X
'''


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A local Ray, a home with `iris/1` and `fickle.py`, and a controller running in this process (on a thread)."""
    with local_ray(), in_process_controller(tmp_path_factory.mktemp("rayfail")) as (env, _):
        (env.folder / "fickle.py").write_text(FICKLE)
        yield env


def fickle(env: Env, name: str, replicas: int, crash: bool = False) -> tuple[dict[str, Any], Path, Path]:
    marker, log = env.folder / f"{name}.corrupt", env.folder / f"{name}.loads"
    doc = {"name": name, "backend": "ray",
           "predictors": [{"name": "main", "replicas": replicas, "traffic": 100, "resources": {"cpus": 0.5},
                           "graph": {"name": "pre", "type": "TRANSFORMER",
                                     "implementation": f"{env.folder / 'fickle.py'}:Fickle",
                                     "parameters": {"marker": str(marker), "log": str(log), "crash": crash},
                                     "children": [{"name": "model", "type": "MODEL",
                                                   "model_uri": "models:/iris/1"}]}}]}
    return doc, marker, log


def apply(env: Env, doc: dict[str, Any]) -> store.DeploymentInfo:
    return apply_deployment(load_deployment_spec(doc), env.settings, start=False, timeout=120)


def replicas(info: store.DeploymentInfo) -> list[dict[str, Any]]:
    return list(info.state["predictors"]["main"]["replicas"])


def test_a_ray_replica_whose_new_actor_fails_is_replaced_alone_while_its_sibling_serves(ray_env: Env) -> None:
    name = "raysibling"
    doc, marker, _ = fickle(ray_env, name, 2)
    info = apply(ray_env, doc)
    try:
        assert info.status == "Healthy", info.reason
        victim, sibling = replicas(info)
        with Load(ray_env.url(name), ray_env.X, ray_env.y, clients=2) as load:
            time.sleep(0.5)
            marker.touch()  # its new actor fails to load: a transient fault
            os.kill(victim["pid"], signal.SIGKILL)
            ray_env.wait(name, lambda _: "restart_failed" in [e.kind for e in ray_env.history(name)], timeout=60,
                         what="a failed new actor for the killed replica")
            # Before, the failed new actor made the host kill the healthy sibling too, and replace both.
            assert psutil.pid_exists(sibling["pid"])
            marker.unlink()
            after = ray_env.wait(name, lambda i: not replicas(i)[0]["down"] and replicas(i)[0]["pid"] not in
                                 (victim["pid"], sibling["pid"]), timeout=60, what="the killed replica back")
            time.sleep(0.5)
        assert replicas(after)[1]["pid"] == sibling["pid"] and replicas(after)[1]["restarts"] == 0
        assert after.status == "Healthy", after.reason
        kinds = [e.kind for e in ray_env.history(name)]
        assert "replicas_down" not in kinds and "replicas_restarted" not in kinds, kinds
        failed = next(e for e in ray_env.history(name) if e.kind == "restart_failed")
        assert "replica 0" in failed.reason and "the weights file is corrupt" in failed.reason, failed.reason
        print(f"{len(load.answers)} answers, {len(load.failed)} failed")
        assert len(load.answers) > 20 and len(load.failed) <= 2
    finally:
        delete_deployment(ray_env.settings, name)


def test_a_ray_replica_that_keeps_dying_while_loading_is_retried_with_backoff_and_the_cause_shown(
        ray_env: Env) -> None:
    name = "rayloop"
    doc, marker, log = fickle(ray_env, name, 1, crash=True)
    info = apply(ray_env, doc)
    try:
        assert info.status == "Healthy", info.reason
        (victim,) = replicas(info)
        marker.touch()
        loads = len(log.read_text().splitlines())
        os.kill(victim["pid"], signal.SIGKILL)
        down = ray_env.wait(name, lambda i: i.status == "Degraded" and "next try in" in i.reason, timeout=60,
                            what="the cause in the status")
        assert "replica 0 died: " in down.reason and "new one(s) in a row died" in down.reason, down.reason
        print(down.reason)

        def waits() -> list[int]:
            return [int(m.group(1)) for e in ray_env.history(name) if e.kind == "restart_failed"
                    and (m := re.search(r"next try in (\d+)s", e.reason or ""))]

        ray_env.wait(name, lambda _: len(waits()) >= 4, timeout=90, what="four failed new actors")
        # Before, Ray restarted the actor every ~2 s forever, and nothing said why it died.
        assert waits()[:4] == [1, 2, 4, 8], waits()
        tried = len(log.read_text().splitlines()) - loads
        assert 4 <= tried <= 6, tried  # one load per new actor: Ray itself does not restart it
        marker.unlink()
        back = ray_env.wait(name, lambda i: i.status == "Healthy", timeout=60, what="the replica back")
        assert replicas(back)[0]["pid"] != victim["pid"] and not replicas(back)[0]["down"]
        assert "replicas_recovered" in [e.kind for e in ray_env.history(name)]
    finally:
        delete_deployment(ray_env.settings, name)
