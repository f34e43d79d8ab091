"""How the gateway judges predictors: a replica's 4xx is the predictor's fault, shadows see every request,
accuracy counts rows, a late label counts in the window of its answer, and feedback for a retired predictor is
stored rather than lost. A real gateway over real replicas (the serving app) on 127.0.0.1, in this process."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from test_gateway_forwarding import INFER, ROW, _gateway, _post, _replica, _serving

from skyloop.config import Settings
from skyloop.deploy.analysis import Verdict, analyse
from skyloop.deploy.spec import AnalysisSpec, RouterSpec
from skyloop.deploy.traffic import Traffic
from skyloop.serving import DataPlane, create_app
from skyloop.serving.spec import GraphNode, ServeSpec
from skyloop.store.feedback import list_feedback
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration

@contextlib.asynccontextmanager
async def _registered_replica(settings: Settings, uri: str, version: str) -> AsyncIterator[int]:
    """A replica serving a registered model (which checks requests against its signature)."""
    spec = ServeSpec(name="dep", version=version, graph=GraphNode(name="model", model_uri=uri))
    plane = DataPlane([spec], settings, behind_router=True)
    async with _serving(create_app(plane)) as port, aiohttp.ClientSession() as client:
        for _ in range(600):
            async with client.get(f"http://127.0.0.1:{port}/v2/health/ready") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        yield port


def test_a_canary_whose_signature_refuses_every_request_fails_its_analysis_and_loses_its_bandit_arm(
        settings: Settings, nodes: Path) -> None:
    # The canary answered 422 to everything (a new model wants 5 features, clients send 4): counted as a success
    # (status < 500), it passed `error_rate <= 0.01` and was promoted, and a bandit never learned of it.
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model

    X = [[float(i % 7), float(i % 3), float(i % 5), float(i % 2), 1.0] for i in range(40)]
    y = [i % 2 for i in range(40)]
    log_model(LogisticRegression().fit(X, y), "iris", input_example=X[:5], settings=settings)
    router = RouterSpec(type="thompson")

    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "7", label=0) as stable, \
                _registered_replica(settings, "models:/iris/1", "1") as canary, \
                _gateway({"stable": ("iris/7", stable), "canary": ("iris/1", canary)}, {"stable": 0, "canary": 0},
                         router) as (gateway, url):
            gateway.traffic = Traffic(router, {"stable": 0, "canary": 0}, rng=random.Random(0))  # reproducible
            base = url + "/v2/models/dep"
            for _ in range(20):  # the canary's share of a canary step
                status, _, doc = await _post(base + "/infer", INFER, {"skyloop-predictor": "canary"})
                assert status == 422 and "must have shape [-1, 5]" in doc["error"], doc
            window = gateway.window("canary")
            assert (window.requests, window.errors, window.client_errors) == (20, 20, 20)
            checks = AnalysisSpec().metrics  # the defaults: error_rate <= 0.01, latency_p99 <= 2x stable
            verdict = analyse(checks, window, gateway.window("stable"), min_samples=20)
            assert verdict.verdict is Verdict.FAILED and verdict.reason.startswith("error_rate 1 > max 0.01")
            answered: list[tuple[str, int]] = []
            for _ in range(60):
                status, headers, doc = await _post(base + "/infer", INFER)
                answered.append((headers["skyloop-predictor"], status))
                if status == 200:
                    await _post(base + "/feedback", orjson.dumps({"id": doc["id"], "truth": 0}))
            refused = answered.count(("canary", 422))
            assert refused + answered.count(("stable", 200)) == 60 and refused <= 3, answered  # the bandit learned
            arms = gateway.traffic.arms()
            assert arms["canary"] == {**arms["canary"], "errors": 20 + refused, "feedback": 0, "mean_reward": 0.0}

    asyncio.run(scenario())


def test_a_shadow_gets_the_requests_its_primary_failed(settings: Settings, nodes: Path) -> None:
    # Mirrored only after a 200 of the primary, a blue-green target was never tried where the stable failed.
    async def scenario() -> None:
        async with _replica(settings, nodes, "Complex", "1") as broken, \
                _replica(settings, nodes, "Constant", "2") as shadow, \
                _gateway({"main": ("iris/1", broken), "green": ("iris/2", shadow)}, {"main": 100}) as (gateway, url):
            gateway.set_weights({"main": 100}, {"green": 1.0})
            for _ in range(5):
                status, _, doc = await _post(url + "/v2/models/dep/infer", INFER)
                assert status == 500, doc
            deadline = time.monotonic() + 10
            while gateway.window("green").requests < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert (gateway.window("green").requests, gateway.window("green").errors) == (5, 0)

    asyncio.run(scenario())


def test_accuracy_and_a_truths_reward_count_rows(settings: Settings, nodes: Path) -> None:
    # Scored per answer, a 10-row answer with one wrong row counted as one wrong label: a model 92% right per
    # row scored about 0.43, and failed `min: 0.8`.
    router = RouterSpec(type="epsilon_greedy", epsilon=0.0)
    rows = {**ROW, "shape": [10, 4], "data": ROW["data"] * 10}

    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=0) as port, \
                _gateway({"main": ("iris/1", port)}, {"main": 0}, router) as (gateway, url):
            base = url + "/v2/models/dep"
            for _ in range(2):
                status, _, answer = await _post(base + "/infer", orjson.dumps({"inputs": [rows]}))
                assert status == 200 and answer["outputs"][0]["data"] == [0] * 10
                truth = [0] * 9 + [1]
                status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answer["id"], "truth": truth}))
                assert status == 200, doc
            window = gateway.window("main")
            assert (window.labelled, window.correct) == (20, 18)
            assert gateway.traffic.arms()["main"]["mean_reward"] == pytest.approx(0.9)

    asyncio.run(scenario())


def test_a_late_label_counts_only_in_the_window_of_its_answer(settings: Settings, nodes: Path) -> None:
    # Credited to whatever window was open, the labels of one burst of wrong answers were judged again in the
    # fresh windows a tolerated failure opened, and used up the next failures too.
    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=1) as port, \
                _replica(settings, nodes, "Constant", "2", label=1) as mirror, \
                _gateway({"main": ("iris/1", port), "shadow": ("iris/2", mirror)}, {"main": 100}) as (gateway, url):
            gateway.set_weights({"main": 100}, {"shadow": 1.0})
            base = url + "/v2/models/dep"
            ids = []
            for _ in range(6):
                status, _, answer = await _post(base + "/infer", INFER)
                assert status == 200
                ids.append(answer["id"])
            deadline = time.monotonic() + 10
            while any(not gateway.answers[i].shadows for i in ids) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for answer_id in ids[:3]:  # before the check
                assert (await _post(base + "/feedback", orjson.dumps({"id": answer_id, "truth": 0})))[0] == 200
            assert (gateway.window("main").labelled, gateway.window("shadow").labelled) == (3, 3)
            gateway.new_windows()  # the check failed and was tolerated: fresh windows
            for answer_id in ids[3:]:  # late labels of the same answers
                assert (await _post(base + "/feedback", orjson.dumps({"id": answer_id, "truth": 0})))[0] == 200
            assert (gateway.window("main").labelled, gateway.window("shadow").labelled) == (0, 0)
            status, _, answer = await _post(base + "/infer", INFER)  # an answer of the fresh window
            await _post(base + "/feedback", orjson.dumps({"id": answer["id"], "truth": 1}))
            assert (gateway.window("main").labelled, gateway.window("main").correct) == (1, 1)

    asyncio.run(scenario())


def test_feedback_for_a_retired_predictors_answer_is_stored_at_once(settings: Settings, nodes: Path) -> None:
    # It waited 5 s for a replica of a predictor that was gone for good, then got a 503 and was lost.
    workspace = Workspace.open(settings)

    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=0) as port, \
                _gateway({"stable": ("iris/1", port)}, {"stable": 100}) as (gateway, url):
            base = url + "/v2/models/dep"
            answers = []
            for _ in range(2):
                status, _, answer = await _post(base + "/infer", INFER)
                assert status == 200
                answers.append(answer["id"])
            gateway.pools.pop("stable")  # promoted over: retired
            start = time.monotonic()
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answers[0], "truth": 0}))
            assert (status, time.monotonic() - start < 2) == (503, True), doc
            assert doc["error"] == ("predictor 'stable' is no longer served (retired after a rollout) and this "
                                    "gateway has no DB to store its feedback in")
            gateway.db = workspace.db  # as the controller's gateway has it
            start = time.monotonic()
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answers[0], "truth": 0}))
            assert (status, time.monotonic() - start < 2) == (200, True), doc
            assert doc == {"id": answers[0], "stored": True, "nodes_told": 0, "nodes_failed": {}, "predictor": "stable"}
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answers[0], "reward": 0.5}))
            assert status == 200, doc
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answers[0], "truth": 1}))
            assert status == 409, doc  # taken once, as on a replica
            with workspace.db.session() as session:
                rows = list_feedback(session, "dep")
            assert [(r.inference_id, r.version, r.truth, r.reward) for r in rows] == [(answers[0], "1", 0, 0.5)]

    try:
        asyncio.run(scenario())
    finally:
        workspace.close()
