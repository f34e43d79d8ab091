"""The gateway in front of replicas that misbehave: each a real HTTP server on 127.0.0.1, in this process.

Replicas are the serving app over a `DataPlane` (user node classes, no registry); one test's replica is a raw
socket server that dies in the middle of its answer, as a killed worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from skyloop.config import Settings
from skyloop.deploy.gateway import Endpoint, Gateway, Pool
from skyloop.deploy.pools import served_version
from skyloop.deploy.spec import RouterSpec
from skyloop.deploy.traffic import Traffic
from skyloop.serving import DataPlane, create_app
from skyloop.serving.spec import GraphNode, ServeSpec

pytestmark = pytest.mark.integration

ROW = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
INFER = orjson.dumps({"inputs": [ROW]})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test's process keeps its own signal handlers
        yield


@contextlib.asynccontextmanager
async def _serving(app: Any, lifespan: str = "on") -> AsyncIterator[int]:
    """`app` under uvicorn on a free port of 127.0.0.1, in this event loop; stopped on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, log_level="error", access_log=False, lifespan=lifespan, ws="none"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


@contextlib.asynccontextmanager
async def _replica(settings: Settings, folder: Path, implementation: str, version: str,
                   **parameters: Any) -> AsyncIterator[int]:
    """A replica as the controller starts one: the deployment's name, the predictor's graph, its V2 version."""
    graph = GraphNode(name="model", implementation=f"nodes.py:{implementation}", parameters=parameters)
    spec = ServeSpec(name="dep", version=version, graph=graph, base_dir=folder)
    plane = DataPlane([spec], settings, behind_router=True)
    async with _serving(create_app(plane)) as port, aiohttp.ClientSession() as client:
        for _ in range(600):
            async with client.get(f"http://127.0.0.1:{port}/v2/health/ready") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        yield port


@contextlib.asynccontextmanager
async def _gateway(pools: dict[str, tuple[str, int]], weights: dict[str, float],
                   router: RouterSpec | None = None) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway for deployment `dep` over `pools` (predictor -> (pinned version, replica port))."""
    gateway = Gateway("dep", router or RouterSpec(), weights)
    for name, (version, port) in pools.items():
        gateway.pools[name] = Pool(name, version, [Endpoint(name, 0, port)])
    try:
        async with _serving(gateway.app, lifespan="off") as port:
            yield gateway, f"http://127.0.0.1:{port}"
    finally:
        await gateway.close()


async def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as client, client.post(url, data=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return resp.status, await resp.read()


def _requests_counted(metrics: bytes, predictor: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == "skyloop_gateway_requests_total" and sample.labels["predictor"] == predictor:
                found[sample.labels["status"]] = sample.value
    return found


def test_a_replica_that_dies_mid_answer_is_a_502_counted_as_an_error() -> None:
    requests: list[bytes] = []

    async def dying_replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                     b'{"model_name":')
        await writer.drain()
        writer.transport.abort()  # killed while sending its answer

    async def scenario() -> None:
        replica = await asyncio.start_server(dying_replica, "127.0.0.1", 0)
        port = replica.sockets[0].getsockname()[1]
        try:
            async with _gateway({"main": ("iris/1", port)}, {"main": 100}) as (gateway, url):
                status, headers, doc = await _post(url + "/v2/models/dep/infer", INFER)
                assert status == 502, doc
                assert "replica 0 of predictor 'main' broke off its answer" in doc["error"]
                assert headers["skyloop-predictor"] == "main"
                assert len(requests) == 1  # an answer had begun: not sent again
                window = gateway.window("main")
                assert (window.requests, window.errors) == (1, 1)
                _, metrics = await _get(url + "/metrics")
                assert _requests_counted(metrics, "main") == {"502": 1.0}
        finally:
            replica.close()
            await replica.wait_closed()

    asyncio.run(scenario())


def test_a_model_output_the_protocol_cannot_carry_is_a_server_error_at_the_gateway(settings: Settings,
                                                                                   nodes: Path) -> None:
    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1") as stable, \
                _replica(settings, nodes, "Complex", "2") as canary, \
                _gateway({"stable": ("iris/1", stable), "canary": ("iris/2", canary)},
                         {"stable": 90, "canary": 10}) as (gateway, url):
            for _ in range(3):
                status, _, doc = await _post(url + "/v2/models/dep/infer", INFER, {"skyloop-predictor": "canary"})
                assert status == 500, doc
                assert doc["error"].startswith("model 'dep' returned output 'predict' of dtype complex128")
            window = gateway.window("canary")
            assert (window.requests, window.errors) == (3, 3)  # a broken canary does not look healthy
            _, metrics = await _get(url + "/metrics")
            assert _requests_counted(metrics, "canary") == {"500": 3.0}

    asyncio.run(scenario())


@pytest.mark.parametrize("router", [RouterSpec(type="epsilon_greedy", epsilon=0.1), RouterSpec(type="thompson")])
def test_a_bandit_learns_to_avoid_an_arm_whose_every_answer_is_a_server_error(settings: Settings, nodes: Path,
                                                                               router: RouterSpec) -> None:
    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=0) as good, \
                _replica(settings, nodes, "Complex", "2") as broken, \
                _gateway({"good": ("iris/1", good), "broken": ("iris/2", broken)}, {"good": 0, "broken": 0},
                         router) as (gateway, url):
            gateway.traffic = Traffic(router, {"good": 0, "broken": 0}, rng=random.Random(0))  # reproducible
            base = url + "/v2/models/dep"
            answered: list[str] = []

            async def client() -> None:
                for _ in range(60):
                    status, headers, doc = await _post(base + "/infer", INFER)
                    answered.append(headers["skyloop-predictor"])
                    if status == 200:  # every answer gets its label: the good arm's are all correct
                        feedback = orjson.dumps({"id": doc["id"], "truth": 0})
                        assert (await _post(base + "/feedback", feedback))[0] == 200
                    else:
                        assert (status, headers["skyloop-predictor"]) == (500, "broken"), doc

            await asyncio.gather(*(client() for _ in range(5)))
            failed = answered.count("broken")
            assert answered[-100:].count("broken") <= 15, answered
            arms = gateway.traffic.arms()
            assert arms["broken"] == {**arms["broken"], "pulls": failed, "feedback": 0, "errors": failed,
                                      "mean_reward": 0.0}
            assert arms["good"]["mean_reward"] == 1.0 and arms["good"]["errors"] == 0
            _, metrics = await _get(url + "/metrics")
            assert _requests_counted(metrics, "broken") == {"500": float(failed)}

    asyncio.run(scenario())


@pytest.mark.parametrize("truth", [0, 0.0, [0.0], "0", [0]])
def test_a_label_equal_as_a_number_is_judged_correct(settings: Settings, nodes: Path, truth: Any) -> None:
    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=0) as port, \
                _gateway({"main": ("iris/1", port)}, {"main": 100}) as (gateway, url):
            base = url + "/v2/models/dep"
            status, _, answer = await _post(base + "/infer", INFER)
            assert status == 200 and answer["outputs"][0]["data"] == [0]
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answer["id"], "truth": truth}))
            assert status == 200, doc
            window = gateway.window("main")
            assert (window.labelled, window.correct) == (1, 1)
            status, _, answer = await _post(base + "/infer", INFER)
            wrong = 1.0 if not isinstance(truth, list) else [1.0]
            await _post(base + "/feedback", orjson.dumps({"id": answer["id"], "truth": wrong}))
            assert (window.labelled, window.correct) == (2, 1)

    asyncio.run(scenario())


def test_versioned_routes_reach_the_predictor_that_serves_the_version(settings: Settings, nodes: Path) -> None:
    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=0) as stable, \
                _replica(settings, nodes, "Constant", "2", label=2) as canary, \
                _gateway({"stable": ("iris/1", stable), "canary": ("iris/2", canary)},
                         {"stable": 100, "canary": 0}) as (gateway, url):
            base = url + "/v2/models/dep"
            for version, predictor, label in (("1", "stable", 0), ("2", "canary", 2), ("iris:2", "canary", 2)):
                status, headers, doc = await _post(f"{base}/versions/{version}/infer", INFER)
                assert status == 200, (version, doc)
                assert headers["skyloop-predictor"] == predictor and doc["outputs"][0]["data"] == [label]
                status, meta = await _get(f"{base}/versions/{version}")
                assert status == 200 and orjson.loads(meta)["versions"] == [version.removeprefix("iris:")]
                status, ready = await _get(f"{base}/versions/{version}/ready")
                assert status == 200 and orjson.loads(ready)["ready"] is True
            feedback = orjson.dumps({"id": doc["id"], "truth": 2})  # the last answer, version iris:2's
            status, _, refused = await _post(f"{base}/versions/1/feedback", feedback)
            assert status == 404 and "was not given by version '1'" in refused["error"]
            status, _, taken = await _post(f"{base}/versions/2/feedback", feedback)
            assert status == 200 and taken["predictor"] == "canary"
            assert gateway.window("canary").correct == 1
            status, _, doc = await _post(f"{base}/versions/3/infer", INFER)
            # Each version once, with its other name: before, "1, 2, iris:1, iris:2" read as four versions.
            assert (status, doc) == (404, {"error": "deployment 'dep' serves no version '3'; it serves 1 or iris:1; "
                                                    "2 or iris:2"})
            status, _, doc = await _post(f"{base}/versions/1/infer", INFER, {"skyloop-predictor": "canary"})
            assert (status, doc) == (404, {"error": "predictor 'canary' does not serve version '1'"})
            assert (await _get(f"{base}/versions/3"))[0] == 404

    asyncio.run(scenario())


@pytest.mark.parametrize(("pinned", "version"), [
    ("iris/12", "12"), ("iris/2,tree/1", "iris:2,tree:1"), ("graph", "graph"),
])
def test_the_served_version_has_no_slash(pinned: str, version: str) -> None:
    assert served_version(pinned) == version


def test_feedback_for_an_answer_whose_replica_went_away_goes_to_another_replica(settings: Settings,
                                                                                 nodes: Path) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as first, _replica(settings, nodes, "Constant", "1") as other:
            port = await first.enter_async_context(_replica(settings, nodes, "Constant", "1"))
            async with _gateway({}, {"main": 100}) as (gateway, url):
                gateway.pools["main"] = Pool("main", "iris/1", [Endpoint("main", 0, port), Endpoint("main", 1, other)])
                base = url + "/v2/models/dep"
                answered = {}
                while len(answered) < 2:  # an answer from each replica
                    status, _, answer = await _post(base + "/infer", INFER)
                    assert status == 200, answer
                    answered[gateway.answers[answer["id"]].endpoint.port] = answer["id"]
                await first.aclose()  # the first replica dies; the controller has not noticed yet
                status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answered[port], "truth": 0}))
                assert status == 200, doc  # taken by the live replica, not a 503
                assert (gateway.window("main").labelled, gateway.window("main").correct) == (1, 1)
                status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": answered[port], "truth": 0}))
                assert status == 409, doc  # and taken once

    asyncio.run(scenario())


def test_the_answers_kept_for_feedback_are_bounded_in_bytes(settings: Settings, nodes: Path) -> None:
    # Only their number was bounded (200,000): an answer to a large request was held whole, so that a client
    # could make the gateway hold gigabytes long before that many were kept.
    rows = 5000
    big = orjson.dumps({"inputs": [{**ROW, "shape": [rows, 4], "data": ROW["data"] * rows}]})

    async def scenario() -> None:
        async with _replica(settings, nodes, "Constant", "1", label=0) as port, \
                _gateway({"main": ("iris/1", port)}, {"main": 100}) as (gateway, url):
            gateway.remember_bytes = 100_000  # each answer holds about 10 kB of JSON
            base = url + "/v2/models/dep"
            ids = []
            for _ in range(30):
                status, _, answer = await _post(base + "/infer", big)
                assert status == 200, answer
                ids.append(answer["id"])
            assert 0 < len(gateway.answers) < 30 and gateway.answer_bytes <= gateway.remember_bytes
            assert gateway.answer_bytes == sum(a.size for a in gateway.answers.values())
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": ids[0], "truth": [0] * rows}))
            assert status == 404 and "too old" in doc["error"]
            status, _, doc = await _post(base + "/feedback", orjson.dumps({"id": ids[-1], "truth": [0] * rows}))
            assert status == 200, doc
            assert gateway.answer_bytes <= gateway.remember_bytes and ids[-1] in gateway.answers
            # An id longer than the DB's column is refused here as a replica refuses it, before it is kept.
            status, _, doc = await _post(base + "/infer", orjson.dumps({"id": "x" * 201, "inputs": [ROW]}))
            assert (status, doc) == (400, {"error": "field 'id' is 201 characters long; an inference id has at "
                                                    "most 200"})

    asyncio.run(scenario())
