"""The rollout state machine, driven with synthetic windows and a fake clock (no processes)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from skyloop.deploy.analysis import Window
from skyloop.deploy.rollout import Phase, Rollout, Transition
from skyloop.deploy.spec import DeploymentSpec, load_deployment_spec


def spec(rollout: dict[str, Any], **analysis: Any) -> DeploymentSpec:
    return load_deployment_spec({
        "name": "iris",
        "predictors": [{"name": "stable", "model_uri": "models:/iris/1", "traffic": 100},
                       {"name": "canary", "model_uri": "models:/iris/2"}],
        "rollout": {"target": "canary", **rollout},
        "analysis": {"interval": 1, "min_samples": 20,
                     "metrics": [{"name": "error_rate", "max": 0.05}, {"name": "latency_p99", "max_ratio": 2.0}],
                     **analysis},
    })


def window(requests: int, errors: int = 0, latency: float = 0.01) -> Window:
    w = Window()
    for i in range(requests):
        w.add_request(latency, i >= errors)
    return w


def healthy() -> dict[str, Window]:
    return {"stable": window(200), "canary": window(50)}


def run(rollout: Rollout, until: float, windows: dict[str, Window], start: float = 0.0,
        step: float = 0.25) -> list[Transition]:
    out: list[Transition] = []
    t = start
    while t <= until and not rollout.done:
        out += rollout.tick(t, windows)
        t += step
    return out


CANARY = {"strategy": "canary", "steps": [{"weight": 10, "duration": 2}, {"weight": 50, "duration": 2}]}


def test_a_healthy_canary_walks_every_step_then_takes_all_traffic() -> None:
    r = Rollout(spec(CANARY), 0.0)
    first = r.start(0.0)
    assert [t.weights["canary"] for t in first] == [10.0]
    assert first[0].weights["stable"] == 90.0 and first[0].new_window
    moves = run(r, 10, healthy())
    assert [t.kind for t in moves] == ["step", "promoted"]
    assert [t.weights["canary"] for t in moves] == [50.0, 100.0]
    assert moves[-1].weights["stable"] == 0.0
    assert r.phase is Phase.HEALTHY and moves[-1].metrics is not None
    assert moves[-1].metrics["verdict"] == "Successful"


def test_errors_roll_the_canary_back_with_the_figures_that_caused_it() -> None:
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    moves = run(r, 10, {"stable": window(200), "canary": window(100, errors=30)})
    assert moves[-1].kind == "rolled_back" and r.phase is Phase.DEGRADED
    assert moves[-1].weights == {"canary": 0.0, "stable": 100.0}
    assert "error_rate" in moves[-1].reason
    error = next(m for m in moves[-1].metrics["metrics"] if m["name"] == "error_rate")  # type: ignore[index]
    assert error["value"] == 0.3 and error["passed"] is False


def test_a_slower_canary_is_rolled_back_against_the_stable_latency() -> None:
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    moves = run(r, 10, {"stable": window(200, latency=0.01), "canary": window(100, latency=0.05)})
    assert moves[-1].kind == "rolled_back" and "latency_p99" in moves[-1].reason


def test_failure_limit_tolerates_that_many_failed_checks() -> None:
    r = Rollout(spec(CANARY, failure_limit=2), 0.0)
    r.start(0.0)
    bad = {"stable": window(200), "canary": window(100, errors=30)}
    moves = run(r, 10, bad)
    assert [t.kind for t in moves] == ["analysis.failed", "analysis.failed", "rolled_back"]


def test_a_tolerated_failure_is_not_counted_again_from_the_same_requests() -> None:
    # The gateway's windows grow with every request until a transition asks for fresh ones. A burst of errors
    # at the start, then none: the one failure tolerated must not come back at each later check.
    r = Rollout(spec(CANARY, failure_limit=1), 0.0)
    windows = {"stable": Window(), "canary": Window()}
    kinds: list[str] = []

    def fill(errors: int) -> None:
        for name, count in (("stable", 100), ("canary", 40)):
            for i in range(count):
                windows[name].add_request(0.01, name == "stable" or i >= errors)

    for t in r.start(0.0):
        kinds.append(t.kind)
    moments = [i * 0.25 for i in range(1, 60)]
    for now in moments:
        fill(20 if now <= 1.0 else 0)  # the first second: half the canary's requests fail
        for t in r.tick(now, windows):
            kinds.append(t.kind)
            if t.new_window:
                windows = {"stable": Window(), "canary": Window()}
        if r.done:
            break
    # Before: the second check still saw the burst in the same window, and rolled the canary back.
    assert kinds == ["step", "analysis.failed", "step", "promoted"], kinds
    assert r.phase is Phase.HEALTHY


def test_no_traffic_pauses_as_inconclusive_and_never_promotes() -> None:
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    moves = run(r, 120, {"stable": window(5), "canary": window(1)})
    assert [t.kind for t in moves] == ["paused"]
    assert r.phase is Phase.PAUSED and not r.done
    assert moves[0].reason.startswith("Inconclusive") and moves[0].weights["canary"] == 10.0
    # A user may resume it: the next step starts.
    resumed = r.command("promote", 121.0)
    assert [t.kind for t in resumed] == ["resumed", "step"] and resumed[-1].weights["canary"] == 50.0


def test_a_paused_rollout_still_rolls_back_on_failures() -> None:
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    run(r, 5, {"stable": window(5), "canary": window(1)})
    assert r.phase is Phase.PAUSED
    moves = run(r, 10, {"stable": window(200), "canary": window(100, errors=50)}, start=5.0)
    assert moves[-1].kind == "rolled_back"


def test_a_rollout_paused_on_an_inconclusive_end_resumes_once_its_analysis_is_successful() -> None:
    # Before, it waited for a person for good: a closed loop's canary stalled on a step whose traffic came late.
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    run(r, 5, {"stable": window(5), "canary": window(1)})
    assert r.phase is Phase.PAUSED and r.waiting
    moves = run(r, 20, healthy(), start=5.0)
    assert [t.kind for t in moves] == ["resumed", "step", "promoted"]
    assert moves[0].reason.startswith("step 1 judged Successful in its pause") and moves[1].weights["canary"] == 50.0
    assert r.phase is Phase.HEALTHY


def test_an_untimed_pause_waits_for_promote_and_a_timed_one_does_not() -> None:
    steps = {"strategy": "canary", "steps": [{"weight": 20, "duration": 1}, {"pause": {}},
                                             {"pause": {"duration": 2}}, {"weight": 60, "duration": 1}]}
    r = Rollout(spec(steps), 0.0)
    r.start(0.0)
    moves = run(r, 30, healthy())
    assert [t.kind for t in moves] == ["paused"] and r.waiting
    assert moves[0].weights["canary"] == 20.0
    after = r.command("promote", 31.0)
    assert [t.kind for t in after] == ["resumed", "step"]
    moves = run(r, 60, healthy(), start=31.0)
    assert [t.kind for t in moves] == ["step", "promoted"]


def test_rollback_and_full_promotion_on_request() -> None:
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    assert [t.kind for t in r.command("rollback", 0.5)] == ["rolled_back"]
    assert r.command("promote", 1.0) == []  # done: commands change nothing
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    full = r.command("promote_full", 0.5)
    assert full[-1].kind == "promoted" and full[-1].weights["canary"] == 100.0


def test_blue_green_mirrors_the_target_then_switches_at_once() -> None:
    r = Rollout(spec({"strategy": "blue_green", "preview": 3}), 0.0)
    first = r.start(0.0)
    assert first[0].kind == "preview" and first[0].mirrors == {"canary": 1.0}
    assert first[0].weights == {"canary": 0.0, "stable": 100.0}
    moves = run(r, 10, healthy())
    assert [t.kind for t in moves] == ["promoted"]
    assert moves[0].weights == {"canary": 100.0, "stable": 0.0} and moves[0].mirrors == {}


def test_blue_green_with_a_failing_preview_never_switches() -> None:
    r = Rollout(spec({"strategy": "blue_green", "preview": 3}), 0.0)
    r.start(0.0)
    moves = run(r, 10, {"stable": window(200), "canary": window(100, errors=40)})
    assert moves[-1].kind == "rolled_back" and moves[-1].weights["canary"] == 0.0 and moves[-1].mirrors == {}


def test_quality_from_feedback_decides() -> None:
    s = spec(CANARY, metrics=[{"name": "accuracy", "max_drop": 0.05}])
    r = Rollout(s, 0.0)
    r.start(0.0)
    stable, canary = window(100), window(100)
    for i in range(100):
        stable.add_feedback(correct=i % 10 != 0)   # 0.9
        canary.add_feedback(correct=i % 2 == 0)    # 0.5
    moves = run(r, 10, {"stable": stable, "canary": canary})
    assert moves[-1].kind == "rolled_back" and "accuracy" in moves[-1].reason



def test_failure_limit_counts_failed_checks_over_the_whole_rollout_not_per_step() -> None:
    # One failed check per step, with one tolerated: before, each new step forgave the last one's failure and a
    # canary failing at every step was promoted (4 failed checks, limit 1). Argo's failureLimit and Flagger's
    # threshold count over the whole analysis.
    steps = {"strategy": "canary", "steps": [{"weight": w, "duration": 2} for w in (10, 20, 40, 60)]}
    r = Rollout(spec(steps, failure_limit=1), 0.0)
    r.start(0.0)
    kinds: list[str] = []
    t, fresh = 0.25, True
    while t < 60 and not r.done:
        # The first check of each step's fresh windows fails, the later ones pass.
        windows = {"stable": window(200), "canary": window(100, errors=30 if fresh else 0)}
        moves = r.tick(t, windows)
        kinds += [m.kind for m in moves]
        fresh = any(m.kind == "step" for m in moves) or (fresh and not moves)
        t += 0.25
    assert kinds == ["analysis.failed", "step", "rolled_back"], kinds
    assert r.phase is Phase.DEGRADED and r.failures == 2


def test_a_spec_applied_again_mid_rollout_carries_the_rollout_over_under_its_new_analysis() -> None:
    steps = {"strategy": "canary", "steps": [{"weight": 20, "duration": 60}, {"weight": 60, "duration": 60}]}
    r = Rollout(spec(steps, failure_limit=2), 0.0, served="abc")
    r.start(0.0)
    r.tick(10.0, {"stable": window(200), "canary": window(100, errors=30)})
    looser = spec(steps, failure_limit=2, metrics=[{"name": "error_rate", "max": 0.5}])
    carried = Rollout.carry(looser, r, 30.0)
    assert carried is not None and carried.spec is looser and carried.served == "abc"
    assert (carried.step, carried.failures, carried.weights) == (0, 1, {"canary": 20.0, "stable": 80.0})
    assert carried.step_started == 0.0  # the step's clock goes on
    # Judged by the new analysis: 30% errors pass the new bound of 50%.
    assert [t.kind for t in carried.tick(31.0, {"stable": window(200), "canary": window(100, errors=30)})] == []
    # Another rollout (other steps), another target, or other live predictors: started afresh.
    assert Rollout.carry(spec(CANARY), r, 30.0) is None
    assert Rollout.carry(load_deployment_spec({**looser.model_dump(mode="json"), "rollout": {
        **looser.rollout.model_dump(mode="json"), "target": "stable"}}), r, 30.0) is None
    three = looser.model_dump(mode="json")
    three["predictors"].append({"name": "other", "model_uri": "models:/iris/1", "traffic": 0})
    assert Rollout.carry(load_deployment_spec(three), r, 30.0) is None


def test_a_finished_rollout_carried_over_keeps_its_result() -> None:
    steps = {"strategy": "canary", "steps": [{"weight": 20, "duration": 60}]}
    r = Rollout(spec(steps), 0.0, served="abc")
    r.start(0.0)
    r.command("promote_full", 1.0)
    # Other steps, even another strategy: the target won, and keeps all traffic.
    other = spec({"strategy": "blue_green", "preview": 10})
    kept = Rollout.carry(other, r, 50.0)
    assert kept is not None and kept.done and kept.phase is Phase.HEALTHY and kept.served == "abc"
    assert kept.weights == {"canary": 100.0, "stable": 0.0} and kept.step == 0
    assert run(kept, 100.0, healthy(), start=50.0) == []
    again = Rollout.resume(other, json.loads(json.dumps(kept.saved(60.0))), 70.0)
    assert again is not None and again.done and again.served == "abc"
    r = Rollout(spec(steps), 0.0)
    r.start(0.0)
    r.command("rollback", 1.0)
    lost = Rollout.carry(spec(steps), r, 50.0)
    assert lost is not None and lost.phase is Phase.DEGRADED and lost.weights == {"canary": 0.0, "stable": 100.0}


def resumed(r: Rollout, saved_at: float, now: float) -> Rollout:
    """The rollout a controller started later makes, at `now` on its own clock, of what `r` saved at `saved_at`."""
    again = Rollout.resume(r.spec, json.loads(json.dumps(r.saved(saved_at))), now)
    assert again is not None
    return again


def test_a_restarted_controller_goes_on_at_the_step_and_time_it_saved() -> None:
    steps = {"strategy": "canary", "steps": [{"weight": 20, "duration": 60}, {"pause": {}},
                                             {"weight": 60, "duration": 60}]}
    r = Rollout(spec(steps, failure_limit=3), 0.0)
    r.start(0.0)
    r.command("promote", 1.0)
    # Paused at step 2/3 until promoted: still so after a restart.
    paused = resumed(r, 2.0, 1000.0)
    assert (paused.step, paused.phase, paused.waiting, paused.weights) == (1, Phase.PAUSED, True, r.weights)
    assert run(paused, 1200.0, healthy(), start=1000.0) == []
    r.command("promote", 3.0)
    assert r.tick(4.0, {"stable": window(200), "canary": window(100, errors=30)})[0].kind == "analysis.failed"
    assert run(r, 23.0, healthy(), start=5.0, step=1.0) == []
    # 20s of the step's 60 and the failed check are kept: the canary is not sent back to 20% and step 1.
    later = resumed(r, 23.0, 5000.0)
    assert (later.step, later.phase, later.failures, later.waiting) == (2, Phase.PROGRESSING, 1, False)
    assert later.weights == {"canary": 60.0, "stable": 40.0} and later.mirrors == {}
    promoted_at = next(t for t in range(5000, 5100) if later.tick(float(t), healthy()))
    assert promoted_at == 5040 and later.phase is Phase.HEALTHY
    # Saved a moment before its end, the step gets one analysis interval (1s) of fresh windows to be judged on.
    assert resumed(r, 62.9, 5000.0).step_started == 5000.0 - 59.0


def test_a_restarted_controller_keeps_a_preview_and_a_finished_rollout() -> None:
    r = Rollout(spec({"strategy": "blue_green", "preview": 30}), 0.0)
    r.start(0.0)
    preview = resumed(r, 10.0, 500.0)
    assert (preview.step, preview.mirrors, preview.weights) == (0, {"canary": 1.0}, {"canary": 0.0, "stable": 100.0})
    assert [t.kind for t in run(preview, 600.0, healthy(), start=500.0)] == ["promoted"]
    r.command("rollback", 11.0)
    ended = resumed(r, 12.0, 500.0)
    assert ended.done and ended.phase is Phase.DEGRADED and ended.weights == {"canary": 0.0, "stable": 100.0}
    assert run(ended, 600.0, healthy(), start=500.0) == [] and ended.command("promote", 601.0) == []


@pytest.mark.parametrize("change", [
    {"target": "stable"}, {"strategy": "blue_green"}, {"step": 5}, {"step": -1}, {"phase": "Lost"},
    {"weights": {"canary": 10.0}}, {"elapsed": "1m"}, {"mirrors": {"stable": 1.0}},
])
def test_a_saved_rollout_that_does_not_fit_the_spec_is_started_afresh(change: dict[str, Any]) -> None:
    r = Rollout(spec(CANARY), 0.0)
    r.start(0.0)
    assert Rollout.resume(r.spec, {**r.saved(1.0), **change}, 10.0) is None


def rollout_under_load(r: Rollout, error_rate: dict[str, float], seed: int, rps: int = 20) -> Phase:
    """Walk `r` for up to 400s (or to its end) with `rps` requests a second split by its weights, each failing
    with its predictor's error rate (seeded); windows open afresh as each step begins, as the gateway's do."""
    rng = random.Random(seed)
    r.start(0.0)
    windows = {name: Window(rng=random.Random(seed)) for name in r.weights}
    for t in range(1, 400):
        for _ in range(rps):
            name = "canary" if rng.random() * 100 < r.weights["canary"] else "stable"
            windows[name].add_request(0.02 * rng.lognormvariate(0, 0.3), rng.random() >= error_rate[name])
        for move in r.tick(float(t), windows):
            if move.new_window:
                windows = {name: Window(rng=random.Random(seed)) for name in r.weights}
        if r.done:
            break
    return r.phase


def test_a_canary_as_good_as_stable_is_not_rolled_back_by_chance_and_a_bad_one_never_promoted() -> None:
    s = load_deployment_spec({
        "name": "iris",
        "predictors": [{"name": "stable", "model_uri": "models:/iris/1", "traffic": 100},
                       {"name": "canary", "model_uri": "models:/iris/2"}],
        "rollout": {"strategy": "canary", "target": "canary",
                    "steps": [{"weight": 10, "duration": 60}, {"weight": 50, "duration": 60}]},
    })  # the default analysis: error_rate <= 1% and latency_p99 <= 2x stable, 50 samples, every 5s
    # Both err 0.3% of the time: one error among the canary's first 50-99 requests was over 1% and rolled it
    # back, in 19 of these 40 rollouts.
    same = [rollout_under_load(Rollout(s, 0.0), {"stable": 0.003, "canary": 0.003}, seed) for seed in range(40)]
    assert Phase.DEGRADED not in same and same.count(Phase.HEALTHY) >= 36
    # One erring 5% of the time is rolled back, if not at once then once its pause has gathered the evidence.
    bad = [rollout_under_load(Rollout(s, 0.0), {"stable": 0.003, "canary": 0.05}, seed) for seed in range(40)]
    assert bad == [Phase.DEGRADED] * 40
