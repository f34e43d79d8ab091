"""Deployments with `backend: ray`: replicas as Ray actors on a local Ray, driven by a controller in this process.

One local Ray (2 CPUs, loopback only) for the module; the controller runs on a uvloop loop in a thread so
that it shares the test's Ray (a controller process would start a Ray of its own).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import psutil
import pytest
from deploy_support import Env, Load, in_process_controller
from ray_support import local_ray

from skyloop.deploy.api import delete_deployment
from skyloop.deploy.spec import load_deployment_spec
from skyloop.errors import BackendError
from skyloop.store import deployments as store

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def ray_session() -> Iterator[ModuleType]:
    """One local Ray for the module (see `ray_support.local_ray`)."""
    with local_ray() as ray:
        yield ray


@dataclass
class RayEnv(Env):
    """The deployment environment plus the fitted classifier the registry holds as `iris/1`."""

    clf: Any = None


@pytest.fixture(scope="module")
def ray_env(ray_session: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayEnv]:
    """A home with `iris` version 1 and a controller running in this process (on a thread)."""
    with in_process_controller(tmp_path_factory.mktemp("raydeploy")) as (env, clf):
        yield RayEnv(env.settings, env.folder, env.X, env.y, clf)


def apply(env: Env, doc: dict[str, Any]) -> store.DeploymentInfo:
    """Apply through the public API (the controller here is the one in this process)."""
    from skyloop.deploy.api import apply_deployment

    return apply_deployment(load_deployment_spec(doc), env.settings, start=False, timeout=120)


def replicas(info: store.DeploymentInfo, predictor: str = "main") -> list[dict[str, Any]]:
    return list(info.state["predictors"][predictor]["replicas"])


def infer(url: str, X: np.ndarray[Any, Any]) -> list[int]:
    body = {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64",
                        "data": X.ravel().tolist()}]}
    request = urllib.request.Request(url + "/infer", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return [int(v) for v in json.load(resp)["outputs"][0]["data"]]


def test_ray_replicas_serve_survive_a_killed_actor_and_stop_with_the_deployment(ray_env: RayEnv) -> None:
    name = "rayiris"
    doc = {"name": name, "backend": "ray",
           "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 2, "traffic": 100}]}
    info = apply(ray_env, doc)
    assert info.status == "Healthy", info.reason
    before = replicas(info)
    pids = [r["pid"] for r in before]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert all(psutil.pid_exists(p) and r["host"] == "127.0.0.1" and r["node"] for p, r in zip(pids, before,
                                                                                                 strict=True))
    url = ray_env.url(name)
    assert infer(url, ray_env.X) == ray_env.clf.predict(ray_env.X).tolist()

    victim = before[0]
    with Load(url, ray_env.X, ray_env.y, clients=4) as load:
        time.sleep(0.5)
        killed, killed_at = time.monotonic(), time.time()
        os.kill(victim["pid"], signal.SIGKILL)

        def back(i: store.DeploymentInfo) -> bool:
            r = replicas(i)[victim["index"]]
            return r["pid"] != victim["pid"] and r["restarts"] >= 1 and not r["down"]

        after = ray_env.wait(name, back, timeout=30, what="the killed replica back")
        restarted = time.monotonic() - killed
        time.sleep(0.5)
    new = replicas(after)[victim["index"]]
    print(f"replica back {restarted:.2f}s after SIGKILL (its server up after {new['started_at'] - killed_at:.2f}s); "
          f"{len(load.answers)} answers, {len(load.failed)} failed")
    assert len(load.answers) > 100
    assert len(load.failed) <= 0.01 * len(load.answers)
    assert new["port"] != victim["port"] or new["pid"] != victim["pid"]
    assert infer(url, ray_env.X[:20]) == ray_env.clf.predict(ray_env.X[:20]).tolist()

    delete_deployment(ray_env.settings, name)
    gone = [new["pid"], replicas(after)[1 - victim["index"]]["pid"]]
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(p) for p in gone) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in gone)


def test_a_predictor_whose_only_actor_restarts_is_degraded_until_it_serves_again(ray_env: RayEnv) -> None:
    name = "raysolo"
    info = apply(ray_env, {"name": name, "backend": "ray",
                           "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 1,
                                           "traffic": 100}]})
    try:  # deleted whatever happens: it holds a CPU of the 2-CPU test cluster the next tests need
        assert info.status == "Healthy", info.reason
        (victim,) = replicas(info)
        os.kill(victim["pid"], signal.SIGKILL)

        def history() -> list[store.DeploymentEvent]:
            return ray_env.history(name)

        # Before, the status said Healthy all along, while every request to the predictor failed.
        back = ray_env.wait(name, lambda i: i.status == "Healthy" and "replicas_recovered" in
                            [e.kind for e in history()], timeout=60, what="the actor back")
        assert replicas(back)[0]["pid"] != victim["pid"]
        down = next(e for e in history() if e.kind == "replicas_down")
        assert (down.status, down.reason) == ("Degraded", "main: no replica serving; being restarted")
    finally:
        delete_deployment(ray_env.settings, name)


def test_a_graph_that_cannot_load_in_its_actor_fails_the_spec_version_with_the_reason(ray_env: RayEnv) -> None:
    nodes = ray_env.folder / "empty_nodes.py"  # exists (apply checks that), but has no such class
    nodes.write_text("# no classes here\n")
    doc = {"name": "raybroken", "backend": "ray",
           "predictors": [{"name": "main", "traffic": 100, "graph": {
               "name": "pre", "type": "TRANSFORMER", "implementation": f"{nodes}:Missing",
               "children": [{"name": "model", "type": "MODEL", "model_uri": "models:/iris/1"}]}}]}
    with pytest.raises(BackendError, match="failed to start on Ray"):
        apply(ray_env, doc)
    info = ray_env.info("raybroken")
    assert info.status == "Degraded"
    assert "failed to start on Ray" in info.reason and "Missing" in info.reason, info.reason
    assert info.state["predictors"] == {}
    delete_deployment(ray_env.settings, "raybroken")


def test_a_predictor_the_cluster_can_never_place_fails_at_once_naming_what_it_lacks(ray_env: RayEnv) -> None:
    doc = {"name": "raygreedy", "backend": "ray",
           "predictors": [{"name": "main", "model_uri": "models:/iris/1", "traffic": 100, "resources": {"cpus": 4}}]}
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"more CPU than the whole Ray cluster has \(\{'CPU': 2\.0\}\)"):
        apply(ray_env, doc)
    assert time.monotonic() - started < 60  # not the 180 s start timeout
    delete_deployment(ray_env.settings, "raygreedy")
    # Replicas that each fit but could never all serve at once. Before, an update to them stopped old replicas
    # to make room, waited 3 minutes for the rest, then said Healthy with fewer replicas than the spec.
    many = {"name": "raymany", "backend": "ray", "predictors": [
        {"name": "main", "model_uri": "models:/iris/1", "traffic": 100, "replicas": 2, "resources": {"cpus": 0.5}}]}
    before = replicas(apply(ray_env, many))
    many["predictors"][0]["replicas"] = 5
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"asks for 5 replicas of .*: \{'CPU': 2\.5\} in all, more than the whole "
                                           r"Ray cluster has \(\{'CPU': 2\.0\}\), so they could never all serve"):
        apply(ray_env, many)
    assert time.monotonic() - started < 60
    info = ray_env.info("raymany")
    assert replicas(info) == before and info.state["spec_version"] == 1  # nothing was stopped
    assert infer(ray_env.url("raymany"), ray_env.X[:5]) == ray_env.clf.predict(ray_env.X[:5]).tolist()
    delete_deployment(ray_env.settings, "raymany")
    # A deployment naming another cluster than the one this controller is connected to is refused, not
    # served on the local one under the other's name.
    other = {"name": "rayelsewhere", "backend": "ray", "ray_address": "127.0.0.1:9",
             "predictors": [{"name": "main", "model_uri": "models:/iris/1", "traffic": 100}]}
    with pytest.raises(BackendError, match=r"cannot use the Ray cluster at 127\.0\.0\.1:9: this process is connected"):
        apply(ray_env, other)
    delete_deployment(ray_env.settings, "rayelsewhere")


SLOW_NODES = """
import time


class SlowStart:
    def load(self):
        time.sleep(8)

    def transform_input(self, X):
        return X
"""


def test_a_replica_restarted_while_an_apply_is_in_flight_is_routed_to_at_once(ray_env: RayEnv) -> None:
    name = "raybusy"
    doc: dict[str, Any] = {"name": name, "backend": "ray",
                           "predictors": [{"name": "main", "model_uri": "models:/iris/1", "traffic": 100}]}
    info = apply(ray_env, doc)
    url, (victim,) = ray_env.url(name), replicas(info)
    nodes = ray_env.folder / "slow_nodes.py"
    nodes.write_text(SLOW_NODES)
    doc["predictors"].append({"name": "slow", "traffic": 0, "graph": {
        "name": "wait", "type": "TRANSFORMER", "implementation": f"{nodes}:SlowStart",
        "children": [{"name": "model", "type": "MODEL", "model_uri": "models:/iris/1"}]}})
    applying = threading.Thread(target=apply, args=(ray_env, doc))
    applying.start()  # the runner is busy for 8 s, starting `slow`
    try:
        time.sleep(1.0)
        os.kill(victim["pid"], signal.SIGKILL)  # Ray restarts it on another port
        answered = None
        while applying.is_alive():
            try:
                answered = infer(url, ray_env.X[:5])
                break
            except OSError:  # 503 while the pool still names the dead port, or the restart is under way
                time.sleep(0.2)
        assert answered == ray_env.clf.predict(ray_env.X[:5]).tolist(), "no answer until the apply ended"
    finally:
        applying.join(120)
        delete_deployment(ray_env.settings, name)


def test_a_rolling_update_on_a_full_cluster_replaces_replicas_as_room_frees(ray_env: RayEnv) -> None:
    # Two 1-CPU replicas fill the 2-CPU cluster: there is no room for new replicas beside the old ones, so
    # one old replica is drained and stopped first, and each new one that serves frees the next old one.
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model

    log_model(LogisticRegression(max_iter=600).fit(ray_env.X, ray_env.y), "iris", input_example=ray_env.X[:5],
              settings=ray_env.settings)  # iris/2
    name = "rayfull"
    doc: dict[str, Any] = {"name": name, "backend": "ray", "predictors": [
        {"name": "main", "model_uri": "models:/iris/1", "replicas": 2, "traffic": 100}]}
    info = apply(ray_env, doc)
    assert info.status == "Healthy", info.reason
    url = ray_env.url(name)
    try:
        with Load(url, ray_env.X, ray_env.y, clients=4) as load:
            time.sleep(0.5)
            started = time.monotonic()
            doc["predictors"][0]["model_uri"] = "models:/iris/2"
            updated = apply(ray_env, doc)
            took = time.monotonic() - started
            time.sleep(0.5)
        assert updated.status == "Healthy", updated.reason
        assert took < 60, f"the update took {took:.0f}s"  # not the start timeout of replicas that never fit
        after = replicas(updated)
        assert len(after) == 2 and updated.state["predictors"]["main"]["version"] == "iris/2"
        assert updated.state["predictors"]["main"]["pending"] == 0
        assert len(load.failed) <= 0.01 * len(load.answers), f"{len(load.failed)} of {len(load.answers)} failed"
        assert load.answers[-1].version == "iris/2"
        reasons = [e.reason for e in ray_env.history(name) if e.kind == "rolling_update"]
        assert any("stopping old replica" in r for r in reasons), reasons
        assert any("waiting for the room old ones free" in r for r in reasons), reasons

        # Two replicas of 1 CPU into one of 2 CPUs: stopping all but one old replica would not make room, so
        # nothing is stopped and the update is refused at once.
        doc["predictors"][0] |= {"replicas": 1, "resources": {"cpus": 2}}
        with pytest.raises(BackendError, match="no room for a new replica, even with all but one"):
            apply(ray_env, doc)
        assert len(replicas(ray_env.info(name))) == 2
        assert infer(url, ray_env.X[:5]) == ray_env.clf.predict(ray_env.X[:5]).tolist()
    finally:
        delete_deployment(ray_env.settings, name)


WAIT_NODES = """
import time


class LoadsForAWhile:
    def __init__(self, seconds):
        self.seconds = seconds

    def load(self):
        time.sleep(self.seconds)

    def transform_input(self, X):
        return X
"""


def test_replicas_that_found_no_room_in_time_join_once_room_frees_and_the_status_says_so(
        ray_env: RayEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    # A rolling update on a full cluster waits a while for the room its old replicas free. Past that, the new
    # replicas still waiting were killed: the deployment said Healthy and served with fewer replicas than its
    # spec, for good. Now they keep their place in Ray's queue, join once room frees, and the status is
    # Degraded (naming them) until they do.
    from skyloop.deploy import runner

    monkeypatch.setattr(runner, "_ROOM_TIMEOUT", 0.0)  # past the wait at once: the second new one still loads
    name = "raywait"
    doc: dict[str, Any] = {"name": name, "backend": "ray", "predictors": [
        {"name": "main", "model_uri": "models:/iris/1", "replicas": 2, "traffic": 100}]}  # 2 x 1 CPU: full
    assert apply(ray_env, doc).status == "Healthy"
    nodes = ray_env.folder / "wait_nodes.py"
    nodes.write_text(WAIT_NODES)
    doc["predictors"][0].pop("model_uri")
    doc["predictors"][0]["graph"] = {
        "name": "wait", "type": "TRANSFORMER", "implementation": f"{nodes}:LoadsForAWhile",
        "parameters": {"seconds": 3}, "children": [{"name": "model", "type": "MODEL", "model_uri": "models:/iris/1"}]}
    try:
        updated = apply(ray_env, doc)
        assert updated.status == "Degraded", updated.reason
        assert updated.reason == "main: 1 of 2 replica(s) wait for room on the Ray cluster (1 serve)"
        assert updated.state["predictors"]["main"]["pending"] == 1
        assert infer(ray_env.url(name), ray_env.X[:5]) == ray_env.clf.predict(ray_env.X[:5]).tolist()
        healthy = ray_env.wait(name, lambda i: i.status == "Healthy", 60, "the waiting replica serving")
        assert healthy.reason == "main: serving again"
        assert len(replicas(healthy)) == 2 and healthy.state["predictors"]["main"]["pending"] == 0
        kinds = [(e.kind, e.reason) for e in ray_env.history(name)]
        assert any(k == "rolling_update" and "1 new replica(s) still wait for room" in r for k, r in kinds), kinds
        assert [k for k, _ in kinds if k.startswith("replicas_")] == ["replicas_waiting", "replicas_recovered"]
    finally:
        delete_deployment(ray_env.settings, name)
