"""Requests built to break the server or the gateway get a 400 or a 413 naming the fault, and the next one is served.

The server is the serving app over a registered scikit-learn model (batched, as `skyloop serve` runs it); the
gateway is a real HTTP server on 127.0.0.1 in this process, fed by raw sockets where a client must misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import uvicorn
from starlette.testclient import TestClient
from tests_support import exchange

from skyloop.config import Settings
from skyloop.deploy.gateway import Gateway
from skyloop.deploy.spec import RouterSpec
from skyloop.serving import DataPlane, create_app, spec_for_target

ROW = [5.1, 3.5, 1.4, 0.2]


def _tensor(**fields: Any) -> dict[str, Any]:
    return {"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": ROW, **fields}


def _refused(client: TestClient, body: bytes, message: str, headers: dict[str, str] | None = None) -> None:
    """`body` gets a 400 whose error holds `message`, and the server still answers a good request rightly."""
    response = client.post("/v2/models/iris/infer", content=body,
                           headers={"content-type": "application/json", **(headers or {})})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    good = client.post("/v2/models/iris/infer", json={"inputs": [_tensor()]})
    assert good.status_code == 200 and good.json()["outputs"][0]["data"] == [0]


def test_a_shape_with_more_dimensions_than_numpy_takes_is_a_400(client: TestClient) -> None:
    # numpy raises a ValueError past its limit (64, or 32 before numpy 2): it was a 500 with the JSON and the binary
    # data alike.
    shape = [1] * 70
    message = "input 'input-0': shape has 70 dimensions; a tensor has at most 32"
    _refused(client, orjson.dumps({"inputs": [_tensor(shape=shape, data=[1.0])]}), message)
    header = orjson.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": shape,
                                       "parameters": {"binary_data_size": 8}}]})
    _refused(client, header + struct.pack("<d", 1.0), message, {"Inference-Header-Content-Length": str(len(header))})


@pytest.mark.parametrize(("datatype", "data", "message"), [
    ("INT32", [True, 1, 1, 1], "INT32 data must be integers, got boolean values"),
    ("INT64", [[1, 2, False, 4]], "INT64 data must be integers, got boolean values"),
    ("UINT8", [1, 2, 3, True], "UINT8 data must be integers, got boolean values"),
    ("FP64", [True, 3.5, 1.4, 0.2], "FP64 data must be numbers, got boolean values"),
    ("FP32", [1, 2, 3, False], "FP32 data must be numbers, got boolean values"),
])
def test_a_boolean_among_numbers_is_refused_as_booleans_alone_are(client: TestClient, datatype: str,
                                                                  data: list[Any], message: str) -> None:
    # numpy types [true, 2] as integers: the boolean became 1 and the model answered for it.
    _refused(client, orjson.dumps({"inputs": [_tensor(datatype=datatype, data=data)]}),
             f"input 'input-0': {message}")


def test_numbers_are_taken_when_true_is_elsewhere_in_the_request(client: TestClient) -> None:
    body = {"id": "true-false", "inputs": [_tensor(parameters={"note": True})],
            "parameters": {"binary_data_output": False}}
    response = client.post("/v2/models/iris/infer", json=body)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [0]


@pytest.mark.parametrize(("extra", "message"), [
    ({"parameters": {"binary_data_output": "no"}}, "parameter 'binary_data_output' must be true or false, got 'no'"),
    ({"parameters": {"binary_data_output": 0}}, "parameter 'binary_data_output' must be true or false, got 0"),
    ({"outputs": [{"name": "predict", "parameters": {"binary_data": "false"}}]},
     "output 'predict': parameter 'binary_data' must be true or false, got 'false'"),
    ({"outputs": [{"name": "predict", "parameters": ["binary_data"]}]},
     "output 'predict': 'parameters' must be an object"),
    ({"outputs": [{"name": "predict"}, {"name": "predict"}]}, "output 'predict' is asked for twice"),
])
def test_output_parameters_of_the_wrong_type_are_refused(client: TestClient, extra: dict[str, Any],
                                                         message: str) -> None:
    # "no" was taken as true (binary outputs), a list of parameters was ignored, and an output asked for twice
    # came back twice.
    _refused(client, orjson.dumps({"inputs": [_tensor()], **extra}), message)


def test_a_binary_data_size_of_true_is_not_one_byte(client: TestClient) -> None:
    header = orjson.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                                       "parameters": {"binary_data_size": True}}]})
    _refused(client, header + struct.pack("<4d", *ROW), "input 'input-0': binary_data_size must be a number of "
             "bytes, got True", {"Inference-Header-Content-Length": str(len(header))})


def test_a_bad_request_in_a_batch_fails_alone(client: TestClient) -> None:
    # NaN reaches the model only as binary data; the model refuses it (422), and its batch neighbours are answered.
    from concurrent.futures import ThreadPoolExecutor

    header = orjson.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                                       "parameters": {"binary_data_size": 32}}]})
    nan = header + struct.pack("<4d", np.nan, 3.5, 1.4, 0.2)

    def send(i: int) -> tuple[int, Any]:
        if i % 4 == 0:
            response = client.post("/v2/models/iris/infer", content=nan,
                                   headers={"Inference-Header-Content-Length": str(len(header))})
        else:
            response = client.post("/v2/models/iris/infer", json={"inputs": [_tensor()]})
        return response.status_code, response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(40)))
    for i, (status, doc) in enumerate(answers):
        if i % 4 == 0:
            assert status == 422 and "refused the input" in doc["error"], doc
        else:
            assert status == 200 and doc["outputs"][0]["data"] == [0], doc


def test_an_inference_id_longer_than_the_db_column_is_refused(client: TestClient) -> None:
    # The feedback table's column holds 200 characters: PostgreSQL refused a longer id with a server error,
    # and every id is kept in memory for feedback, ten thousand per model.
    message = "field 'id' is 201 characters long; an inference id has at most 200"
    _refused(client, orjson.dumps({"id": "x" * 201, "inputs": [_tensor()]}), message)
    response = client.post("/v2/models/iris/feedback", json={"id": "x" * 201, "truth": 0})
    assert (response.status_code, response.json()) == (400, {"error": message})
    response = client.post("/v2/models/iris/infer", json={"id": "x" * 200, "inputs": [_tensor()]})
    assert response.status_code == 200 and response.json()["id"] == "x" * 200
    response = client.post("/v2/models/iris/feedback", json={"id": "x" * 200, "truth": 0})
    assert response.status_code == 200, response.text


def test_the_inputs_kept_for_feedback_are_bounded_in_bytes(settings: Settings, iris_uri: str) -> None:
    # Only their number was bounded (10,000 per model): large requests were each held whole, so that a few
    # hundred of 16 MiB took gigabytes and a client could exhaust the server's memory.
    limit = 1 << 20
    plane = DataPlane([spec_for_target(iris_uri)], settings, trace_bytes=limit)
    rows = np.tile(ROW, (10_000, 1))  # 320 kB of FP64 inputs (and a larger body)
    big = {"inputs": [_tensor(shape=[len(rows), 4], data=rows.reshape(-1).tolist())]}
    with TestClient(create_app(plane)) as client:
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for i in range(20):
            response = client.post("/v2/models/iris/infer", json={**big, "id": f"big-{i}"})
            assert response.status_code == 200, response.text
        served = plane.models["iris"]
        assert 0 < len(served.traces) < 20 and served.trace_bytes <= limit
        assert served.trace_bytes == sum(size for _, _, size, _ in served.traces.values())
        assert "big-19" in served.traces and "big-0" not in served.traces
        # Feedback still names every answer: the ones whose inputs were let go are known all the same.
        for i in (0, 19):
            response = client.post("/v2/models/iris/feedback", json={"id": f"big-{i}", "truth": [0] * len(rows)})
            assert response.status_code == 200, response.text


# -- the gateway -------------------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test's process keeps its own signal handlers
        yield


@contextlib.asynccontextmanager
async def _gateway(max_body_bytes: int) -> AsyncIterator[int]:
    """A gateway for deployment `dep` (no replicas: a body it refuses never needs one) on 127.0.0.1."""
    gateway = Gateway("dep", RouterSpec(), {"main": 100.0}, max_body_bytes=max_body_bytes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(gateway.app, log_level="error", access_log=False, lifespan="off", ws="none"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        await gateway.close()


async def _raw(port: int, head: bytes, body: bytes) -> tuple[int, Any]:
    """Send `head` and `body` as they are, and read the answer without closing the sending side."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return int(status_line.split()[1]), orjson.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    finally:
        writer.close()


@pytest.mark.integration
@pytest.mark.parametrize("route", ["infer", "feedback"])
def test_the_gateway_refuses_a_body_over_its_limit_before_reading_it(route: str) -> None:
    # The gateway read the whole body before looking at its size: a client that declared a terabyte and sent
    # two bytes waited forever, and one that streamed a large body had it all held in memory first.
    limit = 1000
    expected = (413, {"error": f"the request body is 1000000000000 bytes, over the limit of {limit}"})

    async def scenario() -> None:
        async with _gateway(limit) as port:
            declared = (f"POST /v2/models/dep/{route} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        "content-length: 1000000000000\r\n\r\n").encode()
            assert await _raw(port, declared, b"{}") == expected
            chunked = (f"POST /v2/models/dep/{route} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       "transfer-encoding: chunked\r\n\r\n").encode()
            chunk = b"%x\r\n%s\r\n" % (600, b" " * 600)
            status, doc = await _raw(port, chunked, chunk * 2)  # and no last chunk: it never ends
            assert (status, doc) == (413, {"error": f"the request body is over the limit of {limit} bytes"})
            status, doc = await _raw(port, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n", b"")
            assert (status, doc) == (200, {"live": True})

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_request_head_over_the_limit_is_refused_before_it_is_held(serve: Any, settings: Settings,
                                                                     iris_uri: str) -> None:
    # httptools sets no limit on headers: one endless header was held whole in the server's memory (300 MiB from
    # one connection), so that a few clients could exhaust it.
    body = orjson.dumps({"inputs": [_tensor(shape=[20_000, 4], data=ROW * 20_000)]})  # a large body is no head
    good = (b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))
    live = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-filler: "
    with serve(settings, iris_uri) as (_, port):
        answer = exchange(port, live + b"a" * (4 << 20) + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"the request line and headers are over the limit of 65536 bytes" in answer
        answer = exchange(port, good + good, 2)  # two on one connection: the second's head is counted afresh
        assert answer.count(b"HTTP/1.1 200 OK") == 2, answer[:300]
        answer = exchange(port, live + b"a" * 60_000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
