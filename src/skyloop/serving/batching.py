"""Adaptive batching: requests that arrive while the model is busy are predicted as one batch.

One batch runs at a time per graph, in the graph's worker thread (never on the event loop). A batch
closes when it holds `max_batch_size` rows, when its first request has waited `max_batch_time`, or at
once when no other request is on its way in (so a lone client pays no waiting time). Requests join a
batch only with others of the same input names, dtypes and trailing shapes. When a batched answer does
not keep one row per input row, or a batch fails, each request is predicted on its own, so one bad
request never fails its neighbours; a graph whose answer does not keep the rows is not batched again.
A request cancelled while it waits leaves the queue (its rows are not predicted), and requests still queued when
the batcher cannot go on (its worker threads stopped, its task cancelled) are answered `NotReady`, never left waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skyloop.errors import NotReady
from skyloop.serving.graph import Trace

__all__ = ["Batcher", "PredictFn", "Prediction"]

Arrays = dict[str, np.ndarray[Any, Any]]
Prediction = tuple[Arrays, Trace]
PredictFn = Callable[[Arrays], Prediction]


@dataclass(eq=False)  # identity: items are found in the queue by `is`, never by comparing arrays
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
        """Requests accepted by the server for this graph that have not reached the queue yet (see `admit`)."""
        self.rowwise = True
        """False once a batched answer did not keep one row per input row: requests are then predicted alone."""
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def admit(self) -> None:
        """Count a request on its way in: a batch waits for it (up to `max_batch_time`) while it is."""
        self.incoming += 1

    def release(self) -> None:
        """The request counted by `admit` is queued, or never will be (refused, or predicted alone)."""
        self.incoming = max(0, self.incoming - 1)
        self._wake.set()  # a batch waiting for it goes now if nothing else is on its way

    def batchable(self, inputs: Arrays) -> bool:
        """Whether a request can be batched: every input has the same leading (row) dimension."""
        rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
        return self.rowwise and len(rows) == 1 and None not in rows

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
        try:
            return await item.future
        except asyncio.CancelledError:
            self._leave(item)
            raise

    def _leave(self, item: _Item) -> None:
        """Take a cancelled request out of the queue, if no batch has taken it yet: its rows are not predicted."""
        if any(i is item for i in self._pending):
            self._pending = [i for i in self._pending if i is not item]
            self._depth()
            self._wake.set()  # the batch may have been waiting for it

    def _depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(sum(i.rows for i in self._pending))

    async def _loop(self) -> None:
        try:
            while self._pending:
                first = self._pending[0]
                await self._fill(first)
                if not self._pending or self._pending[0] is not first:
                    continue  # the first request left (cancelled) while it waited: start again with the next
                await self._run(self._take(first))
        finally:
            # Only a cancelled task (the server stopping) leaves requests here: answer them rather than let them hang.
            self._fail(self._pending, None)
            self._pending = []
            self._depth()

    async def _fill(self, first: _Item) -> None:
        """Wait for company only while other requests are on their way in and the batch has room."""
        while (self.incoming > 0 and self._rows_like(first) < self.max_batch_size
               and self._pending and self._pending[0] is first):
            left = first.arrived + self.max_batch_time - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _run(self, batch: list[_Item]) -> None:
        self._depth()
        if not batch:  # every request of it was cancelled
            return
        if self.on_batch is not None:
            self.on_batch(sum(i.rows for i in batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self._predict_batch, batch)
        except BaseException as exc:  # the executor itself failed (shut down, or this task cancelled): not the model
            self._fail(batch, exc)
            if isinstance(exc, asyncio.CancelledError) and _cancelling():
                raise
            return
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    @staticmethod
    def _fail(items: list[_Item], cause: BaseException | None) -> None:
        """Answer `items` with `NotReady` (a 503 with a message, not a bare 500 or a CancelledError)."""
        for item in items:
            if not item.future.done():
                error = NotReady("the server is stopping: the request was not predicted")
                error.__cause__ = cause
                item.future.set_exception(error)

    def _rows_like(self, first: _Item) -> int:
        return sum(i.rows for i in self._pending if i.key == first.key)

    def _take(self, first: _Item) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        rest: list[_Item] = []
        for item in self._pending:
            if item.future.done():  # cancelled: nobody waits for its rows
                continue
            if item.key == first.key and (not batch or rows + item.rows <= self.max_batch_size):
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self._pending = rest
        return batch

    def _predict_batch(self, batch: list[_Item]) -> list[Prediction | BaseException]:
        if len(batch) > 1 and self.rowwise:
            total = sum(i.rows for i in batch)
            try:
                joined = {n: np.concatenate([i.inputs[n] for i in batch]) for n in batch[0].inputs}
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
                # The answer cannot be split by request (e.g. one score per call): batching only doubles the work.
                self.rowwise = False
        return [self._predict_one(item) for item in batch]

    def _predict_one(self, item: _Item) -> Prediction | BaseException:
        try:
            return self.predict(item.inputs)
        except Exception as exc:
            return exc


def _cancelling() -> bool:
    """Whether the current task itself was cancelled (not merely an executor future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
