"""The closed loop on a real controller: no data never triggers, a worse challenger is never rolled out,
the cooldown holds, and the demo (the README's main command) runs the whole story."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from deploy_support import Env, Load
from tests_support import post, write

from skyloop.deploy.api import send_command
from skyloop.deploy.loop import gate_failures, holdout_split, training_frame
from skyloop.deploy.spec import GateSpec
from skyloop.registry.registry import resolve
from skyloop.registry.uri import parse_model_ref
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration

WORSE = '''
import pandas as pd
from sklearn.dummy import DummyClassifier

from skyloop import pipeline, step


@step
def fit(data: str) -> str:
    """A challenger that always answers class 0: worse than the champion."""
    from skyloop.registry import log_model

    frame = pd.read_parquet(data)
    X, y = frame.drop(columns="target"), frame["target"].astype(int)
    model = DummyClassifier(strategy="constant", constant=0).fit(X, y)
    return log_model(model, "iris", input_example=X.head(5)).uri


@pipeline
def worse(data: str = ""):
    return {"uri": fit(data)}
'''


def loop_spec(name: str, cooldown: str) -> dict[str, Any]:
    return {
        "name": name,
        "predictors": [{"name": "champion", "model_uri": "models:/iris@champion", "traffic": 100}],
        "loop": {
            "drift": {"every": "500ms"},
            "quality": {"window": 100, "min_samples": 30},
            "triggers": {"on": [{"drift": True}, {"quality_below": 0.99}, {"labelled_rows": 150}], "mode": "any",
                         "cooldown": cooldown},
            "retrain": {"pipeline": "retrain.py:worse", "model": "iris", "backend": "inline", "min_rows": 50},
            "gate": {"min_delta": 0.0},
        },
    }


GATED = WORSE.replace('''    from skyloop.registry import log_model
''', '''    import os
    import time

    from skyloop.registry import log_model

    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:  # the test says when the retraining ends
        time.sleep(0.05)
''').replace("def fit(data: str) -> str:", "def fit(data: str, go: str) -> str:").replace(
    'def worse(data: str = ""):\n    return {"uri": fit(data)}',
    'def gated(data: str = "", go: str = ""):\n    return {"uri": fit(data, go)}')


@pytest.mark.parametrize("change", ["no loop", "a rollout"])
def test_a_spec_applied_while_the_loop_retrains_is_never_overwritten_and_loses_no_logged_inference(
        env: Env, change: str) -> None:
    from skyloop.monitoring.payloads import read_payloads

    assert "def gated(" in GATED and "def fit(data: str, go: str)" in GATED
    write(env.folder / "retrain.py", GATED)
    go = env.folder / f"go-{change.replace(' ', '-')}"
    name = "busy-" + change.replace(" ", "-")
    doc = loop_spec(name, cooldown="1h")
    doc["loop"]["triggers"]["on"] = [{"labelled_rows": 20}]
    doc["loop"]["retrain"].update(pipeline="retrain.py:gated", params={"go": str(go)}, min_rows=10)
    doc["loop"]["gate"] = {"min_delta": -1.0}  # any challenger passes: only the user's change may stop it
    doc["loop"]["log"] = {"flush_rows": 50, "flush_seconds": 3600}  # written 50 at a time, the rest held
    first = env.apply(doc)
    with Load(env.url(name), env.X, env.y, clients=2, total=130, feedback=True) as load:
        load.wait()
    env.wait(name, lambda i: "loop.retraining" in [e.kind for e in env.history(name)], 60, "the retraining")
    if change == "no loop":
        del doc["loop"]
    else:
        doc["predictors"].append({"name": "mine", "model_uri": "models:/iris@champion", "traffic": 0})
        doc["rollout"] = {"strategy": "canary", "target": "mine",
                          "steps": [{"weight": 10, "duration": "1h"}, {"pause": {}}]}
    mine = env.apply(doc)
    assert mine.spec_version == first.spec_version + 1
    go.touch()
    env.wait(name, lambda i: {"loop.stopped", "loop.skipped"} & {e.kind for e in env.history(name)}, 60,
             "the loop giving way")
    time.sleep(1.0)
    kinds = [e.kind for e in env.history(name)]
    assert "loop.rollout" not in kinds
    info = env.info(name)
    assert info.spec_version == mine.spec_version
    assert [p["name"] for p in info.spec["predictors"]] == [p["name"] for p in doc["predictors"]]
    if change == "no loop":
        assert "loop.blessed" not in kinds and "loop.stopped" in kinds
    else:
        skipped = next(e for e in env.history(name) if e.kind == "loop.skipped")
        assert "blessed but not rolled out" in skipped.reason and "'mine'" in skipped.reason, skipped.reason
    env.delete(name)  # its loop, if it has one, writes out what it holds
    # Every answer was logged, also the ones held unwritten when the loop was taken away.
    workspace = Workspace.open(env.settings)
    try:
        logged = read_payloads(workspace, name)
    finally:
        workspace.close()
    assert len(load.answers) - len(load.failed) == logged["id"].nunique() > 100


UNSERVABLE = '''
from skyloop import pipeline, step


@step
def fit(data: str) -> str:
    """A challenger the gate can score (it answers 0) that no replica can load."""
    import sys

    import pandas as pd

    from skyloop.registry import log_model

    class TrainingOnly:
        def load(self) -> None:
            if "--exit-with-parent" in sys.argv:  # a replica started by the controller
                raise RuntimeError("this model loads only where it was trained")

        def predict(self, data):
            return [0] * len(data)

    frame = pd.read_parquet(data)
    return log_model(TrainingOnly(), "iris", input_example=frame.drop(columns="target").head(5)).uri


@pipeline
def unservable(data: str = ""):
    return {"uri": fit(data)}
'''


def test_an_iteration_trains_on_answers_not_yet_written_and_a_canary_that_fails_to_apply_ends_it(env: Env) -> None:
    write(env.folder / "retrain.py", UNSERVABLE)
    doc = loop_spec("unservable", cooldown="1h")
    doc["loop"]["triggers"]["on"] = [{"labelled_rows": 20}]
    doc["loop"]["retrain"].update(pipeline="retrain.py:unservable", min_rows=10)
    doc["loop"]["gate"] = {"min_delta": -1.0}  # blessed: it fails only where it is served
    # Nothing written before the firing: the iteration itself writes what the log holds before it reads.
    doc["loop"]["log"] = {"flush_seconds": 3600}
    first = env.apply(doc)
    with Load(env.url("unservable"), env.X, env.y, clients=2, total=100, feedback=True) as load:
        load.wait()
    info = env.wait("unservable", lambda i: "loop.finished" in [e.kind for e in env.history("unservable")], 120,
                    "the iteration's end")
    history = env.history("unservable")
    assert [e.kind for e in history if e.kind.startswith("loop.")][-3:] == ["loop.blessed", "loop.rollout",
                                                                            "loop.finished"]
    finished = next(e for e in history if e.kind == "loop.finished")
    canary = first.spec_version + 1
    assert f"canary (spec version {canary}) was not applied: challenger:" in finished.reason, finished.reason
    assert "loads only where it was trained" in finished.reason
    assert info.spec_version == canary
    # The champion goes on serving every request.
    with Load(env.url("unservable"), env.X, env.y, clients=2, total=20) as load:
        load.wait()
    assert load.failed == [] and {a.version for a in load.answers} == {"iris/1"}
    env.delete("unservable")


def test_at_an_even_canary_split_the_loop_measures_the_stable_version(env: Env) -> None:
    # The loop's default canary steps are 25% and 50%: at 50% the champion still serves, and it is the one
    # whose drift and quality are measured and gauged (the target came first in the split and won the tie).
    doc = {"name": "even", "loop": {"drift": {"every": "200ms"}},
           "predictors": [{"name": "stable", "model_uri": "models:/iris/1", "traffic": 100},
                          {"name": "candidate", "model_uri": "models:/iris/2", "traffic": 0}],
           "rollout": {"strategy": "canary", "target": "candidate", "steps": [{"weight": 50, "duration": "1h"}]}}
    env.apply(doc)
    info = env.wait("even", lambda i: (i.state.get("loop") or {}).get("version") is not None, 30, "a measure")
    assert info.state["weights"] == {"stable": 50.0, "candidate": 50.0}
    assert info.state["loop"]["version"] == "iris/1"
    env.delete("even")


def fired(env: Env, name: str) -> list[Any]:
    return [e for e in env.history(name) if e.kind == "loop.fired"]


@pytest.mark.parametrize(("champion", "challenger", "gate", "failures"), [
    # Scores are shares of a holdout, as the gate computes them: 0.80 + 0.05 is 0.8500000000000001 in floats.
    (80 / 100, 85 / 100, {"min_delta": 0.05}, []),
    (16 / 20, 17 / 20, {"min_delta": 0.05}, []),
    (80 / 100, 84 / 100, {"min_delta": 0.05}, ["challenger accuracy 0.840 < champion 0.800 + 0.05"]),
    (80 / 100, 58 / 100, {"min": 0.58, "min_delta": -0.3}, []),
    (80 / 100, 57 / 100, {"min": 0.58}, ["challenger accuracy 0.570 < min 0.58",
                                         "challenger accuracy 0.570 < champion 0.800 + 0"]),
])
def test_the_gate_holds_its_bounds_as_written_despite_float_rounding(
        champion: float, challenger: float, gate: dict[str, float], failures: list[str]) -> None:
    assert gate_failures(GateSpec.model_validate(gate), champion, challenger) == failures


def test_the_gate_holds_out_only_rows_the_champion_cannot_have_trained_on() -> None:
    import pandas as pd

    data = pd.DataFrame({"at": [float(i) for i in range(100)], "x": range(100), "truth": [0] * 100})
    train, held = holdout_split(data, 0.3, unseen_after=79.5)  # registered after the 80th answer
    assert len(held) == 20 and (held["at"] > 79.5).all()
    assert sorted([*train["x"], *held["x"]]) == list(range(100))  # the rest trains the challenger
    train, held = holdout_split(data, 0.3, unseen_after=-1.0)  # registered before the deployment answered
    assert (len(train), len(held)) == (70, 30)
    assert holdout_split(data, 0.3, unseen_after=100.0)[1].empty


def test_the_retraining_file_keeps_every_input_and_refuses_one_named_as_the_label_column() -> None:
    import pandas as pd

    data = pd.DataFrame({"at": [1.0, 2.0], "input.truth": [5, 6], "target": [7, 8], "truth": [0, 1]})
    frame = training_frame(data, ["input.truth", "target"], "label")
    assert frame.to_dict("list") == {"truth": [5, 6], "target": [7, 8], "label": [0, 1]}
    with pytest.raises(ValueError, match=r"input named 'target'.*loop\.retrain\.label_column"):
        training_frame(data, ["input.truth", "target"], "target")  # the default would overwrite the input
    # Truths of two types (`same_answer` takes 1 and "1" as one answer) made the parquet write fail with
    # "ArrowTypeError: Expected bytes, got a 'int' object"; numbers of several types are one column.
    mixed = data.assign(truth=pd.Series([1, "1"], dtype=object))
    with pytest.raises(ValueError, match=r"labels are of mixed types \(int, str\).*send every truth as one type"):
        training_frame(mixed, ["target"], "label")
    numbers = training_frame(data.assign(truth=pd.Series([1, 0.5], dtype=object)), ["target"], "label")
    numbers.to_parquet(io.BytesIO())


def test_no_data_never_triggers_and_a_worse_challenger_is_never_rolled_out(env: Env) -> None:
    write(env.folder / "retrain.py", WORSE)
    info = env.apply(loop_spec("looped", cooldown="4s"))
    champion = resolve_alias(env, "champion")
    # Traffic but no feedback: no quality, no labelled rows, no reference for drift -> nothing fires.
    with Load(env.url("looped"), env.X, env.y, clients=4, total=400) as load:
        load.wait()
    time.sleep(2.0)
    assert load.failed == [] and fired(env, "looped") == []
    loop = env.info("looped").state["loop"]
    assert loop["quality"] is None and loop["dataset_drift"] is None and loop["logged"] >= 400
    # Now with labels: the labelled-rows (and quality) triggers fire, the challenger is trained and refused.
    with Load(env.url("looped"), env.X, env.y, clients=4, feedback=True) as load:
        env.wait("looped", lambda i: len([e for e in env.history("looped") if e.kind == "loop.rejected"]) >= 2,
                 90, "two rejected challengers")
    history = env.history("looped")
    first = next(e for e in history if e.kind == "loop.fired")
    assert first.metrics is not None
    # Whichever the labels met first (quality can drop below 0.99 before 150 rows are labelled), never drift.
    met = {name for name, condition in first.metrics["conditions"].items() if condition["met"]}
    assert met and met <= {"labelled_rows", "quality_below"}, first.metrics["conditions"]
    rejected = [e for e in history if e.kind == "loop.rejected"]
    assert all(e.metrics is not None and e.metrics["challenger"] < e.metrics["champion"] for e in rejected)
    assert all(k not in [e.kind for e in history] for k in ("loop.blessed", "loop.rollout", "promoted"))
    assert env.info("looped").spec_version == info.spec_version  # never rolled out
    assert resolve_alias(env, "champion") == champion
    assert {a.version for a in load.answers} == {"iris/1"}
    # The cooldown: a new firing only once 4 s have passed since the previous iteration ended.
    times = [(e.kind, e.at.timestamp()) for e in history if e.kind in ("loop.fired", "loop.rejected")]
    for (kind, ended), (next_kind, started) in itertools.pairwise(times):
        if kind == "loop.rejected" and next_kind == "loop.fired":
            assert started - ended >= 4.0 - 0.05
    env.delete("looped")


def resolve_alias(env: Env, alias: str) -> int:
    workspace = Workspace.open(env.settings)
    try:
        with workspace.db.read() as session:
            return resolve(session, parse_model_ref(f"models:/iris@{alias}")).version
    finally:
        workspace.close()


def test_the_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    """`skyloop demo` (the README's main command) as a user runs it: a fresh home, a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env.update(COLUMNS="160", NO_COLOR="1")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "skyloop", "--home", str(tmp_path / "home"), "demo"],
                          capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 240
    out = proc.stdout
    assert "the retrained model serves 100% and accuracy is back above 0.8" in out
    for kind in ("loop.fired", "loop.retraining", "loop.blessed", "promoted", "alias_moved", "loop.finished"):
        assert kind in out
    report = tmp_path / "home" / "demo"
    assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (report / "report.html").read_text()
    history = subprocess.run([sys.executable, "-m", "skyloop", "--home", str(tmp_path / "home"), "deploy", "history",
                              "agent", "--json"], capture_output=True, text=True, env=env, timeout=60)
    import json

    events = json.loads(history.stdout)
    kinds = [e["kind"] for e in events]
    assert kinds.index("loop.blessed") < kinds.index("promoted") < kinds.index("alias_moved") < kinds.index("stopped")
    moved = next(e for e in events if e["kind"] == "alias_moved")
    assert "models:/agent@champion moved from version 1 to version 2" in moved["reason"]
    promoted = next(e for e in events if e["kind"] == "promoted")
    assert promoted["versions"]["challenger"] == "agent/2" and promoted["weights"]["challenger"] == 100.0


def test_the_loop_fires_nothing_over_its_canary_in_flight_and_follows_it_to_its_end(env: Env) -> None:
    # A loop's canary (target `challenger`) that a restarted controller took up where it stood: the new loop
    # must follow it, not fire a second iteration over it (its phase lived only in the old process's memory).
    write(env.folder / "retrain.py", WORSE)
    doc = loop_spec("guarded", cooldown="1s")
    doc["loop"]["triggers"] = {"on": [{"schedule": "1s"}], "cooldown": "1s"}
    doc["predictors"] = [{"name": "champion", "model_uri": "models:/iris@champion", "traffic": 100},
                         {"name": "challenger", "model_uri": "models:/iris@champion", "traffic": 0}]
    doc["rollout"] = {"strategy": "canary", "target": "challenger",
                      "steps": [{"weight": 20, "duration": "1s"}, {"pause": {}}]}
    env.apply(doc)
    env.wait("guarded", lambda i: (i.state.get("loop") or {}).get("phase") == "rolling_out", 30,
             "the loop following the canary")
    time.sleep(3.0)  # three periods of the schedule trigger
    assert fired(env, "guarded") == []
    send_command(env.settings, "guarded", "promote_full")
    env.wait("guarded", lambda i: "loop.finished" in [e.kind for e in env.history("guarded")], 60,
             "the loop seeing the canary end")
    env.wait("guarded", lambda i: bool(fired(env, "guarded")), 30, "the schedule firing once the rollout ended")
    env.delete("guarded")


def test_a_loop_that_starts_again_keeps_the_cooldown_it_was_in(env: Env) -> None:
    # A changed loop section (as a restarted controller) makes a new loop: it takes the cooldown up from the
    # deployment's recorded events instead of firing again at once.
    write(env.folder / "retrain.py", WORSE)
    doc = loop_spec("cooling", cooldown="1h")
    doc["loop"]["triggers"] = {"on": [{"schedule": "500ms"}], "cooldown": "1h"}
    env.apply(doc)
    env.wait("cooling", lambda i: "loop.skipped" in [e.kind for e in env.history("cooling")], 30,
             "the first iteration (no labelled rows: skipped)")
    doc["loop"]["drift"]["every"] = "400ms"
    env.apply(doc)
    env.wait("cooling", lambda i: (i.state.get("loop") or {}).get("cooldown_left", 0) > 3000, 30,
             "the new loop in the cooldown")
    time.sleep(2.0)  # four periods of the schedule
    assert len(fired(env, "cooling")) == 1
    env.delete("cooling")


def test_drift_tests_of_features_the_reference_lacks_are_refused_at_apply_and_reported_at_run_time(env: Env) -> None:
    import orjson
    from sklearn.linear_model import LogisticRegression

    from skyloop.deploy.spec import DeploymentSpec
    from skyloop.registry import log_model
    from skyloop.store import deployments as store

    # One [n, 4] tensor: the reference's features are input-0_0 .. input-0_3, not x0.
    model = LogisticRegression(max_iter=500).fit(env.X, env.y)
    log_model(model, "refiris", input_example=env.X[:5], reference=env.X, settings=env.settings)
    write(env.folder / "retrain.py", WORSE)
    doc: dict[str, Any] = {
        "name": "drifty",
        "predictors": [{"name": "main", "model_uri": "models:/refiris/1", "traffic": 100}],
        "loop": {"drift": {"every": "200ms", "tests": {"min_rows": 1, "features": {"x0": {"test": "ks"}}}},
                 "triggers": {"on": [{"labelled_rows": 1}], "cooldown": "1h"},
                 "retrain": {"pipeline": "retrain.py:worse", "model": "refiris", "backend": "inline"}},
    }
    refused = env.cli("deploy", "apply", str(env.spec(doc)))
    assert refused.returncode == 2, refused.stderr
    assert "loop.drift.tests.features: 'x0' not among the features of the reference stored with " \
           "models:/refiris/1 (input-0_0, input-0_1, input-0_2, input-0_3)" in refused.stderr
    assert env.cli("deploy", "history", "drifty", "--json").returncode == 3  # nothing was recorded

    # Recorded behind apply's back (as a champion with other features would be): the loop says why it measures
    # nothing, in an event and in status, instead of failing every tick in the controller's log alone.
    workspace = Workspace.open(env.settings)
    try:
        with workspace.db.session() as session:
            store.apply_deployment(session, "drifty", DeploymentSpec.model_validate(doc).model_dump(mode="json"))
    finally:
        workspace.close()
    info = env.wait("drifty", lambda i: bool(i.state.get("gateway")), 60, "the gateway")
    status, answer = post(f"{info.state['gateway']}/v2/models/drifty/infer", orjson.dumps({
        "inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": env.X[:2].ravel().tolist()}]}))
    assert status == 200, answer
    info = env.wait("drifty", lambda i: "error" in (i.state.get("loop") or {}), 30, "the loop's error in status")
    assert "drift spec names features the reference lacks: x0" in info.state["loop"]["error"]
    failed = [e for e in env.history("drifty") if e.kind == "loop.measure_failed"]
    assert len(failed) == 1 and "x0" in failed[0].reason  # once, not at every check
    # Drift it cannot measure does not stop the loop from checking the rest: a label still fires it (the
    # failed measure once returned before the triggers were asked).
    status, _ = post(f"{info.state['gateway']}/v2/models/drifty/feedback",
                     orjson.dumps({"id": answer["id"], "truth": [0, 0]}))
    assert status == 200
    env.wait("drifty", lambda i: any(e.kind == "loop.fired" for e in env.history("drifty")), 30, "the label's firing")
    fired_by = next(e for e in env.history("drifty") if e.kind == "loop.fired")
    assert "1 new labelled rows" in fired_by.reason
    env.delete("drifty")

    good = doc | {"loop": {"drift": {"every": "200ms", "tests": {"features": {"input-0_0": {"test": "ks"}}}}}}
    assert env.cli("deploy", "apply", str(env.spec(good))).returncode == 0
    env.delete("drifty")


def test_a_reference_that_names_no_logged_input_is_reported_not_taken_for_no_drift(env: Env) -> None:
    import orjson
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model

    # No signature: the reference's columns are 0 .. 3, the logged features input-0_0 .. input-0_3. Nothing to
    # compare was once "0/0 features drift", a measured absence of drift.
    model = LogisticRegression(max_iter=500).fit(env.X, env.y)
    log_model(model, "blindiris", reference=env.X, settings=env.settings)
    env.apply({"name": "blind", "predictors": [{"name": "main", "model_uri": "models:/blindiris/1", "traffic": 100}],
               "loop": {"drift": {"every": "200ms", "tests": {"min_rows": 1}}}})
    info = env.wait("blind", lambda i: bool(i.state.get("gateway")), 60, "the gateway")
    status, answer = post(f"{info.state['gateway']}/v2/models/blind/infer", orjson.dumps({
        "inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": env.X[:2].ravel().tolist()}]}))
    assert status == 200, answer
    info = env.wait("blind", lambda i: "error" in (i.state.get("loop") or {}), 30, "the loop's error in status")
    loop = info.state["loop"]
    assert "none of the features of the reference of blindiris/1 (0, 1, 2, 3) is among the logged inputs" \
        in loop["error"]
    assert loop["dataset_drift"] is None and loop["drift"] == ""
    assert [e.kind for e in env.history("blind")].count("loop.measure_failed") == 1
    env.delete("blind")


def test_labels_that_came_over_more_than_the_drift_horizon_all_train_the_challenger(env: Env) -> None:
    # The retraining read only the drift horizon's labels (10 minutes by default): with labels coming slower
    # than `min_rows` per horizon, the labelled-rows trigger fired, the iteration was skipped for want of rows,
    # the count started again, and so on for ever; nothing was ever retrained.
    write(env.folder / "retrain.py", WORSE)
    spec = loop_spec("slowlabels", cooldown="1h")
    spec["loop"]["drift"]["horizon"] = "1s"  # standing for 10 minutes, with labels 600 times slower
    spec["loop"]["triggers"] = {"on": [{"labelled_rows": 80}], "cooldown": "1h"}
    spec["loop"]["retrain"]["min_rows"] = 70
    env.apply(spec)
    labels = 0
    for total in (60, 30):  # two bursts of labelled answers, the first out of the horizon once the second ends
        with Load(env.url("slowlabels"), env.X, env.y, clients=2, total=total, feedback=True) as load:
            load.wait()
        assert load.feedbacks >= total
        labels += load.feedbacks
        time.sleep(2.0)
    done = ("loop.skipped", "loop.rejected", "loop.failed")
    env.wait("slowlabels", lambda _: any(e.kind in done for e in env.history("slowlabels")), 90, "an iteration")
    events = {e.kind: e.reason for e in env.history("slowlabels")}
    assert "loop.skipped" not in events and "loop.rejected" in events, events
    held = labels - int(labels * 0.7)  # every label in hand, 30% held out
    assert events["loop.retraining"].endswith(f"on {labels - held} labelled rows ({held} held out for the gate)"), \
        events
    env.delete("slowlabels")
