"""Spec versions applied over a running deployment: one that fails to apply, one applied mid-rollout or after a
finished rollout, and a promotion whose retired predictor still has a request in flight.

Each test runs its own controller process in its own home (stopped, with its replicas, by PID), real replica
processes and real requests through the gateway.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploy_support import NODES, Env, Load, controller, stop_pid
from tests_support import write

from skyloop.config import Settings
from skyloop.deploy.api import send_command
from skyloop.errors import BackendError
from skyloop.store import deployments as store

pytestmark = pytest.mark.integration


def constant(label: int) -> dict[str, Any]:
    return {"name": "const", "type": "MODEL", "implementation": "nodes.py:Constant", "parameters": {"label": label}}


def behind(transformer: str, child: dict[str, Any], **parameters: Any) -> dict[str, Any]:
    return {"name": "pre", "type": "TRANSFORMER", "implementation": f"nodes.py:{transformer}",
            "parameters": parameters, "children": [child]}


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> Env:
    """A home and a spec folder with nodes.py; no controller runs until a test starts one."""
    write(tmp_path / "specs" / "nodes.py", NODES)
    return Env(settings, tmp_path / "specs", np.zeros((1, 4)), np.zeros(1))


def request(env: Env, name: str, timeout: float = 10) -> tuple[str, int]:
    """One request through the gateway: (predictor, label) of its answer."""
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                   "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    req = urllib.request.Request(env.url(name) + "/infer", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.headers["skyloop-predictor"], json.load(resp)["outputs"][0]["data"][0]


def answers(env: Env, name: str, n: int) -> list[tuple[str, int]]:
    return [request(env, name) for _ in range(n)]


def kinds_after(env: Env, name: str, event_id: int) -> list[str]:
    return [e.kind for e in env.history(name) if e.id > event_id]


def last_event(env: Env, name: str) -> store.DeploymentEvent:
    return env.history(name)[-1]


def test_a_version_that_fails_to_apply_leaves_the_last_good_one_running_through_a_crash_and_a_restart(
        env: Env, tmp_path: Path) -> None:
    # Before, the runner took the failed version for its own: a crashed host was started as the failed version
    # (which failed again, and again), the state labelled the old rollout with the new version, and a restarted
    # controller started only the failed version: it served nothing.
    marker = tmp_path / "corrupt"
    marker.touch()
    good = {"name": "keep", "predictors": [{"name": "main", "graph": constant(0), "traffic": 100}]}
    bad = {"name": "keep", "predictors": [{"name": "main", "traffic": 100, "graph": {
        "name": "fragile", "type": "MODEL", "implementation": "nodes.py:Fragile",
        "parameters": {"marker": str(marker), "label": 1}}}]}
    with controller(env):
        first = env.apply(good)
        assert first.status == "Healthy", first.reason
        with pytest.raises(BackendError, match="spec version 2 not applied: main: "):
            env.apply(bad)
        info = env.wait("keep", lambda i: i.state.get("applied") == 2, 30, "spec version 2 acted on")
        assert (info.spec_version, info.state["spec_version"], info.state["rollout"]["spec_version"]) == (2, 1, 1)
        assert answers(env, "keep", 3) == [("main", 0)] * 3
        pid = info.state["predictors"]["main"]["pid"]
        os.kill(pid, signal.SIGKILL)
        env.wait("keep", lambda i: i.state["predictors"]["main"].get("pid") not in (None, pid)
                 and "replicas_recovered" in [e.kind for e in env.history("keep")], 60, "the crashed host back")
        assert "restart_failed" not in [e.kind for e in env.history("keep")]
        assert answers(env, "keep", 3) == [("main", 0)] * 3
    with controller(env):
        # Spec version 2 still fails: the new controller runs spec version 1 again, then tries 2 over it.
        def tried(i: store.DeploymentInfo) -> bool:
            return i.controller is not None and i.state.get("owner") == i.controller and i.state.get("applied") == 2

        again = env.wait("keep", tried, 60, "a new controller acting on spec version 2")
        assert again.status == "Degraded" and "the weights file is corrupt" in again.reason, again.reason
        assert again.state["spec_version"] == 1 and set(again.state["predictors"]) == {"main"}
        assert answers(env, "keep", 3) == [("main", 0)] * 3
        failed = [e.reason for e in env.history("keep") if e.kind == "failed"]
        assert len(failed) == 2 and all(r.endswith("; spec version 1 goes on") for r in failed), failed
        env.delete("keep")


def test_a_spec_applied_again_after_a_promotion_keeps_the_winner(env: Env) -> None:
    # Before, any later spec version started the rollout again from step 1: the old stable predictor was
    # started again at 100% and the promoted one sent back to 0%.
    doc = {"name": "won", "predictors": [{"name": "stable", "graph": constant(0), "traffic": 100},
                                         {"name": "canary", "graph": constant(1)}],
           "rollout": {"strategy": "canary", "target": "canary", "steps": [{"pause": {}}]}}
    with controller(env):
        env.apply(doc)
        env.wait("won", lambda i: i.status == "Paused", 30, "the pause")
        send_command(env.settings, "won", "promote_full")
        env.wait("won", lambda i: i.status == "Healthy" and set(i.state["predictors"]) == {"canary"}, 30,
                 "the promotion")
        mark = last_event(env, "won").id
        doc["predictors"][1]["replicas"] = 2  # the winner scaled up: the same model, more replicas
        scaled = env.apply(doc)
        assert scaled.status == "Healthy", scaled.reason
        assert "the rollout of canary had ended Healthy" in scaled.reason, scaled.reason
        assert scaled.state["rollout"]["weights"] == {"canary": 100.0, "stable": 0.0}
        assert set(scaled.state["predictors"]) == {"canary"}
        assert len(scaled.state["predictors"]["canary"]["replicas"]) == 2
        assert "step" not in kinds_after(env, "won", mark) and "paused" not in kinds_after(env, "won", mark)
        assert answers(env, "won", 5) == [("canary", 1)] * 5
        # A new model for the target is a new rollout.
        doc["predictors"][1]["graph"] = constant(2)
        fresh = env.apply(doc)
        assert fresh.state["rollout"]["weights"] == {"canary": 0.0, "stable": 100.0}
        env.wait("won", lambda i: i.status == "Paused", 30, "the new rollout's pause")
        env.delete("won")


def test_a_spec_applied_again_mid_rollout_goes_on_under_its_new_analysis(env: Env) -> None:
    # Before, the rollout object of the first version went on: the analysis of the new one was ignored.
    doc = {"name": "judged", "predictors": [
        {"name": "stable", "graph": constant(0), "traffic": 100},
        {"name": "canary", "graph": behind("Flaky", constant(1), rate=1.0)}],
        "rollout": {"strategy": "canary", "target": "canary", "steps": [{"weight": 50, "duration": "1h"}]},
        "analysis": {"interval": "300ms", "min_samples": 100000, "failure_limit": 0,
                     "metrics": [{"name": "error_rate", "max": 0.01}]}}
    with controller(env):
        env.apply(doc)
        env.wait("judged", lambda i: (i.state.get("rollout") or {}).get("step") == 0, 30, "step 1")
        with Load(env.url("judged"), env.X, env.y, clients=2):
            time.sleep(2)
            first = env.info("judged")  # too few samples for the first analysis: the canary keeps 50%
            assert first.status == "Progressing" and first.state["rollout"]["weights"]["canary"] == 50.0
            mark = last_event(env, "judged").id
            doc["analysis"]["min_samples"] = 30
            env.apply(doc)
            rolled = env.wait("judged", lambda i: i.status == "Degraded", 30, "the rollback by the new analysis")
        assert "error_rate" in rolled.reason, rolled.reason
        assert kinds_after(env, "judged", mark)[-2:] == ["reconciled", "rolled_back"], \
            kinds_after(env, "judged", mark)
        reconciled = [e for e in env.history("judged") if e.kind == "reconciled"][-1]
        assert "the rollout of canary goes on at step 1/1" in reconciled.reason, reconciled.reason
        env.delete("judged")


def test_a_stable_predictor_removed_mid_rollout_takes_no_more_traffic(env: Env) -> None:
    # Before, the rollout of the first version went on with its split: the removed predictor kept 45% of the
    # traffic, and those requests failed once its replicas stopped.
    doc = {"name": "split", "predictors": [
        {"name": "a", "graph": constant(0), "traffic": 50}, {"name": "b", "graph": constant(0), "traffic": 50},
        {"name": "canary", "graph": constant(1)}],
        "rollout": {"strategy": "canary", "target": "canary", "steps": [{"weight": 10, "duration": "1h"}]}}
    with controller(env):
        env.apply(doc)
        env.wait("split", lambda i: (i.state.get("rollout") or {}).get("step") == 0, 30, "step 1")
        doc["predictors"] = [{"name": "a", "graph": constant(0), "traffic": 100}, doc["predictors"][2]]
        env.apply(doc)
        info = env.wait("split", lambda i: (i.state.get("rollout") or {}).get("step") == 0, 30, "step 1 again")
        assert info.state["weights"] == {"a": 90.0, "canary": 10.0} or \
            info.state["weights"] == {"canary": 10.0, "a": 90.0}, info.state["weights"]
        assert set(info.state["predictors"]) == {"a", "canary"}
        assert {p for p, _ in answers(env, "split", 40)} <= {"a", "canary"}
        env.delete("split")


def test_a_promotion_does_not_wait_for_the_retired_predictor_to_drain(env: Env) -> None:
    # Before, the controller's tick drained the retired stable predictor (up to 30 s) before it wrote the new
    # state, and every other deployment and the lease waited with it.
    doc = {"name": "drain", "predictors": [
        {"name": "stable", "graph": behind("Sleep", constant(0), delay=12.0), "traffic": 100},
        {"name": "canary", "graph": constant(1)}],
        "rollout": {"strategy": "canary", "target": "canary", "steps": [{"pause": {}}]}}
    with controller(env):
        env.apply(doc)
        env.wait("drain", lambda i: i.status == "Paused", 30, "the pause")
        slow: list[Any] = []
        thread = threading.Thread(target=lambda: slow.append(request(env, "drain", timeout=60)))
        thread.start()
        time.sleep(1.0)  # the slow request is in flight on the stable predictor
        send_command(env.settings, "drain", "promote_full")
        asked = time.monotonic()
        promoted = env.wait("drain", lambda i: i.status == "Healthy", 30, "the promotion")
        took = time.monotonic() - asked
        assert took < 5.0, f"the state said Healthy only after {took:.1f}s"
        assert promoted.state["rollout"]["weights"] == {"canary": 100.0, "stable": 0.0}
        assert request(env, "drain") == ("canary", 1)
        thread.join(60)
        assert slow == [("stable", 0)]  # answered: drained, not cut off
        env.wait("drain", lambda i: set(i.state["predictors"]) == {"canary"}, 30, "the stable predictor stopped")
        env.delete("drain")


def test_a_spec_applied_again_after_its_controller_was_killed_waits_for_a_live_one(env: Env) -> None:
    # Before, `apply` returned at once what the killed controller had left (Healthy, applied by it: its lease
    # still ran), while its gateway was gone and nothing would serve until a new controller took over. The
    # controllers here are the ones `apply` starts, as the CLI's are (detached, but children of this process:
    # the killed one stays a zombie, which passes for alive, until this process reaps it).
    import psutil

    from skyloop.deploy.api import apply_deployment

    doc = {"name": "orphan", "predictors": [{"name": "main", "graph": constant(0), "traffic": 100}]}
    ours = {child.pid for child in psutil.Process().children()}
    try:
        first = apply_deployment(env.spec(doc), env.settings, timeout=120)
        assert first.status == "Healthy", first.reason
        killed = str(first.controller).split(":")[1]
        os.kill(int(killed), signal.SIGKILL)
        again = apply_deployment(env.spec(doc), env.settings, timeout=120)
        owner = str(again.controller)
        assert owner.split(":")[1] != killed and again.status == "Healthy", (owner, again.reason)
        assert request(env, "orphan") == ("main", 0)
        env.delete("orphan")
    finally:  # the controllers `apply` started: stopped by their pids
        for child in psutil.Process().children():
            if child.pid not in ours:
                stop_pid(child.pid)
