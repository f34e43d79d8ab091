"""Adaptive batching under the conditions that broke it: cancelled and refused requests, a stopping server,
answers that do not keep the rows, routers, and many concurrent clients of a real `skyloop serve`."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml

from skyloop.config import Settings
from skyloop.errors import InvalidRequest, NotReady
from skyloop.serving import DataPlane, load_serve_spec
from skyloop.serving.batching import Batcher
from skyloop.serving.graph import Trace

Arrays = dict[str, np.ndarray[Any, Any]]

NODES = '''
import numpy as np


class RowSum:
    """MODEL: ten times each row's sum; refuses negative values."""

    def predict(self, X):
        X = np.asarray(X)
        if np.any(X < 0):
            raise ValueError("negative values are not allowed")
        return X.sum(axis=1) * 10


class ByClass:
    """ROUTER: the first child for iris class 0 (setosa), the second for the others."""

    def route(self, Y):
        return 0 if int(np.asarray(Y)[0]) == 0 else 1


class Constant:
    """MODEL: one label for every row."""

    def __init__(self, label=0):
        self.label = label

    def predict(self, X):
        return np.full(len(X), self.label, dtype=np.int64)
'''


def _body(x: np.ndarray[Any, Any], datatype: str = "FP64", **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": list(x.shape),
                                     "data": x.reshape(-1).tolist()}], **extra})


def _plane(folder: Path, doc: dict[str, Any], settings: Settings | None = None, threads: int = 4) -> DataPlane:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nodes.py").write_text(NODES)
    (folder / "graph.yaml").write_text(yaml.safe_dump(doc))
    plane = DataPlane([load_serve_spec(folder / "graph.yaml")], settings, threads=threads)
    plane.load()
    assert plane.ready(), plane.not_ready_reason()
    return plane


class Gated:
    """A model that records each call's first column and, while `gate` is clear, blocks (a busy model)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[list[float]] = []

    def __call__(self, inputs: Arrays) -> tuple[Arrays, Trace]:
        x = inputs["x"]
        self.calls.append(x[:, 0].tolist())
        self.gate.wait(10)
        return {"y": x * 2}, Trace()


def test_a_request_cancelled_while_queued_is_not_predicted_nor_counted() -> None:
    # The cancelled request stayed in the queue: its rows were predicted (and counted in the batch size) for nobody.
    model = Gated()
    sizes: list[int] = []
    depths: list[int] = []

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(model, pool, 64, 0.01, on_batch=sizes.append, on_depth=depths.append)
            busy = asyncio.create_task(batcher.submit({"x": np.full((1, 2), 1.0)}))
            while not model.calls:  # the model holds the first request
                await asyncio.sleep(0.001)
            gone = asyncio.create_task(batcher.submit({"x": np.full((3, 2), 2.0)}))
            kept = asyncio.create_task(batcher.submit({"x": np.full((2, 2), 3.0)}))
            await asyncio.sleep(0.01)
            gone.cancel()
            await asyncio.sleep(0.01)
            model.gate.set()
            await asyncio.wait_for(asyncio.gather(busy, kept), 10)
            np.testing.assert_array_equal((await kept)[0]["y"], np.full((2, 2), 6.0))
            assert gone.cancelled()

    asyncio.run(scenario())
    assert model.calls == [[1.0], [3.0, 3.0]]
    assert sizes == [1, 2] and depths[-1] == 0


def test_requests_queued_when_the_worker_threads_stop_are_answered_not_left_waiting() -> None:
    # `DataPlane.close()` cancels what waits for a worker thread: the batch in flight got a CancelledError, the
    # batcher's task died with it, and the requests queued behind it waited for ever.
    model = Gated()

    async def scenario() -> list[BaseException | None]:
        pool = ThreadPoolExecutor(1)
        blocker = pool.submit(model.gate.wait, 10)  # the only worker thread is busy
        batcher = Batcher(model, pool, 1, 0.01)
        tasks = [asyncio.create_task(batcher.submit({"x": np.full((1, 2), float(i))})) for i in range(3)]
        await asyncio.sleep(0.05)
        pool.shutdown(wait=False, cancel_futures=True)
        model.gate.set()
        _, waiting = await asyncio.wait(tasks, timeout=10)
        for task in waiting:
            task.cancel()
        assert not waiting, f"{len(waiting)} requests were never answered"
        blocker.result()
        return [None if t.cancelled() else t.exception() for t in tasks]

    errors = asyncio.run(scenario())
    assert all(isinstance(e, NotReady) and "stopping" in str(e) for e in errors), errors
    assert model.calls == []


def test_a_batch_waiting_for_a_request_that_is_refused_goes_at_once(tmp_path: Path) -> None:
    # A batch waits for company while requests are on their way in; one of them refused (400) no longer came,
    # but nothing woke the batch: it waited its whole max_batch_time.
    doc = {"name": "rows", "graph": {"name": "m", "implementation": "nodes.py:RowSum"},
           "batching": {"enabled": True, "max_batch_time": 60}}
    plane = _plane(tmp_path / "g", doc)

    async def scenario() -> Any:
        plane.start_batching()
        plane.admit("rows")
        plane.admit("rows")  # a second request is on its way in: the first waits for it
        good = asyncio.create_task(plane.infer("rows", None, _body(np.ones((1, 2)))))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidRequest):
            await plane.infer("rows", None, b"{not json")
        return await asyncio.wait_for(good, 10)

    try:
        result = asyncio.run(scenario())
    finally:
        plane.close()
    assert orjson.loads(result.body)["outputs"][0]["data"] == [20.0]


def test_an_answer_that_does_not_keep_the_rows_stops_batching() -> None:
    # Such a model was called for the whole batch and then again for each request, for every batch.
    calls: list[int] = []

    def score(inputs: Arrays) -> tuple[Arrays, Trace]:
        calls.append(len(inputs["x"]))
        return {"y": np.array([inputs["x"].sum()])}, Trace()  # one score per call

    async def scenario() -> tuple[list[Any], Batcher]:
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(score, pool, 64, 0.05)
            answers = []
            for _ in range(3):
                batcher.incoming = 4
                rows = [np.full((2, 2), float(i)) for i in range(4)]

                async def one(x: np.ndarray[Any, Any], b: Batcher = batcher) -> Any:
                    b.incoming -= 1
                    return (await b.submit({"x": x}))[0]["y"]

                answers += await asyncio.gather(*(one(x) for x in rows))
            return answers, batcher

    answers, batcher = asyncio.run(scenario())
    assert [a.tolist() for a in answers] == [[0.0], [4.0], [8.0], [12.0]] * 3
    assert calls.count(8) == 1 and calls.count(2) == 12, calls  # one batched try, then each request alone
    assert not batcher.batchable({"x": np.ones((2, 2))})  # the server now predicts them in parallel, unqueued


def test_a_router_below_a_registered_model_does_not_route_a_batch_as_one(tmp_path: Path, settings: Settings,
                                                                       iris_uri: str,
                                                                       iris: tuple[Any, Any]) -> None:
    # The router saw the rows of several clients and chose one child for all: a virginica batched behind a setosa
    # was answered by the setosa child.
    doc = {"name": "routed", "graph": {
        "name": "iris", "model_uri": iris_uri, "children": [{
            "name": "route", "type": "ROUTER", "implementation": "nodes.py:ByClass", "children": [
                {"name": "setosa", "implementation": "nodes.py:Constant", "parameters": {"label": 10}},
                {"name": "other", "implementation": "nodes.py:Constant", "parameters": {"label": 20}}]}]}}
    plane = _plane(tmp_path / "g", doc, settings)
    _, X = iris
    rows = [X[0:1], X[149:150]] * 8  # setosa, virginica, ...

    async def scenario() -> list[Any]:
        plane.start_batching()
        for _ in rows:
            plane.admit("routed")
        bodies = [orjson.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                                            "data": r.reshape(-1).tolist()}]}) for r in rows]
        results = await asyncio.gather(*(plane.infer("routed", None, b) for b in bodies))
        return [orjson.loads(r.body)["outputs"][0]["data"] for r in results]

    try:
        answers = asyncio.run(scenario())
    finally:
        plane.close()
    assert answers == [[10], [20]] * 8


@pytest.mark.integration
def test_many_clients_each_get_their_own_rows_from_a_real_server(tmp_path: Path, settings: Settings,
                                                                 serve: Any) -> None:
    # Requests of 1, 7, max_batch_size and more rows, three dtypes and two row shapes (that cannot be joined),
    # some asking for their output by name, a few refused by the model: under 64 concurrent clients each is
    # answered with its own rows, in order, and a refused one fails alone with its message.
    import aiohttp

    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "nodes.py").write_text(NODES)
    (folder / "graph.yaml").write_text(yaml.safe_dump({
        "name": "rows", "graph": {"name": "m", "implementation": "nodes.py:RowSum"},
        "batching": {"enabled": True, "max_batch_size": 16, "max_batch_time": "20ms"}}))
    dtypes = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64}

    sent: list[int] = []

    async def clients(port: int) -> tuple[list[str], str]:
        url = f"http://127.0.0.1:{port}/v2/models/rows/infer"
        limit = asyncio.Semaphore(64)

        async def one(session: aiohttp.ClientSession, i: int) -> str:
            pick = random.Random(i)
            n, cols, datatype = pick.choice([1, 1, 7, 16, 40]), pick.choice([2, 3]), pick.choice(list(dtypes))
            x = (np.arange(n * cols).reshape(n, cols) + i * 1000).astype(dtypes[datatype])
            bad = i % 17 == 0
            sent.append(n)
            if bad:
                x[n // 2, 0] = -1
            extra: dict[str, Any] = {"id": f"r{i}"}
            if i % 3 == 0:
                extra["outputs"] = [{"name": "predict"}]
            async with limit, session.post(url, data=_body(x, datatype, **extra),
                                           headers={"content-type": "application/json"}) as response:
                doc = await response.json()
            if bad:
                return "refused" if response.status == 500 and "negative values" in doc["error"] else str(doc)
            if response.status != 200 or doc["id"] != f"r{i}":
                return str(doc)
            got = np.array(doc["outputs"][0]["data"])
            return "ok" if np.array_equal(got, x.sum(axis=1) * 10) else f"r{i}: {got} != {x.sum(axis=1) * 10}"

        async with aiohttp.ClientSession() as session:
            answers = await asyncio.wait_for(asyncio.gather(*(one(session, i) for i in range(300))), 120)
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
        return answers, metrics

    with serve(settings, str(folder / "graph.yaml")) as (_, port):
        answers, metrics = asyncio.run(clients(port))
    assert [a for a in answers if a not in ("ok", "refused")] == []
    assert answers.count("refused") == len(range(0, 300, 17))
    assert 'skyloop_queue_depth{model="rows"} 0.0' in metrics
    batches = float(metrics.split('skyloop_batch_size_count{model="rows"} ')[1].split()[0])
    rows = float(metrics.split('skyloop_batch_size_sum{model="rows"} ')[1].split()[0])
    assert batches < 300 and rows == sum(sent)  # batched, and every row counted once
