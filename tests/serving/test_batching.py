"""Adaptive batching: concurrent requests share predictions, answers stay per request, failures stay alone."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from skyloop.errors import NodeError
from skyloop.serving.batching import Batcher
from skyloop.serving.graph import Trace


class Recorder:
    """A slow model that records the rows of each call and which thread made it."""

    def __init__(self, fail_on: float | None = None, keep_rows: bool = True) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.fail_on = fail_on
        self.keep_rows = keep_rows

    def __call__(self, inputs: dict[str, np.ndarray[Any, Any]]) -> tuple[dict[str, np.ndarray[Any, Any]], Trace]:
        x = inputs["x"]
        self.calls.append(len(x))
        self.threads.add(threading.get_ident())
        time.sleep(0.01)
        if self.fail_on is not None and np.any(x == self.fail_on):
            raise NodeError("model", f"saw {self.fail_on}")
        out = x.sum(axis=1) * 10 if self.keep_rows else np.array([x.sum()])
        return {"y": out}, Trace()


async def _run(model: Recorder, rows: list[np.ndarray[Any, Any]], max_batch_size: int = 64,
               max_batch_time: float = 0.05) -> tuple[list[Any], int]:
    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(model, pool, max_batch_size, max_batch_time)
        batcher.incoming = len(rows)  # all requests are on their way in, as under load

        async def one(x: np.ndarray[Any, Any]) -> Any:
            await asyncio.sleep(0)
            batcher.incoming -= 1
            try:
                return (await batcher.submit({"x": x}))[0]["y"]
            except NodeError as exc:
                return exc

        loop_thread = threading.get_ident()
        results = await asyncio.gather(*(one(x) for x in rows))
        return results, loop_thread


def test_concurrent_requests_are_predicted_together_and_answered_separately() -> None:
    model = Recorder()
    rows = [np.full((1 + i % 3, 2), float(i)) for i in range(40)]
    results, loop_thread = asyncio.run(_run(model, rows))
    for x, y in zip(rows, results, strict=True):
        np.testing.assert_array_equal(y, x.sum(axis=1) * 10)
    assert sum(model.calls) == sum(len(x) for x in rows)
    assert len(model.calls) < len(rows) / 4, model.calls  # batched, not one call per request
    assert loop_thread not in model.threads  # model code never ran on the event loop


def test_batches_never_exceed_max_batch_size() -> None:
    model = Recorder()
    rows = [np.ones((3, 2)) for _ in range(20)]
    asyncio.run(_run(model, rows, max_batch_size=7))
    assert max(model.calls) <= 7 and sum(model.calls) == 60


def test_one_bad_request_fails_alone() -> None:
    model = Recorder(fail_on=-1.0)
    rows = [np.full((1, 2), float(i)) for i in range(10)]
    rows[4] = np.full((1, 2), -1.0)
    results, _ = asyncio.run(_run(model, rows))
    assert isinstance(results[4], NodeError)
    for i, y in enumerate(results):
        if i != 4:
            np.testing.assert_array_equal(y, rows[i].sum(axis=1) * 10)


def test_an_answer_that_loses_the_rows_falls_back_to_one_request_at_a_time() -> None:
    model = Recorder(keep_rows=False)
    rows = [np.full((2, 2), float(i)) for i in range(6)]
    results, _ = asyncio.run(_run(model, rows))
    for x, y in zip(rows, results, strict=True):
        np.testing.assert_array_equal(y, [x.sum()])


@pytest.mark.parametrize("incoming", [0, 1])
def test_a_lone_request_does_not_wait_for_company(incoming: int) -> None:
    async def lone() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(lambda inputs: ({"y": inputs["x"]}, Trace()), pool, 64, 0.5)
            batcher.incoming = incoming
            start = time.perf_counter()
            await batcher.submit({"x": np.ones((1, 1))})
            return time.perf_counter() - start

    waited = asyncio.run(lone())
    # With nothing else on its way in it goes at once; with one more announced it waits up to max_batch_time.
    assert (waited < 0.25) == (incoming == 0), waited
