"""Deployment specs refuse analysis bounds and rollout fields that cannot be meant: each would be silently
ignored, never fail, or always fail, with no message."""

from __future__ import annotations

import re
from typing import Any

import pytest

from skyloop.deploy.spec import load_deployment_spec
from skyloop.errors import SpecError

TWO = [{"name": "a", "model_uri": "models:/iris/1", "traffic": 100}, {"name": "b", "model_uri": "models:/iris/2"}]
CANARY = {"strategy": "canary", "target": "b", "steps": [{"weight": 10, "duration": 5}]}


def judged(*metrics: dict[str, Any], rollout: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "d", "predictors": TWO, "rollout": rollout or CANARY, "analysis": {"metrics": list(metrics)}}


@pytest.mark.parametrize(("doc", "message"), [
    (judged({"name": "error_rate", "max": 5}),  # meant as 5%: it could never fail
     "analysis.metrics.0: metric error_rate: max 5 is not in [0, 1]; error_rate is a fraction: 1% is 0.01"),
    (judged({"name": "accuracy", "min": 90}),  # meant as 90%: every canary would be rolled back
     "analysis.metrics.0: metric accuracy: min 90 is not in [0, 1]; accuracy is a fraction: 1% is 0.01"),
    (judged({"name": "accuracy", "max_drop": 2}),
     "metric accuracy: max_drop 2 is not in [0, 1]; accuracy is a fraction: 1% is 0.01"),
    (judged({"name": "error_rate", "min": -0.1}), "metric error_rate: min -0.1 is not in [0, 1]"),
    (judged({"name": "error_rate", "min": 0.5, "max": 0.1}),
     "metric error_rate: min 0.5 is above max 0.1, so no value passes; swap them"),
    (judged({"name": "latency_p99", "min": 2, "max": 1}), "metric latency_p99: min 2 is above max 1"),
    (judged({"name": "error_rate", "max": 0.1}, {"name": "error_rate", "max": 0.5}),
     "analysis.metrics: error_rate appears 2 times; give each metric once, with all its bounds"),
    (judged({"name": "mean_reward", "min": 0.1}, rollout={"strategy": "blue_green", "target": "b"}),
     "analysis.metrics.0: mean_reward cannot judge a blue_green preview: the target only sees mirrored traffic, "
     "and a reward judges the answer the client saw"),
    ({"name": "d", "predictors": TWO[:1], "rollout": {"promote_alias": "champion"}},
     "rollout: a rolling update promotes nothing, so promote_alias would never move"),
    ({"name": "d", "predictors": TWO[:1], "rollout": {"preview": "1m"}},
     "rollout: preview is for blue_green; a rolling rollout has no preview"),
    ({**judged({"name": "error_rate", "max": 0.01}), "rollout": {**CANARY, "preview": 60}},
     "rollout: preview is for blue_green; a canary rollout has no preview"),
])
def test_bounds_and_fields_that_cannot_be_meant_are_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        load_deployment_spec(doc)


@pytest.mark.parametrize("doc", [
    judged({"name": "error_rate", "min": 0, "max": 1}, {"name": "accuracy", "min": 0.9, "max_drop": 0.02}),
    judged({"name": "mean_reward", "min": -5, "max_drop": 3}),  # rewards are not fractions
    judged({"name": "latency_p99", "max": 2.5, "max_ratio": 3}),
    judged({"name": "accuracy", "max_drop": 0.02}, rollout={"strategy": "blue_green", "target": "b", "preview": 5}),
    judged({"name": "mean_reward", "min": 0.1}, rollout={**CANARY, "promote_alias": "champion"}),
])
def test_meaningful_bounds_are_taken_and_survive_the_stored_json(doc: dict[str, Any]) -> None:
    spec = load_deployment_spec(doc)
    assert load_deployment_spec(spec.model_dump(mode="json")) == spec  # the default preview is stored too


@pytest.mark.parametrize(("step", "where"), [
    ({"weight": 10, "duration": -5}, "rollout.steps.0.duration"),
    ({"weight": 10, "duration": "-5s"}, "rollout.steps.0.duration"),
    ({"pause": {"duration": -5}}, "rollout.steps.0: pause.duration"),
    ({"pause": {"duration": "-5s"}}, "rollout.steps.0: pause.duration"),
])
def test_a_negative_duration_gets_one_message_however_it_is_written(step: dict[str, Any], where: str) -> None:
    doc = {**judged({"name": "error_rate", "max": 0.01}), "rollout": {**CANARY, "steps": [step]}}
    with pytest.raises(SpecError, match=re.escape(f"{where}: a duration cannot be negative")):
        load_deployment_spec(doc)
