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
