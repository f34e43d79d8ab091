"""The deployment controller restarted: a new controller process takes the deployment over and goes on from
where the last one left it (a bandit's arms, a rollout's step, a finished rollout), as DESIGN.md promises.

Each test runs its own controller processes in its own home, one after the other, each stopped by PID.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploy_support import NODES, Env, controller
from tests_support import post, write

from skyloop.config import Settings
from skyloop.deploy.api import send_command
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration


def constant(label: int) -> dict[str, Any]:
    return {"name": "const", "type": "MODEL", "implementation": "nodes.py:Constant", "parameters": {"label": label}}


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> Env:
    """A home and a spec folder with nodes.py; no controller runs until a test starts one."""
    write(tmp_path / "specs" / "nodes.py", NODES)
    X = np.zeros((1, 4))
    return Env(settings, tmp_path / "specs", X, np.zeros(1))


def taken_over(env: Env, name: str, before: str | None) -> store.DeploymentInfo:
    """Wait until a controller other than `before` holds `name` and has applied its spec version."""
    def applied(i: store.DeploymentInfo) -> bool:
        return i.controller not in (None, before) and i.state.get("owner") == i.controller \
            and i.state.get("applied") == i.spec_version

    return env.wait(name, applied, 60, "a new controller applying the spec")


def answers(env: Env, name: str, n: int) -> list[tuple[str, int]]:
    """`n` requests through the gateway: (predictor, label) of each answer."""
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                   "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    out = []
    for _ in range(n):
        request = urllib.request.Request(env.url(name) + "/infer", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            out.append((resp.headers["skyloop-predictor"], json.load(resp)["outputs"][0]["data"][0]))
    return out


def test_a_restarted_controller_serves_a_bandit_deployment_again(env: Env) -> None:
    # Bandit arms are written without `traffic` (their saved weights are 0): a restart must not read that as
    # "nothing to serve".
    doc = {"name": "bandit", "router": {"type": "thompson"},
           "predictors": [{"name": "zero", "graph": constant(0)}, {"name": "one", "graph": constant(1)}]}
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                   "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    with controller(env):
        first = env.apply(doc)
        assert first.status == "Healthy", first.reason
        for _ in range(40):  # "one" earns a reward of 1, "zero" of 0
            status, answer = post(env.url("bandit") + "/infer", body)
            assert status == 200, answer
            feedback = {"id": answer["id"], "reward": float(answer["outputs"][0]["data"][0] == 1)}
            assert post(env.url("bandit") + "/feedback", json.dumps(feedback).encode())[0] == 200
        learned = env.wait("bandit", lambda i: sum(a["feedback"] for a in i.state["arms"].values()) == 40, 30,
                           "the rewards in the saved state").state["arms"]
    with controller(env):
        info = taken_over(env, "bandit", first.controller)
        assert info.status == "Healthy", info.reason
        assert set(info.state["predictors"]) == {"zero", "one"}
        # What the bandit had learned is taken up, not started again from its prior.
        assert {n: (a["pulls"], a["feedback"], a["mean_reward"]) for n, a in info.state["arms"].items()} == \
            {n: (a["pulls"], a["feedback"], a["mean_reward"]) for n, a in learned.items()}
        served = answers(env, "bandit", 30)
        assert {p for p, _ in served} <= {"zero", "one"} and all(label == {"zero": 0, "one": 1}[p]
                                                                 for p, label in served)
        env.delete("bandit")


def test_a_restarted_controller_goes_on_with_the_rollout_where_it_stood(env: Env) -> None:
    doc = {"name": "canary",
           "predictors": [{"name": "stable", "graph": constant(0), "traffic": 100},
                          {"name": "canary", "graph": constant(1)}],
           "rollout": {"strategy": "canary", "target": "canary",
                       "steps": [{"weight": 20, "duration": "1h"}, {"pause": {}}, {"weight": 60, "duration": "1h"}]}}

    def at(step: int, phase: str) -> Any:
        return lambda i: (i.state.get("rollout") or {}).get("step") == step and i.status == phase

    with controller(env):
        first = env.apply(doc)
        env.wait("canary", at(0, "Progressing"), 30, "step 1")
        send_command(env.settings, "canary", "promote")
        env.wait("canary", at(1, "Paused"), 30, "the pause of step 2")
        send_command(env.settings, "canary", "promote")
        env.wait("canary", at(2, "Progressing"), 30, "step 3")
    with controller(env):
        second = taken_over(env, "canary", first.controller)
        rollout = second.state["rollout"]
        assert (second.status, rollout["step"], rollout["weights"]) == ("Progressing", 2,
                                                                        {"canary": 60.0, "stable": 40.0})
        restarted = [e for e in env.history("canary") if e.kind == "reconciled"][-1]
        assert "the rollout of canary goes on at step 3/3 (Progressing" in restarted.reason, restarted.reason
        assert [e.kind for e in env.history("canary") if e.id > restarted.id] == []  # not sent back to step 1
        assert {p for p, _ in answers(env, "canary", 40)} == {"stable", "canary"}
        send_command(env.settings, "canary", "promote")
        promoted = env.wait("canary", at(2, "Healthy"), 30, "the promotion")
        assert promoted.state["rollout"]["weights"] == {"canary": 100.0, "stable": 0.0}
        env.wait("canary", lambda i: set(i.state["predictors"]) == {"canary"}, 30, "the stable predictor stopped")
    # Finished: a third controller starts only the predictor that kept the traffic, and starts no rollout.
    with controller(env):
        third = taken_over(env, "canary", second.controller)
        assert third.status == "Healthy", third.reason
        assert set(third.state["predictors"]) == {"canary"}
        assert third.state["rollout"]["phase"] == "Healthy"
        assert answers(env, "canary", 5) == [("canary", 1)] * 5
        env.delete("canary")


def test_a_stored_spec_this_skyloop_refuses_is_reported_and_the_others_still_run(env: Env) -> None:
    # Recorded by an older skyloop that checked less (here: two graph nodes of one name): the controller says
    # why on that deployment and goes on running the others, instead of dying on it.
    twice = {"name": "twice", "predictors": [{"name": "main", "traffic": 100, "graph": {
        "name": "const", "type": "TRANSFORMER", "implementation": "nodes.py:Sleep", "children": [constant(1)]}}]}
    workspace = Workspace.open(env.settings)
    try:
        with workspace.db.session() as session:
            store.apply_deployment(session, "twice", twice)
    finally:
        workspace.close()
    with controller(env):
        refused = env.wait("twice", lambda i: i.status == "Degraded", 60, "the refusal")
        assert refused.reason.startswith("spec version 1 cannot run: invalid deployment spec:"), refused.reason
        assert "'const'" in refused.reason and refused.reason.endswith("apply a corrected spec")
        assert [e.kind for e in env.history("twice")][-1] == "failed"
        good = env.apply({"name": "good", "predictors": [{"name": "main", "graph": constant(1), "traffic": 100}]})
        assert good.status == "Healthy", good.reason
        assert answers(env, "good", 3) == [("main", 1)] * 3
        twice["predictors"][0]["graph"]["name"] = "pre"
        fixed = env.apply(twice)
        assert fixed.status == "Healthy", fixed.reason
        env.delete("twice")
        env.delete("good")
