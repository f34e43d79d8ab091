"""The data plane: health, metadata, inference and feedback for the served graphs. Knows nothing of HTTP.

The REST layer (`serving.app`) hands it bytes and gets bytes back; errors are domain errors
(`InvalidRequest`, `SignatureMismatch`, `NotFound`, `Conflict`, `NotReady`, `NodeError`, `OutputError`) that the REST
layer maps to statuses. Model code runs in worker threads (batched when the graph allows it), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import skyloop
from skyloop.config import Settings
from skyloop.errors import InvalidRequest, NotFound, NotReady, SkyloopError, SpecError
from skyloop.serving.answered import REMEMBERED, AnsweredIds
from skyloop.serving.batching import Batcher, Prediction
from skyloop.serving.graph import Graph, Trace, load_graph
from skyloop.serving.metrics import ServingMetrics
from skyloop.serving.protocol import (
    FeedbackRequest,
    decode_feedback,
    decode_request,
    encode_response,
    output_tensor,
)
from skyloop.serving.relay import Relay, Told
from skyloop.serving.spec import ServeSpec
from skyloop.store.feedback import record_feedback, repeated_feedback

__all__ = ["TRACE_BYTES", "DataPlane", "InferenceResult", "ServedModel"]

log = logging.getLogger("skyloop.serving")

TRACE_BYTES = 256 * 1024 * 1024
"""The most bytes of request inputs a server keeps per model to pass feedback on to the nodes that answered."""


@dataclass
class ServedModel:
    """One served graph and its state."""

    spec: ServeSpec
    graph: Graph | None = None
    batcher: Batcher | None = None
    failure: SkyloopError | None = None
    """Why loading failed, if it did."""
    traces: OrderedDict[str, tuple[Any, Trace, int, int]] = field(default_factory=OrderedDict)
    """Recent inference id -> (features, trace, bytes held, rows answered), so that feedback reaches the nodes
    that answered and its truth is checked against the answer's rows."""
    trace_bytes: int = 0
    """About how many bytes the inputs in `traces` hold."""
    feedback_taken: OrderedDict[str, set[str]] = field(default_factory=OrderedDict)
    """Recent inference id -> the kinds of feedback ('truth', 'reward') this process has taken for it."""

    @property
    def name(self) -> str:
        """The name clients use."""
        return self.spec.name


@dataclass(frozen=True)
class InferenceResult:
    """An encoded response and what the REST layer needs to send it."""

    body: bytes
    header_length: int | None
    model: str
    version: str


class DataPlane:
    """Serves one or more graphs.

    Feedback must name an answer of this server: one its workers remember (`answered`: the server's table
    shared by its worker processes; by default one for this process alone), or one that took feedback before
    (its row in the DB, e.g. from before a restart). With `behind_router` a router in front (a deployment's
    gateway) has checked the id against the answers it gave, and may pass feedback on to another replica
    than the one that answered (that one is gone), so the id is taken as given.
    """

    def __init__(self, specs: list[ServeSpec], settings: Settings | None = None, metrics: ServingMetrics | None = None,
                 threads: int = 4, trace_cache: int = 10_000, answered: AnsweredIds | None = None,
                 behind_router: bool = False, trace_bytes: int = TRACE_BYTES, relay: Relay | None = None) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SpecError(f"two served models share a name: {names}; name them apart (a serving spec file each, "
                            "with its own `name:`)")
        self.settings = settings
        self.answered = None if behind_router else answered or AnsweredIds()
        """Ids this server answered; None when a router in front checks feedback ids."""
        self.relay = relay
        """The other workers of this server, for feedback on their answers (None: one worker)."""
        self.metrics = metrics or ServingMetrics()
        self.models = {s.name: ServedModel(s) for s in specs}
        self.trace_cache = trace_cache
        self.trace_bytes = trace_bytes
        """The most bytes of request inputs kept per model for feedback (besides at most `trace_cache` requests)."""
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="skyloop-predict")
        self._db_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyloop-feedback")
        self._workspace: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load every graph (blocking; call it from a thread). A graph that fails keeps its error."""
        for served in self.models.values():
            name = served.name

            def observe(node: str, seconds: float, name: str = name) -> None:
                self.metrics.node_latency.labels(name, node).observe(seconds)

            try:
                served.graph = load_graph(served.spec, self.settings, observe)
            except SkyloopError as exc:
                served.failure = exc

    def start_batching(self) -> None:
        """Create the batchers (on the event loop that will serve)."""
        for served in self.models.values():
            graph = served.graph
            if graph is None:
                continue
            enabled = served.spec.batching.enabled
            if enabled or (enabled is None and graph.batchable):
                sizes = self.metrics.batch_size.labels(served.name)
                depth = self.metrics.queue_depth.labels(served.name)
                served.batcher = Batcher(graph.predict, self._executor, served.spec.batching.max_batch_size,
                                         served.spec.batching.max_batch_time, on_batch=sizes.observe,
                                         on_depth=depth.set)

    def close(self) -> None:
        """Stop the worker threads and release the DB."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._db_executor.shutdown(wait=True)
        if self._workspace is not None:
            self._workspace.close()

    # -- health and metadata -------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether every served graph has loaded."""
        return all(m.graph is not None for m in self.models.values())

    def not_ready_reason(self) -> str:
        """Why the server is not ready."""
        failed = [f"{m.name}: {m.failure}" for m in self.models.values() if m.failure]
        return "; ".join(failed) if failed else "models are still loading"

    def server_metadata(self) -> dict[str, Any]:
        """The V2 server metadata."""
        return {"name": "skyloop", "version": skyloop.__version__,
                "extensions": ["binary_tensor_data", "model_repository", "feedback"]}

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The served graph `name` (at `version`, when given), loaded."""
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"unknown model {name!r}; this server serves {', '.join(sorted(self.models))}")
        if served.graph is None:
            raise NotReady(f"model {name!r} is not ready: {served.failure or 'still loading'}")
        if version is not None and version != served.graph.version:
            raise NotFound(f"model {name!r} has no version {version!r} here; it serves version {served.graph.version}")
        return served

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The V2 model metadata: name, versions, platform, inputs and outputs."""
        graph = self.model(name, version).graph
        assert graph is not None
        signature = graph.signature
        return {
            "name": name, "versions": [graph.version], "platform": "skyloop",
            "inputs": [t.model_dump() for t in signature.inputs] if signature else [],
            "outputs": [t.model_dump() for t in signature.outputs] if signature else [],
        }

    def repository_index(self) -> list[dict[str, Any]]:
        """Every served model with its state (the model-repository extension)."""
        found = []
        for served in self.models.values():
            state = "READY" if served.graph else ("UNAVAILABLE" if served.failure else "LOADING")
            entry: dict[str, Any] = {"name": served.name, "state": state}
            if served.graph is not None:
                entry["version"] = served.graph.version
            if served.failure:
                entry["reason"] = str(served.failure)
            found.append(entry)
        return found

    # -- inference -----------------------------------------------------------------------------------------

    def admit(self, name: str) -> None:
        """Count a request on its way in (the batcher waits for company only while some are)."""
        served = self.models.get(name)
        if served is not None and served.batcher is not None:
            served.batcher.admit()

    def release(self, name: str) -> None:
        """The request counted by `admit` has been queued or has failed."""
        served = self.models.get(name)
        if served is not None and served.batcher is not None:
            served.batcher.release()  # wakes a batch that waits for it, also when it is refused

    async def infer(self, name: str, version: str | None, body: bytes,
                    header_length: int | None = None) -> InferenceResult:
        """Decode, predict and encode one request. Call `admit(name)` first; this releases it."""
        released = False
        try:
            served = self.model(name, version)
            graph = served.graph
            assert graph is not None
            request = decode_request(body, header_length)
            inputs = graph.check({t.name: t.data for t in request.inputs})
            batcher = served.batcher
            self.release(name)
            released = True
            prediction: Prediction
            if batcher is not None and batcher.batchable(inputs):
                prediction = await batcher.submit(inputs)
            else:
                prediction = await asyncio.get_running_loop().run_in_executor(self._executor, graph.predict, inputs)
        finally:
            if not released:
                self.release(name)
        outputs, trace = prediction
        request_id = uuid.uuid4().hex if request.id is None else request.id  # "" is refused by the decoder
        tensors = [output_tensor(name, n, a) for n, a in outputs.items()]
        if request.outputs is not None:
            known = {t.name: t for t in tensors}
            missing = [o.name for o in request.outputs if o.name not in known]
            if missing:
                raise InvalidRequest(f"unknown output {missing[0]!r}; the model returns {', '.join(known)}")
            tensors = [known[o.name] for o in request.outputs]
        binary = {t.name for t in tensors if request.binary(t.name)}
        parameters: dict[str, Any] = {}
        if trace.routing:
            parameters["routing"] = trace.routing
        body_out, length = encode_response(name, graph.version, request_id, tensors, parameters, binary)
        rows = next((a.shape[0] if a.ndim else 1 for a in outputs.values()), 1)
        self._remember(served, request_id, inputs, trace, len(body), rows)  # answered: feedback may name it
        return InferenceResult(body_out, length, name, graph.version)

    def _remember(self, served: ServedModel, request_id: str, inputs: dict[str, Any], trace: Trace,
                  body_size: int, rows: int) -> None:
        # Bounded in bytes as well as in requests: 10,000 requests of 16 MiB each held 160 GB, so that a
        # client could exhaust the server's memory with a few hundred large ones. The body's size counts
        # what object arrays (BYTES) point to, which `nbytes` does not; both are O(1) to get.
        size = body_size + sum(getattr(a, "nbytes", 0) for a in inputs.values())
        old = served.traces.pop(request_id, None)
        if old is not None:
            served.trace_bytes -= old[2]
        if size <= self.trace_bytes:  # a larger one is not kept: its feedback is stored, but not told to nodes
            served.traces[request_id] = (inputs, trace, size, rows)
            served.trace_bytes += size
        while served.traces and (len(served.traces) > self.trace_cache or served.trace_bytes > self.trace_bytes):
            served.trace_bytes -= served.traces.popitem(last=False)[1][2]
        if self.answered is not None:
            self.answered.add(served.name, request_id, rows)

    # -- feedback ------------------------------------------------------------------------------------------

    async def feedback(self, name: str, version: str | None, body: bytes) -> dict[str, Any]:
        """Store a `truth` or `reward` for an answered inference `id`, and tell the graph's nodes.

        Each answer takes one truth and one reward (`store.feedback.record_feedback`); a repeat is a
        `Conflict`, and nothing of it is stored, counted or told. Once stored, every node on the answer's path is
        told, even past one whose `send_feedback` fails: the result names those under `nodes_failed` (node ->
        error), and is still a success, since the feedback is stored and a retry would be refused. An id this
        server does not remember answering (see the class docstring) is `NotFound`, unless the answer took
        feedback before.
        """
        served = self.model(name, version)
        graph = served.graph
        assert graph is not None
        request = decode_feedback(body)
        inference_id, kinds = request.id, request.kinds
        remembered = served.traces.get(inference_id)
        # Answered by another worker: its rows are in the table the workers share (its inputs are not).
        found = None if remembered is not None or self.answered is None else self.answered.answer(name, inference_id)
        shared = None if found is None else found[1]
        request.check_rows(remembered[3] if remembered is not None else shared or None)
        # Not remembered: too old, from before a restart, or never answered. Of these, only an answer that
        # took feedback before has left a record (its row in the DB, which `_store_feedback` requires).
        known = self.answered is None or remembered is not None or shared is not None
        if not known and self.settings is None:
            raise _unknown_answer(name, inference_id)
        # Claimed before the first await, so that a copy posted at the same moment is refused here; the DB
        # holds the rule across processes and restarts (and is the only record with several workers).
        taken = served.feedback_taken.setdefault(inference_id, set())
        if taken & kinds:
            raise repeated_feedback(inference_id, taken & kinds)
        taken |= kinds
        served.feedback_taken.move_to_end(inference_id)
        while len(served.feedback_taken) > self.trace_cache:
            served.feedback_taken.popitem(last=False)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._db_executor, self._store_feedback, name, graph.version, request, known)
        except BaseException:
            taken -= kinds
            raise
        for kind in sorted(kinds):
            self.metrics.feedback.labels(name, kind).inc()
        told, failed = await self._tell(served, request)
        if not told and not failed and found is not None and self.relay is not None and found[0] != self.relay.part:
            # The answering worker holds the inputs and the nodes that learn: it tells them.
            told, failed = await self.relay.tell(found[0], name, version, body)
        for node, error in failed.items():  # stored all the same: the client must not send it again
            log.warning("model %s: node %r failed to take feedback for %r: %s", name, node, inference_id, error)
        return {"id": inference_id, "stored": True, "nodes_told": told, "nodes_failed": failed}

    async def _tell(self, served: ServedModel, request: FeedbackRequest) -> Told:
        """Tell the nodes on the path of the answer, if this process remembers it."""
        remembered, graph = served.traces.get(request.id), served.graph
        if remembered is None or graph is None:
            return 0, {}
        features, trace, _, _ = remembered
        x = graph.features(features)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, graph.send_feedback, x, request.reward, request.plain_truth, trace)

    async def tell_here(self, name: str, version: str | None, body: bytes) -> Told:
        """Feedback another worker of this server took and stored, for an answer this one gave (`Relay`)."""
        return await self._tell(self.model(name, version), decode_feedback(body))

    def _store_feedback(self, name: str, version: str, request: FeedbackRequest, known: bool) -> None:
        if self.settings is None:
            return
        from skyloop.store.workspace import Workspace

        if self._workspace is None:
            self._workspace = Workspace.open(self.settings)
        try:
            with self._workspace.db.session() as session:
                record_feedback(session, name, version, request.id, request.truth, request.reward, answered=known)
        except NotFound:
            raise _unknown_answer(name, request.id) from None


def _unknown_answer(name: str, inference_id: str) -> NotFound:
    return NotFound(f"no inference with id {inference_id!r} was answered by model {name!r} on this server; feedback "
                    "must name the id of an inference response (each worker process remembers its last "
                    f"{REMEMBERED:,} answers or more, and for good those that took feedback before)")
