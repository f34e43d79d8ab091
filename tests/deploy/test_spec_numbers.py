"""Numbers in deployment and serving specs must be finite: NaN passes every bound, and neither survives JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skyloop.deploy.spec import load_deployment_spec
from skyloop.errors import SpecError
from skyloop.serving.spec import load_serve_spec

TWO = [{"name": "a", "model_uri": "models:/iris/1", "traffic": 100}, {"name": "b", "model_uri": "models:/iris/2"}]


def canary(step: dict[str, Any]) -> dict[str, Any]:
    return {"name": "d", "predictors": TWO, "rollout": {"strategy": "canary", "target": "b", "steps": [step]}}


@pytest.mark.parametrize(("yaml_value", "value"), [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_a_serving_spec_refuses_a_batch_time_that_is_not_finite(tmp_path: Path, yaml_value: str, value: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("name: s\ngraph: {name: m, model_uri: 'models:/iris/1'}\n"
                    f"batching: {{max_batch_time: {yaml_value}}}\n")
    with pytest.raises(SpecError, match=f"batching.max_batch_time: must be a finite number of "
                                        f"seconds, got {value}"):
        load_serve_spec(path)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("doc", "message"), [
    ({"name": "d", "predictors": [{**TWO[0], "batching": {"max_batch_time": NAN}}]},
     "predictors.0.batching.max_batch_time: must be a finite number of seconds"),
    ({"name": "d", "predictors": TWO[:1], "analysis": {"interval": NAN}},
     "analysis.interval: must be a finite number of seconds"),
    ({"name": "d", "predictors": TWO[:1], "analysis": {"interval": INF}},
     "analysis.interval: must be a finite number of seconds"),
    (canary({"weight": 10, "duration": NAN}), "rollout.steps.0.duration: must be a finite number of seconds"),
    (canary({"weight": 10, "duration": "9" * 306 + "h"}),  # a string that is finite until it is made seconds
     "rollout.steps.0.duration: must be a finite number of seconds"),
    (canary({"pause": {"duration": NAN}}), "rollout.steps.0: pause.duration: must be a finite number of seconds"),
    ({"name": "d", "predictors": TWO, "rollout": {"strategy": "blue_green", "target": "b", "preview": NAN}},
     "rollout.preview: must be a finite number of seconds"),
    ({"name": "d", "predictors": TWO[:1], "analysis": {"metrics": [{"name": "error_rate", "max": NAN}]}},
     "analysis.metrics.0.max: Input should be a finite number"),
    ({"name": "d", "predictors": TWO[:1], "analysis": {"metrics": [{"name": "accuracy", "min": -INF}]}},
     "analysis.metrics.0.min: Input should be a finite number"),
    ({"name": "d", "predictors": TWO[:1], "analysis": {"metrics": [{"name": "latency_p99", "max_ratio": INF}]}},
     "analysis.metrics.0.max_ratio: Input should be a finite number"),
    ({"name": "d", "predictors": TWO[:1], "analysis": {"metrics": [{"name": "accuracy", "max_drop": NAN}]}},
     "analysis.metrics.0.max_drop: Input should be a finite number"),
])
def test_a_deployment_spec_refuses_numbers_that_are_not_finite(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        load_deployment_spec(doc)


LOOP = {"name": "d", "predictors": TWO[:1]}
RETRAIN = {"pipeline": "train.py:train", "model": "iris"}


@pytest.mark.parametrize(("loop", "message"), [
    ({"triggers": {"on": [{"quality_below": NAN}]}, "retrain": RETRAIN},
     "loop.triggers.on.0.quality_below: Input should be a finite number"),
    ({"log": {"flush_seconds": INF}}, "loop.log.flush_seconds: Input should be a finite number"),
    ({"log": {"sample": NAN}}, "loop.log.sample: Input should be a finite number"),
    ({"drift": {"tests": {"features": {"x": {"threshold": INF}}}}},
     "loop.drift.tests.features.x.threshold: Input should be a finite number"),
    ({"drift": {"tests": {"share": NAN}}}, "loop.drift.tests.share: Input should be a finite number"),
])
def test_the_monitoring_specs_a_loop_embeds_refuse_numbers_that_are_not_finite(loop: dict[str, Any],
                                                                               message: str) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        load_deployment_spec({**LOOP, "loop": loop})


def test_a_finite_spec_survives_the_json_the_controller_stores() -> None:
    doc = canary({"weight": 10, "duration": "1h"})
    doc["analysis"] = {"interval": "250ms", "metrics": [{"name": "error_rate", "max": 0.05}]}
    spec = load_deployment_spec(doc)
    assert load_deployment_spec(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(("doc", "message"), [
    (canary({"weight": 0, "duration": 10}), "rollout.steps.0: a step gives the target traffic to analyse: weight "
                                            "and duration must be above 0, got weight 0 for 10s"),
    (canary({"weight": 10, "duration": "0s"}), "rollout.steps.0: a step gives the target traffic to analyse"),
    ({"name": "d", "predictors": TWO, "rollout": {"strategy": "blue_green", "target": "b", "preview": 0}},
     "rollout: preview: the target is analysed on mirrored traffic for this long"),
    (canary({"weight": 100, "duration": 10}), "rollout.steps.0.weight: at 100 the stable predictor gets no traffic, "
                                              "so latency_p99 (a bound against it) cannot be judged"),
])
def test_a_rollout_step_with_nothing_to_judge_is_refused(doc: dict[str, Any], message: str) -> None:
    # Judged on empty windows (no target traffic, no time, or no stable traffic to compare with), the step
    # always ended Inconclusive and the rollout paused there for good.
    with pytest.raises(SpecError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_deployment_spec(doc)


def test_a_full_step_is_taken_where_every_bound_is_absolute() -> None:
    doc = {**canary({"weight": 100, "duration": 10}), "analysis": {"metrics": [{"name": "error_rate", "max": 0.01}]}}
    assert load_deployment_spec(doc).rollout.steps[0].weight == 100
