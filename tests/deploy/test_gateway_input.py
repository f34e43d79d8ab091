"""The gateway's answers to bad input match a replica's, and feedback is joined to an answer once per kind."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from deploy_support import Env
from tests_support import at_once, exchange, post

pytestmark = pytest.mark.integration

ROW = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}


@pytest.fixture(scope="module")
def urls(env: Env) -> Iterator[tuple[str, str]]:
    """The deployment's URL at the gateway and at its one replica (`.../v2/models/inputs`)."""
    env.apply({"name": "inputs", "router": {"type": "thompson"},
               "predictors": [{"name": "main", "model_uri": "models:/iris/1"}]})
    replica = env.info("inputs").state["predictors"]["main"]["replicas"][0]
    yield env.url("inputs"), f"http://127.0.0.1:{replica['port']}/v2/models/inputs"
    env.delete("inputs")


def test_the_gateway_refuses_what_a_replica_refuses_with_the_same_answer(urls: tuple[str, str]) -> None:
    plain = orjson.dumps({"inputs": [ROW]})
    size = str(len(plain))
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("/infer", orjson.dumps({"id": 5, "inputs": [ROW]}), {}),
        ("/infer", orjson.dumps({"id": ["a"], "inputs": [ROW]}), {}),
        ("/infer", plain, {"Inference-Header-Content-Length": str(len(plain) + 10)}),  # past the body
        ("/infer", plain, {"Inference-Header-Content-Length": "+" + size}),
        ("/infer", plain, {"Inference-Header-Content-Length": "-1"}),
        ("/infer", plain, {"Inference-Header-Content-Length": "1_0"}),
        ("/infer", plain, {"Inference-Header-Content-Length": "\u00b9"}),  # a digit, but not an ASCII one
        ("/infer", plain, {"Inference-Header-Content-Length": "ten"}),
        ("/infer", b"[1, 2]", {}),
        ("/infer", b"{oops", {}),
        ("/feedback", b'{"id": 5, "truth": 1}', {}),
        ("/feedback", b'{"id": "", "truth": 1}', {}),
        ("/feedback", b'{"truth": 1}', {}),
        ("/feedback", b'{"id": "nope"}', {}),
        ("/feedback", b'{"id": "nope", "truth": 1, "label": 1}', {}),
        ("/feedback", b'{"id": "nope", "reward": true}', {}),
        ("/feedback", b'{"id": "nope", "truth": [[1], [2, 3]]}', {}),
        ("/feedback", b"[1]", {}),
        ("/feedback", b"{oops", {}),
    ]
    gateway, replica = urls
    for path, body, headers in cases:
        expected = post(replica + path, body, headers)
        assert expected[0] == 400, (path, body, headers, expected)
        assert post(gateway + path, body, headers) == expected, (path, body, headers)


def test_each_answer_takes_one_truth_and_one_reward_at_the_gateway(env: Env, urls: tuple[str, str]) -> None:
    gateway, _ = urls

    def answer() -> str:
        status, doc = post(gateway + "/infer", orjson.dumps({"inputs": [ROW]}))
        assert status == 200, doc
        return str(doc["id"])

    def feedback(doc: dict[str, Any]) -> tuple[int, Any]:
        return post(gateway + "/feedback", orjson.dumps(doc))

    first = answer()
    assert feedback({"id": first, "truth": 0})[0] == 200
    for repeat in ({"id": first, "truth": 0}, {"id": first, "truth": 1, "reward": 1}):
        assert feedback(repeat) == (409, {"error": f"feedback for inference id {first!r} was already recorded; "
                                                   "each answer takes one truth"}), repeat
    assert feedback({"id": first, "reward": 1.0})[0] == 200
    assert feedback({"id": first, "reward": 1.0}) == (
        409, {"error": f"feedback for inference id {first!r} was already recorded; each answer takes one reward"})

    second = answer()
    statuses = at_once(8, lambda _: feedback({"id": second, "truth": 0})[0])
    assert sorted(statuses) == [200] + [409] * 7

    # Counted once per answer: two labels, one reward, and the bandit rewarded once for each answer.
    state = env.wait("inputs", lambda i: i.state["windows"]["main"]["labelled"] >= 2
                     and i.state["arms"]["main"]["feedback"] >= 2, 10, "the feedback").state
    window, arm = state["windows"]["main"], state["arms"]["main"]
    assert (window["labelled"], window["accuracy"], window["rewarded"]) == (2, 1.0, 1)
    assert arm["feedback"] == 2


def test_a_truth_gives_one_value_per_row_of_the_answer_at_the_gateway(urls: tuple[str, str]) -> None:
    gateway, _ = urls
    rows = {**ROW, "shape": [2, 4], "data": ROW["data"] * 2}
    status, doc = post(gateway + "/infer", orjson.dumps({"inputs": [rows]}))
    assert status == 200, doc
    answer = doc["id"]
    for truth, got in ((0, "a single value"), ([0, 0, 0], "a list of 3")):
        assert post(gateway + "/feedback", orjson.dumps({"id": answer, "truth": truth})) == (400, {
            "error": f"answer {answer!r} has 2 rows, so 'truth' must be a list of 2 values, one per row like the "
                     f"output; got {got}"})
    # Refused before it was taken: the right shape is still taken once.
    assert post(gateway + "/feedback", orjson.dumps({"id": answer, "truth": [0, 0]}))[0] == 200
    assert post(gateway + "/feedback", orjson.dumps({"id": answer, "truth": [0, 0]}))[0] == 409


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_replicas_report_a_version_a_path_can_name_and_the_gateway_routes_it(urls: tuple[str, str]) -> None:
    gateway, replica = urls  # the deployment serves models:/iris/1
    body = orjson.dumps({"inputs": [ROW]})
    for base in (replica, gateway):
        status, meta = _get(base)
        assert status == 200 and meta["versions"] == ["1"], (base, meta)
        assert _get(base + "/versions/1/ready") == (200, {"name": "inputs", "ready": True})
        status, doc = post(base + "/versions/1/infer", body)
        assert status == 200 and doc["model_version"] == "1", (base, doc)
    status, doc = post(gateway + "/versions/iris:1/infer", body)
    assert status == 200 and doc["parameters"] == {"predictor": "main", "model_version": "iris/1"}
    status, doc = post(gateway + "/versions/2/infer", body)
    assert (status, doc) == (404, {"error": "deployment 'inputs' serves no version '2'; it serves 1 or iris:1"})


def test_the_gateway_refuses_a_request_head_over_the_limit(urls: tuple[str, str]) -> None:
    # The gateway, the most exposed endpoint, held an endless header whole in memory, as replicas did.
    port = int(urls[0].split(":")[2].split("/")[0])
    head = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-filler: "
    answer = exchange(port, head + b"a" * (1 << 20) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert exchange(port, head + b"a" * 1000 + b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
