"""The gateway's `/metrics`: traffic weights of predictors that are gone, requests it refuses itself."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from skyloop.deploy.gateway import Gateway
from skyloop.deploy.spec import RouterSpec


def _samples(gateway: Gateway, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(gateway.metrics.registry).decode()
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def test_a_predictor_no_longer_weighted_loses_its_traffic_weight() -> None:
    gateway = Gateway("dep", RouterSpec(), {"stable": 90.0, "canary": 10.0}, {"mirror": 0.5})
    gateway.set_weights({"canary": 100.0}, {})  # promoted: the old stable and the mirror are retired
    weights = _samples(gateway, "skyloop_gateway_traffic_weight")
    assert weights == {(("deployment", "dep"), ("predictor", "canary")): 100.0}


def test_requests_the_gateway_refuses_itself_are_counted() -> None:
    gateway = Gateway("dep", RouterSpec(), {"main": 100.0})
    client = TestClient(gateway.app)
    assert client.post("/v2/models/other/infer", content=b"{}").status_code == 404
    assert client.post("/v2/models/dep/infer", content=b"{not json").status_code == 400
    assert client.post("/v2/models/dep/infer", content=b'{"inputs": []}',
                       headers={"skyloop-predictor": "nobody"}).status_code == 404
    counted = _samples(gateway, "skyloop_gateway_requests_total")
    assert counted == {(("deployment", "dep"), ("predictor", ""), ("status", "404")): 2.0,
                       (("deployment", "dep"), ("predictor", ""), ("status", "400")): 1.0}


def test_the_loop_figures_of_a_version_no_longer_served_are_removed() -> None:
    # After a rollout, the old version's last drift (1) and quality were reported for good, keeping alerts firing.
    m = Gateway("dep", RouterSpec(), {"main": 100.0}).metrics
    for version in ("iris/1", "iris/2"):
        m.dataset_drift.labels("dep", version).set(1.0)
        m.drift_share.labels("dep", version).set(0.5)
        m.feature_drift.labels("dep", version, "x0").set(0.3)
        m.live_quality.labels("dep", version, "accuracy").set(0.9)
    m.dataset_drift.labels("other", "iris/1").set(1.0)  # another deployment's series stay
    m.forget_version("dep", "iris/1")
    text = generate_latest(m.registry).decode()
    left = {(s.name, s.labels.get("deployment"), s.labels.get("version"))
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in ("skyloop_dataset_drift", "skyloop_drifted_features_share", "skyloop_feature_drift",
                          "skyloop_live_quality")}
    assert left == {("skyloop_dataset_drift", "dep", "iris/2"), ("skyloop_drifted_features_share", "dep", "iris/2"),
                    ("skyloop_feature_drift", "dep", "iris/2"), ("skyloop_live_quality", "dep", "iris/2"),
                    ("skyloop_dataset_drift", "other", "iris/1")}
