"""Deployments end to end: a real controller process, real replica processes, real load on 127.0.0.1."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from deploy_support import Env, Load

from skyloop.deploy.api import apply_deployment, delete_deployment
from skyloop.registry.registry import resolve
from skyloop.registry.uri import parse_model_ref
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration

FAST = {"interval": "300ms", "min_samples": 30}


def iris_graph(transformer: str | None = None, **parameters: Any) -> dict[str, Any]:
    model = {"name": "model", "type": "MODEL", "model_uri": "models:/iris/1"}
    if transformer is None:
        return model
    return {"name": "pre", "type": "TRANSFORMER", "implementation": f"nodes.py:{transformer}",
            "parameters": parameters, "children": [model]}


def canary(name: str, target: dict[str, Any], steps: list[dict[str, Any]], metrics: list[dict[str, Any]],
           **rollout: Any) -> dict[str, Any]:
    return {
        "name": name,
        "predictors": [{"name": "stable", "model_uri": "models:/iris@champion", "replicas": 1, "traffic": 100},
                       {"name": "canary", **target, "replicas": 1}],
        "rollout": {"strategy": "canary", "target": "canary", "steps": steps, **rollout},
        "analysis": {**FAST, "metrics": metrics},
    }


def kinds(env: Env, name: str) -> list[str]:
    return [e.kind for e in env.history(name)]


def alias_version(env: Env, alias: str) -> int:
    workspace = Workspace.open(env.settings)
    try:
        with workspace.db.read() as session:
            return resolve(session, parse_model_ref(f"models:/iris@{alias}")).version
    finally:
        workspace.close()


def test_a_canary_is_promoted_under_load_with_no_failed_request(env: Env) -> None:
    spec = canary("promote", {"model_uri": "models:/iris@challenger"},
                  [{"weight": 20, "duration": "1.5s"}, {"weight": 50, "duration": "1.5s"}],
                  [{"name": "error_rate", "max": 0.01}, {"name": "latency_p99", "max": 0.5}],
                  promote_alias="champion")
    info = env.apply(spec)
    assert info.state["predictors"]["canary"]["version"] == "iris/2"
    with Load(env.url("promote"), env.X, env.y, clients=8) as load:
        env.wait("promote", lambda i: i.status in ("Healthy", "Degraded", "Paused"), 90, "the end of the rollout")
        while len(load.answers) < 5000:
            time.sleep(0.1)
    assert env.info("promote").status == "Healthy", env.info("promote").reason
    assert len(load.answers) >= 5000 and load.failed == []
    last = load.answers[-200:]
    assert load.share("canary", last) == 1.0 and {a.version for a in last} == {"iris/2"}
    history = kinds(env, "promote")
    assert history.index("step") < history.index("promoted") < history.index("alias_moved")
    promoted = next(e for e in env.history("promote") if e.kind == "promoted")
    assert promoted.weights == {"canary": 100.0, "stable": 0.0}
    assert promoted.metrics is not None and promoted.metrics["verdict"] == "Successful"
    assert alias_version(env, "champion") == 2
    env.delete("promote")
    with Workspace.open(env.settings).db.session() as session:  # put the alias back for other tests
        from skyloop.registry.registry import set_alias

        set_alias(session, "iris", "champion", 1)


@pytest.mark.parametrize(("case", "target", "metric"), [
    ("errors", {"graph": iris_graph("Flaky", rate=0.3)}, {"name": "error_rate", "max": 0.05}),
    ("slower", {"graph": iris_graph("Sleep", delay=0.08)}, {"name": "latency_p99", "max_ratio": 3}),
    ("worse", {"graph": {"name": "const", "type": "MODEL", "implementation": "nodes.py:Constant"}},
     {"name": "accuracy", "max_drop": 0.1}),
])
def test_a_bad_canary_is_rolled_back_and_answers_no_more_than_its_weight(
        env: Env, case: str, target: dict[str, Any], metric: dict[str, Any]) -> None:
    name = f"bad-{case}"
    spec = canary(name, target, [{"weight": 20, "duration": "30s"}, {"weight": 80, "duration": "30s"}], [metric])
    env.apply(spec)
    with Load(env.url(name), env.X, env.y, clients=8, feedback=case == "worse") as load:
        info = env.wait(name, lambda i: i.status in ("Degraded", "Healthy"), 60, "a verdict")
    assert info.status == "Degraded", info.reason
    assert metric["name"] in info.reason
    rolled = next(e for e in env.history(name) if e.kind == "rolled_back")
    assert rolled.weights["canary"] == 0.0 and rolled.metrics is not None
    assert any(m["name"] == metric["name"] and m["passed"] is False for m in rolled.metrics["metrics"])
    assert load.share("canary") <= 0.2 + 0.05
    assert "step" in kinds(env, name) and kinds(env, name).count("promoted") == 0
    env.delete(name)


def test_without_traffic_the_rollout_pauses_as_inconclusive_and_never_promotes(env: Env) -> None:
    spec = canary("idle", {"model_uri": "models:/iris/2"}, [{"weight": 50, "duration": "1s"}],
                  [{"name": "error_rate", "max": 0.01}])
    env.apply(spec)
    info = env.wait("idle", lambda i: i.status == "Paused", 30, "a pause")
    assert info.reason.startswith("Inconclusive") and "30 needed" in info.reason
    time.sleep(2)
    assert env.info("idle").status == "Paused" and "promoted" not in kinds(env, "idle")
    rolled = env.cli("deploy", "rollback", "idle")
    assert rolled.returncode == 0 and "rollback of idle requested" in rolled.stdout, rolled.stderr
    info = env.wait("idle", lambda i: i.status == "Degraded", 30, "the rollback")
    assert "rollback requested" in info.reason

    # The rollout is over: a command is refused, with why and what to do instead.
    refused = env.cli("deploy", "promote", "idle")
    assert refused.returncode == 4, refused.stderr  # Conflict
    assert "deployment 'idle' has no rollout in progress (its status is Degraded: canary rolled back to 0%: " \
           "rollback requested)" in refused.stderr and "`skyloop deploy apply` a changed spec" in refused.stderr
    # One queued just before the rollout ended (past that check) is recorded as ignored, not acted on.
    workspace = Workspace.open(env.settings)
    try:
        with workspace.db.session() as session:
            store.queue_command(session, "idle", "promote_full")
    finally:
        workspace.close()
    ignored = env.wait("idle", lambda i: "command_ignored" in kinds(env, "idle"), 30, "the ignored command")
    assert ignored.status == "Degraded" and "promoted" not in kinds(env, "idle")
    event = next(e for e in env.history("idle") if e.kind == "command_ignored")
    assert event.reason.startswith("promote_full: no rollout in progress (status Degraded: canary rolled back")
    env.delete("idle")


def test_a_rolling_update_replaces_replicas_under_load_with_no_failed_request(env: Env) -> None:
    spec = {"name": "rolling", "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 2,
                                               "traffic": 100}]}
    env.apply(spec)
    with Load(env.url("rolling"), env.X, env.y, clients=8) as load:
        while len(load.answers) < 1500:
            time.sleep(0.05)
        spec["predictors"][0]["model_uri"] = "models:/iris/2"
        env.apply(spec)
        while len(load.answers) < 5000:
            time.sleep(0.05)
    assert len(load.answers) >= 5000 and load.failed == []
    versions = [a.version for a in load.answers]
    assert versions[0] == "iris/1" and versions[-1] == "iris/2"
    assert "rolling_update" in kinds(env, "rolling")
    env.delete("rolling")


def test_a_killed_replica_costs_almost_nothing_and_is_back_within_two_seconds(env: Env) -> None:
    spec = {"name": "kill", "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 2,
                                            "traffic": 100}]}
    info = env.apply(spec)
    victim = info.state["predictors"]["main"]["replicas"][0]
    with Load(env.url("kill"), env.X, env.y, clients=8) as load:
        while len(load.answers) < 1000:
            time.sleep(0.05)
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        back = None
        while back is None and time.monotonic() - killed < 10:
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{victim['port']}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        back = time.monotonic() - killed
            time.sleep(0.01)
        while len(load.answers) < 5000:
            time.sleep(0.05)
    assert back is not None and back <= 2.0, f"replica back after {back}s"
    replica = env.info("kill").state["predictors"]["main"]["replicas"][0]
    assert replica["port"] == victim["port"] and replica["pid"] != victim["pid"] and replica["restarts"] == 1
    failed = len(load.failed) / len(load.answers)
    assert failed <= 0.001, f"{len(load.failed)} of {len(load.answers)} failed"
    env.delete("kill")


def test_a_host_that_cannot_start_again_backs_off_says_why_and_recovers(env: Env, tmp_path: Path) -> None:
    # The host dies, and its model no longer loads: each failed start waits longer before the next, the
    # events and the status name the load error (not the first exit), and once the model loads again the
    # deployment is Healthy.
    marker = tmp_path / "corrupt"
    graph = {"name": "fragile", "type": "MODEL", "implementation": "nodes.py:Fragile",
             "parameters": {"marker": str(marker)}}
    info = env.apply({"name": "crashloop", "predictors": [{"name": "main", "graph": graph, "replicas": 1,
                                                             "traffic": 100}]})
    assert info.status == "Healthy", info.reason
    marker.touch()
    os.kill(info.state["predictors"]["main"]["pid"], signal.SIGKILL)

    def failures(i: store.DeploymentInfo) -> bool:
        return kinds(env, "crashloop").count("restart_failed") >= 4

    degraded = env.wait("crashloop", failures, 90, "four failed starts")
    assert degraded.status == "Degraded" and "the weights file is corrupt" in degraded.reason
    assert "next try in" in degraded.reason
    tries = [e for e in env.history("crashloop") if e.kind == "replicas_restarted"]
    assert "exited with code -9" in tries[0].reason
    assert all("the weights file is corrupt" in e.reason for e in tries[1:4])
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(tries[:4])]
    # 1 s, 2 s, then 4 s of waiting between starts that each take the same time to fail.
    assert gaps[2] - gaps[0] >= 2.0, gaps
    marker.unlink()
    healthy = env.wait("crashloop", lambda i: i.status == "Healthy", 60, "the replicas back")
    assert "started again after" in healthy.reason
    assert kinds(env, "crashloop")[-1] == "replicas_recovered"
    env.delete("crashloop")


def test_a_deletion_does_not_wait_for_an_apply_in_flight_and_leaves_no_replica_behind(env: Env) -> None:
    first = {"name": "midapply", "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 1,
                                                 "traffic": 100}]}
    info = env.apply(first)
    assert info.status == "Healthy", info.reason
    old = psutil.Process(info.state["predictors"]["main"]["pid"])
    slow = {"name": "slow", "type": "MODEL", "implementation": "nodes.py:Slow", "parameters": {"seconds": 600}}
    second = {**first, "predictors": [{"name": "main", "graph": slow, "replicas": 1, "traffic": 100}]}
    apply_deployment(env.spec(second), env.settings, wait=False, start=False)
    controller = psutil.Process(info.state["controller_pid"])
    spec_file = str(env.settings.home / "deployments" / "midapply" / "main-2.yaml")

    def loading() -> list[psutil.Process]:
        found = []
        for child in controller.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if spec_file in child.cmdline():
                    found.append(child)
        return found

    deadline = time.monotonic() + 30
    while not (new := loading()):
        assert time.monotonic() < deadline, "the new version's replicas never started loading"
        time.sleep(0.1)
    # Before, the deletion waited for the apply, which waited for the 600 s load: this timed out.
    started = time.monotonic()
    delete_deployment(env.settings, "midapply", timeout=30)
    assert time.monotonic() - started < 30
    after = [e.kind for e in env.history("midapply")]
    assert after[after.index("deleted"):] == ["deleted", "stopped"], after
    _, alive = psutil.wait_procs([old, *new], timeout=20)
    assert not alive, f"replica processes left running: {[p.pid for p in alive]}"


def test_the_status_follows_the_replicas_while_an_apply_is_in_flight(env: Env) -> None:
    # Before, nothing was written while an apply ran: `deploy status` said "Healthy, spec version 1 applied" for
    # as long as a new predictor loaded, and a replica restarted meanwhile kept its dead pid there.
    first = {"name": "inflight", "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 1,
                                                 "traffic": 100}]}
    info = env.apply(first)
    assert info.status == "Healthy", info.reason
    victim = info.state["predictors"]["main"]["replicas"][0]["pid"]
    slow = {"name": "slow", "type": "MODEL", "implementation": "nodes.py:Slow", "parameters": {"seconds": 600}}
    second = {**first, "predictors": [*first["predictors"], {"name": "slow", "graph": slow, "traffic": 0}]}
    apply_deployment(env.spec(second), env.settings, wait=False, start=False)
    shown = env.wait("inflight", lambda i: i.status == "Progressing", 30, "the apply in flight shown")
    assert shown.reason == "starting 1 predictor(s)", shown.reason
    os.kill(victim, signal.SIGKILL)  # the host replaces it on the same port

    def replaced(i: store.DeploymentInfo) -> bool:
        return i.state["predictors"]["main"]["replicas"][0]["pid"] not in (None, victim)

    moved = env.wait("inflight", replaced, 10, "the restarted replica shown")
    assert moved.status == "Progressing" and psutil.pid_exists(moved.state["predictors"]["main"]["replicas"][0]["pid"])
    delete_deployment(env.settings, "inflight", timeout=30)


def test_a_predictor_whose_host_died_is_degraded_until_it_serves_again(env: Env) -> None:
    info = env.apply({"name": "hostdied", "predictors": [{"name": "main", "model_uri": "models:/iris/1",
                                                          "replicas": 1, "traffic": 100}]})
    assert info.status == "Healthy", info.reason
    os.kill(info.state["predictors"]["main"]["pid"], signal.SIGKILL)
    # Before, the status said Healthy all along, while every request to it failed.
    # (The state is written just after the event: wait on the state, read in one go, not on the event.)
    back = env.wait("hostdied", lambda i: i.reason == "main: serving again", 60, "the host back")
    assert back.status == "Healthy"
    down = next(e for e in env.history("hostdied") if e.kind == "replicas_down")
    assert (down.status, down.reason) == ("Degraded", "main: no replica serving; being restarted")
    after = kinds(env, "hostdied")
    assert after.index("replicas_down") < after.index("replicas_recovered")
    env.delete("hostdied")


def point(env: Env, alias: str, version: int) -> None:
    """Point `iris@alias` at `version`."""
    from skyloop.registry.registry import set_alias

    workspace = Workspace.open(env.settings)
    try:
        with workspace.db.session() as session:
            set_alias(session, "iris", alias, version)
    finally:
        workspace.close()


def test_a_host_that_died_comes_back_with_the_version_it_served_not_where_its_alias_moved(env: Env) -> None:
    # Before, a restart pinned the alias again: the version it had moved to took the traffic with no rollout.
    point(env, "drifting", 1)
    info = env.apply({"name": "pinned", "predictors": [{"name": "main", "model_uri": "models:/iris@drifting",
                                                        "replicas": 1, "traffic": 100}]})
    assert info.state["predictors"]["main"]["version"] == "iris/1"
    point(env, "drifting", 2)  # moved, not applied: nothing is rolled out
    os.kill(info.state["predictors"]["main"]["pid"], signal.SIGKILL)
    back = env.wait("pinned", lambda i: i.reason == "main: serving again", 60, "the host back")
    assert back.state["predictors"]["main"]["pid"] != info.state["predictors"]["main"]["pid"]
    assert back.state["predictors"]["main"]["version"] == "iris/1"
    env.delete("pinned")


def test_applying_a_spec_again_after_its_alias_moved_serves_the_version_it_names_now(env: Env) -> None:
    # Before, the unchanged spec was a no-op: it went on serving the old version, without a word.
    point(env, "moving", 1)
    spec = {"name": "aliased", "predictors": [{"name": "main", "model_uri": "models:/iris@moving", "replicas": 1,
                                               "traffic": 100}]}
    first = env.apply(spec)
    assert first.state["predictors"]["main"]["version"] == "iris/1"
    assert env.apply(spec).spec_version == first.spec_version  # nothing moved: nothing to do
    point(env, "moving", 2)
    again = env.apply(spec)
    assert again.spec_version == first.spec_version + 1
    served = env.wait("aliased", lambda i: i.state["predictors"]["main"].get("version") == "iris/2", 60,
                      "iris/2 served")
    assert served.status == "Healthy", served.reason
    applied = [e.reason for e in env.history("aliased") if e.kind == "applied"]
    assert applied[-1] == f"spec version {again.spec_version} applied (aliases moved: main: iris/1 -> iris/2)"
    env.delete("aliased")
