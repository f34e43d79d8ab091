"""Adaptive batching: requests that arrive while the model is busy are predicted as one batch.

One batch runs at a time per graph, in the graph's worker thread (never on the event loop). A batch
closes when it holds `max_batch_size` rows, when its first request has waited `max_batch_time`, or at
once when no other request is on its way in (so a lone client pays no waiting time). Requests join a
batch only with others of the same input names, dtypes and trailing shapes. When a batched answer does
not keep one row per input row, or a batch fails, each request is predicted on its own, so one bad
request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skyloop.serving.graph import Trace

__all__ = ["Batcher", "PredictFn", "Prediction"]

Arrays = dict[str, np.ndarray[Any, Any]]
Prediction = tuple[Arrays, Trace]
PredictFn = Callable[[Arrays], Prediction]


@dataclass
class _Item:
    inputs: Arrays
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[Prediction]
    arrived: float = field(default_factory=time.perf_counter)


def _key(inputs: Arrays) -> tuple[Any, ...]:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class Batcher:
    """Queues requests for one graph and predicts them in batches."""

    def __init__(self, predict: PredictFn, executor: Executor, max_batch_size: int, max_batch_time: float,
                 on_batch: Callable[[int], None] | None = None, on_depth: Callable[[int], None] | None = None) -> None:
        self.predict = predict
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_time = max_batch_time
        self.on_batch = on_batch
        self.on_depth = on_depth
        self.incoming = 0
        """Requests accepted by the server for this graph that have not reached the queue yet."""
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def batchable(self, inputs: Arrays) -> bool:
        """Whether a request can be batched: every input has the same leading (row) dimension."""
        rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
        return len(rows) == 1 and None not in rows

    async def submit(self, inputs: Arrays) -> Prediction:
        """Predict `inputs` as part of a batch."""
        loop = asyncio.get_running_loop()
        rows = next(iter(inputs.values())).shape[0]
        item = _Item(inputs, rows, _key(inputs), loop.create_future())
        self._pending.append(item)
        self._depth()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        return await item.future

    def _depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(sum(i.rows for i in self._pending))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            first = self._pending[0]
            # Wait for company only while other requests are on their way in and the batch has room.
            while self.incoming > 0 and self._rows_like(first) < self.max_batch_size:
                left = first.arrived + self.max_batch_time - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            batch = self._take(first)
            self._depth()
            if self.on_batch is not None:
                self.on_batch(sum(i.rows for i in batch))
            try:
                results = await loop.run_in_executor(self.executor, self._predict_batch, batch)
            except BaseException as exc:  # the executor itself failed (e.g. shut down): fail this batch
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _rows_like(self, first: _Item) -> int:
        return sum(i.rows for i in self._pending if i.key == first.key)

    def _take(self, first: _Item) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        rest: list[_Item] = []
        for item in self._pending:
            if item.key == first.key and (not batch or rows + item.rows <= self.max_batch_size):
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self._pending = rest
        return batch

    def _predict_batch(self, batch: list[_Item]) -> list[Prediction | BaseException]:
        if len(batch) > 1:
            names = list(batch[0].inputs)
            joined = {n: np.concatenate([i.inputs[n] for i in batch]) for n in names}
            total = sum(i.rows for i in batch)
            try:
                outputs, trace = self.predict(joined)
            except Exception:
                pass  # predicted one by one below, so that only the request at fault fails
            else:
                if all(a.ndim >= 1 and a.shape[0] == total for a in outputs.values()):
                    found: list[Prediction | BaseException] = []
                    start = 0
                    for item in batch:
                        stop = start + item.rows
                        found.append(({n: a[start:stop] for n, a in outputs.items()}, trace))
                        start = stop
                    return found
        return [self._predict_one(item) for item in batch]

    def _predict_one(self, item: _Item) -> Prediction | BaseException:
        try:
            return self.predict(item.inputs)
        except Exception as exc:
            return exc
