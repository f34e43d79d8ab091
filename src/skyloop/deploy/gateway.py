"""The gateway: one V2 endpoint per deployment that splits, mirrors and learns traffic across predictors.

    POST /v2/models/{deployment}/infer      routed to a predictor, forwarded to its least-busy replica
    POST /v2/models/{deployment}/feedback   joined to the answer by id: live quality, bandit rewards
    GET  /v2/health/live|ready, /v2, /v2/models/{deployment}[/ready], /metrics

and the same model routes under `/v2/models/{deployment}/versions/{version}`, which go to the predictor that
serves that version (`pools.served_version`: `2` for `iris/2`, or `iris:2`), never to another.

Every answer says who gave it: the `skyloop-predictor` and `skyloop-model-version` headers, and the same
in the V2 response's `parameters`. Requests without an `id` get one, so that feedback can name them.
A request whose replica dies before answering (a broken connection, nothing received) is sent again
to another replica of the same predictor: inference has no side effect. A request whose replica broke off
an answer it had begun gets a 502 (it is not sent again), one left without a replica a 503; both count as
errors of the predictor, as does any 4xx or 5xx of its replicas, and a bandit router takes each as a reward of 0.
A replica's 4xx is the predictor's fault, not the client's: the gateway has checked the request as a replica
does (and answered 400 itself to what it refuses), so a replica that refuses what the gateway accepted (a new
model whose signature changed: 422) fails its requests; windows count those in `errors`, and apart in
`client_errors`. A replica being drained gets no new requests and keeps its in-flight ones until they finish.
Shadows get a copy of the request in the background, whatever the primary answered; their answers are
compared with later feedback and never reach the client. Feedback is joined to its answer (`deploy.answers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from skyloop.deploy.analysis import Window
from skyloop.deploy.answers import Answer, Answers, first_output, score, store_feedback
from skyloop.deploy.pools import Endpoint, Pool, version_names
from skyloop.deploy.spec import RouterSpec
from skyloop.deploy.traffic import Traffic
from skyloop.errors import Conflict, InvalidRequest, PayloadTooLarge
from skyloop.monitoring.payloads import PayloadLog
from skyloop.serving.app import read_body
from skyloop.serving.metrics import CONTENT_TYPE, LATENCY_BUCKETS
from skyloop.serving.protocol import decode_feedback, header_length, request_header
from skyloop.store.feedback import repeated_feedback

if TYPE_CHECKING:
    from skyloop.store.db import Database

__all__ = ["BrokenAnswer", "Endpoint", "Gateway", "Pool"]

log = logging.getLogger("skyloop.deploy")

_REMEMBER_BYTES = 256 * 1024 * 1024
"""The most bytes of answers (and shadows' answers and truths joined to them) kept for joining feedback: answers
of large requests, each held whole, took gigabytes long before `answers.REMEMBER` of them were kept."""
_RETRY_SECONDS = 5.0
_TAKEN_RETRIES = 1
"""How many times a request a replica took (and then died or cut the connection) is sent to another one."""
"""How long a request may keep retrying replicas that went away before it fails."""
_SHADOW_CONCURRENCY = 256


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("skyloop_gateway_requests", "Requests answered, by predictor and HTTP status.",
                                ["deployment", "predictor", "status"], registry=r)
        self.latency = Histogram("skyloop_gateway_request_seconds", "Time from request to answer at the gateway.",
                                 ["deployment", "predictor"], buckets=LATENCY_BUCKETS, registry=r)
        self.shadow = Counter("skyloop_gateway_shadow_requests", "Mirrored requests, by shadow and HTTP status.",
                              ["deployment", "predictor", "status"], registry=r)
        self.weight = Gauge("skyloop_gateway_traffic_weight", "Percent of live traffic per predictor.",
                            ["deployment", "predictor"], registry=r)
        self.feedback = Counter("skyloop_gateway_feedback", "Feedback joined to an answer, by predictor.",
                                ["deployment", "predictor"], registry=r)
        self.retries = Counter("skyloop_gateway_retries", "Requests sent again after a replica went away.",
                               ["deployment", "predictor"], registry=r)
        # The closed loop's figures (set by `deploy.loop`; registered once per gateway).
        self.dataset_drift = Gauge("skyloop_dataset_drift", "1 when the serving version's inputs drift.",
                                   ["deployment", "version"], registry=r)
        self.drift_share = Gauge("skyloop_drifted_features_share", "Share of features that drift.",
                                 ["deployment", "version"], registry=r)
        self.feature_drift = Gauge("skyloop_feature_drift",
                                   "Drift per feature: the test's statistic (ks, chisquare, z) or distance "
                                   "(wasserstein, jensenshannon), not its p-value.",
                                   ["deployment", "version", "feature"], registry=r)
        self.live_quality = Gauge("skyloop_live_quality", "Live quality of the serving version, from feedback.",
                                  ["deployment", "version", "metric"], registry=r)
        self.labelled_rows = Gauge("skyloop_labelled_rows", "Labelled rows since the loop last fired.",
                                   ["deployment"], registry=r)

    def forget_version(self, deployment: str, version: str) -> None:
        """Remove the loop's series of a model version no longer served: its last drift (1, say) and quality
        would be reported for good after a rollout, and keep an alert on them firing."""
        labelled = ((self.dataset_drift, ("deployment", "version")), (self.drift_share, ("deployment", "version")),
                    (self.feature_drift, ("deployment", "version", "feature")),
                    (self.live_quality, ("deployment", "version", "metric")))
        for gauge, names in labelled:
            found = [s.labels for family in gauge.collect() for s in family.samples
                     if s.labels.get("deployment") == deployment and s.labels.get("version") == version]
            for labels in found:
                with contextlib.suppress(KeyError):
                    gauge.remove(*(labels[n] for n in names))


class BrokenAnswer(ConnectionError):
    """A replica began an answer and broke off (it died mid-body): the gateway answers 502."""


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


def _split(body: bytes, head_length: int | None) -> tuple[Any, bytes]:
    """The JSON part of a V2 body and the binary tail after it (empty for plain JSON)."""
    head, tail = (body, b"") if head_length is None else (body[:head_length], body[head_length:])
    return orjson.loads(head), tail


def _join(doc: Any, tail: bytes, binary: bool) -> tuple[bytes, int | None]:
    head = orjson.dumps(doc)
    return head + tail, (len(head) if binary else None)


class Gateway:
    """Routes a deployment's traffic; the controller sets pools, weights, shadows and windows."""

    def __init__(self, deployment: str, router: RouterSpec, weights: dict[str, float],
                 shadows: dict[str, float] | None = None, max_body_bytes: int = 16 * 1024 * 1024,
                 remember_bytes: int = _REMEMBER_BYTES, db: Database | None = None) -> None:
        self.deployment = deployment
        self.router = router
        self.traffic = Traffic(router, weights, shadows or {})
        self.weights = dict(weights)
        self.shadows = dict(shadows or {})
        self.pools: dict[str, Pool] = {}
        self.windows: dict[str, Window] = {}
        self.max_body_bytes = max_body_bytes
        self.answers = Answers(remember_bytes)
        self.generation = 0
        """Counts `new_windows`: an answer's feedback counts in the windows of the generation it was given in."""
        self.db = db
        """The metadata DB, where feedback for a retired predictor's answers is stored (None: it is refused)."""
        self.metrics = _Metrics()
        self._session: aiohttp.ClientSession | None = None
        self._shadow_slots = asyncio.Semaphore(_SHADOW_CONCURRENCY)
        self._background: set[asyncio.Task[None]] = set()
        self.payloads: PayloadLog | None = None
        """Set by the deployment's loop: answered inferences are logged there."""
        self.app = self._build()
        self.set_weights(weights, shadows or {})

    @property
    def remember_bytes(self) -> int:
        """The most bytes of answers kept for joining feedback."""
        return self.answers.max_bytes

    @remember_bytes.setter
    def remember_bytes(self, value: int) -> None:
        self.answers.max_bytes = value

    @property
    def answer_bytes(self) -> int:
        """About how many bytes `answers` holds."""
        return self.answers.bytes

    # -- what the controller drives --------------------------------------------------------------------
    def set_weights(self, weights: dict[str, float], shadows: dict[str, float]) -> None:
        """New traffic split (percent per live predictor) and shadow fractions."""
        self.traffic.set_weights(weights)
        self.traffic.set_shadows(shadows)
        # A predictor no longer weighted or mirrored (retired, promoted over) loses its series: its last weight
        # would be reported for good, and the weights would add up to more than 100.
        for gone in {*self.weights, *self.shadows} - {*weights, *shadows}:
            with contextlib.suppress(KeyError):
                self.metrics.weight.remove(self.deployment, gone)
        self.weights, self.shadows = dict(weights), dict(shadows)
        for name in {*weights, *shadows}:
            self.metrics.weight.labels(self.deployment, name).set(weights.get(name, 0.0))
            self.windows.setdefault(name, Window())

    def new_windows(self) -> None:
        """Start counting afresh (a rollout step began, or a failed check was tolerated): feedback for answers
        given before counts in no window, so that the next checks judge what came after."""
        self.generation += 1
        self.windows = {name: Window() for name in {*self.weights, *self.shadows, *self.pools}}

    def window(self, name: str) -> Window:
        """The current window of a predictor."""
        return self.windows.setdefault(name, Window())

    async def drain(self, endpoint: Endpoint, timeout: float = 30.0) -> None:
        """Send `endpoint` nothing new and wait until its in-flight requests are answered."""
        endpoint.draining = True
        deadline = time.monotonic() + timeout
        while endpoint.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def state(self) -> dict[str, Any]:
        """For status: traffic, bandit arms and windows."""
        return {"weights": self.weights, "shadows": self.shadows, "arms": self.traffic.arms(),
                "windows": {n: w.to_dict() for n, w in self.windows.items()}}

    async def close(self) -> None:
        """Stop background work and close connections."""
        for task in list(self._background):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- forwarding ------------------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=512, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300),
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def _send(self, predictor: str, path: str, body: bytes, headers: dict[str, str],
                    ) -> tuple[int, dict[str, str], bytes, Endpoint]:
        """POST to a replica of `predictor`, trying another when one goes away before answering."""
        pool = self.pools.get(predictor)
        deadline = time.monotonic() + _RETRY_SECONDS
        last: Endpoint | None = None
        attempt, taken = 0, 0
        while True:
            endpoint = pool.pick(avoid=last) if pool else None
            if endpoint is None:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"predictor {predictor!r} has no ready replica")
                await asyncio.sleep(0.05)
                pool = self.pools.get(predictor)
                continue
            endpoint.inflight += 1
            begun = False
            try:
                async with self._client().post(endpoint.url + path, data=body, headers=headers) as resp:
                    begun = True
                    data = await resp.read()
                    endpoint.served += 1
                    return resp.status, dict(resp.headers), data, endpoint
            except (TimeoutError, aiohttp.ClientError) as exc:
                if begun:  # the replica took the request and broke off its answer: not sent again
                    raise BrokenAnswer(f"replica {endpoint.index} of predictor {predictor!r} broke off its answer "
                                       f"({type(exc).__name__}: {exc})") from None
                # A connection that could not be made (or was closed before the request went out) never reached
                # the replica: another one takes it, for as long as `_RETRY_SECONDS`. One that broke after the
                # request went out may have killed its replica ("query of death", an OOM): it is sent once more,
                # as Envoy's bounded retries do in front of KServe and Seldon (a replica killed from outside, or a
                # stale keep-alive connection, costs the client nothing), but never to every replica in turn,
                # which would crash them all.
                if not isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientConnectionResetError):
                    taken += 1
                    if taken > _TAKEN_RETRIES:
                        raise BrokenAnswer(
                            f"replica {endpoint.index} of predictor {predictor!r} died while handling the request "
                            f"({type(exc).__name__}: {exc}), as did the replica it was sent to before: not sent "
                            "again, as the request itself may be what kills replicas") from None
                attempt += 1
                if time.monotonic() > deadline:
                    raise ConnectionError(f"replica {endpoint.index} of {predictor!r} went away: {exc}") from None
                self.metrics.retries.labels(self.deployment, predictor).inc()
                last = endpoint
                await asyncio.sleep(min(0.005 * attempt, 0.05))
            finally:
                endpoint.inflight -= 1

    async def _shadow(self, predictor: str, path: str, body: bytes, headers: dict[str, str],
                      request_id: str, binary: bool) -> None:
        start = time.perf_counter()
        try:
            status, resp_headers, data, _ = await self._send(predictor, path, body, headers)
        except Exception:
            status, data, resp_headers = 599, b"", {}
        self.window(predictor).add_request(time.perf_counter() - start, status < 400, 400 <= status < 500)
        self.metrics.shadow.labels(self.deployment, predictor, str(status)).inc()
        if status == 200:
            with contextlib.suppress(Exception):
                length = resp_headers.get("inference-header-content-length")
                doc, _ = _split(data, int(length) if binary and length else None)
                remembered = self.answers.get(request_id)
                if remembered is not None:
                    output, _ = first_output(doc)
                    remembered.shadows[predictor] = output
                    self.answers.held(request_id, remembered, len(data))
                    if remembered.labelled:  # the label came before the shadow's answer: judge it now
                        self._judge(predictor, remembered, score(output, remembered.truth), None)

    def _mirror(self, predictor: str, path: str, body: bytes, headers: dict[str, str], request_id: str,
                binary: bool) -> None:
        if self._shadow_slots.locked():
            self.metrics.shadow.labels(self.deployment, predictor, "dropped").inc()
            return

        async def run() -> None:
            async with self._shadow_slots:
                await self._shadow(predictor, path, body, headers, request_id, binary)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- routes ----------------------------------------------------------------------------------------
    def _check_name(self, request: Request) -> Response | None:
        name = request.path_params["name"]
        if name != self.deployment:
            return _json({"error": f"no model {name!r} here; this gateway serves {self.deployment!r}"}, 404)
        version = request.path_params.get("version")
        if version is not None and not self._serving(version):
            # Each version once, with the other name that reaches it (`2` or `iris:2`), not as two versions.
            served = sorted({" or ".join(sorted(version_names(pool.version), key=len)) for pool in self.pools.values()})
            return _json({"error": f"deployment {self.deployment!r} serves no version {version!r}; it serves "
                                   f"{'; '.join(served) or 'nothing yet'}"}, 404)
        return None

    async def _body(self, request: Request) -> bytes | Response:
        """The request's body, or the answer that refuses it (a replica's `read_body`: its limit, its words)."""
        try:
            # Streamed against the limit: a body read whole first is held in memory however large, and one
            # that declares more than it sends would keep the client waiting for an answer it has already earned.
            return await read_body(request, self.max_body_bytes)
        except PayloadTooLarge as exc:
            return _json({"error": str(exc)}, 413)
        except ClientDisconnect:  # nobody to answer; counted as nginx does, not as a server error
            return _json({"error": "the client closed the connection before sending the whole request"}, 499)

    def _serving(self, version: str) -> list[str]:
        """The predictors that serve `version`, those with ready replicas and the most traffic first."""
        found = [name for name, pool in self.pools.items() if version in version_names(pool.version)]
        return sorted(found, key=lambda n: (not self.pools[n].ready, -self.weights.get(n, 0.0), n))

    def _refused(self, response: Response) -> Response:
        """An inference the gateway answers itself, before any predictor has it: counted with no predictor."""
        self.metrics.requests.labels(self.deployment, "", str(response.status_code)).inc()
        return response

    async def infer(self, request: Request) -> Response:
        """Route, forward, annotate and remember one inference."""
        if (wrong := self._check_name(request)) is not None:
            return self._refused(wrong)
        body = await self._body(request)
        if isinstance(body, Response):
            return self._refused(body)
        raw_length = request.headers.get("inference-header-content-length")
        binary = raw_length is not None
        try:  # the replica's own checks, so that what it would refuse is refused here in the same words
            length = header_length(raw_length)
            doc = request_header(body, length)
        except InvalidRequest as exc:
            return self._refused(_json({"error": str(exc)}, 400))
        tail = body[length:] if length is not None else b""
        request_id = doc.get("id")
        if not request_id:
            request_id = doc["id"] = uuid.uuid4().hex
            body, length = _join(doc, tail, binary)
            raw_length = str(length) if length is not None else None
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        if raw_length is not None:
            headers["inference-header-content-length"] = raw_length
        forced = request.headers.get("skyloop-predictor")
        if forced is not None and forced not in self.pools:
            return self._refused(_json({"error": f"no predictor {forced!r}; this deployment has "
                                              f"{', '.join(self.pools)}"}, 404))
        version = request.path_params.get("version")
        if version is not None:  # the version decides, as the header does; both must agree
            serving = self._serving(version)
            if forced is not None and forced not in serving:
                return self._refused(_json({"error": f"predictor {forced!r} does not serve version {version!r}"},
                                           404))
            if not serving:  # retired while the body came in
                return self._refused(_json({"error": f"deployment {self.deployment!r} serves no version "
                                                  f"{version!r}"}, 404))
            forced = forced or serving[0]
        sticky = request.headers.get(self.router.sticky_header) if self.router.sticky_header else None
        predictor = forced or self.traffic.choose(sticky)
        path = f"/v2/models/{self.deployment}/infer"
        shadows = self.traffic.mirrors() if forced is None else []
        start = time.perf_counter()
        try:
            status, resp_headers, data, endpoint = await self._send(predictor, path, body, headers)
        except ConnectionError as exc:
            status = 502 if isinstance(exc, BrokenAnswer) else 503
            resp_headers, data, endpoint = {}, orjson.dumps({"error": str(exc)}), None
        seconds = time.perf_counter() - start
        # Mirrored whatever the primary answered: a shadow (a blue-green target) is judged on every request.
        for shadow in shadows:
            self._mirror(shadow, path, body, headers, str(request_id), binary)
        self.window(predictor).add_request(seconds, status < 400, 400 <= status < 500)
        if status >= 400:  # no answer to give feedback on: a bandit learns of the failure here, as a reward of 0
            self.traffic.fail(predictor)
        self.metrics.requests.labels(self.deployment, predictor, str(status)).inc()
        self.metrics.latency.labels(self.deployment, predictor).observe(seconds)
        pool = self.pools.get(predictor)
        version = pool.version if pool else ""
        out_headers = {"skyloop-predictor": predictor, "skyloop-model-version": version}
        if status != 200:
            return Response(data, status, out_headers, media_type="application/json")
        out_length = resp_headers.get("inference-header-content-length")
        try:
            answer, out_tail = _split(data, int(out_length) if out_length else None)
            params = answer.setdefault("parameters", {})
            params["predictor"], params["model_version"] = predictor, version
            data, length = _join(answer, out_tail, out_length is not None)
        except (ValueError, orjson.JSONDecodeError, AttributeError):
            return Response(data, status, out_headers, media_type="application/json")
        answer_id = str(answer.get("id") or request_id)
        output, rows = first_output(answer)
        self.answers.remember(answer_id, Answer(predictor, output, endpoint, version, self.generation,
                                                size=len(answer_id) + len(data), rows=rows))
        if self.payloads is not None:
            # The raw bodies: parsing them is left to whoever reads the logs (binary tensors are not logged).
            self.payloads.add(answer_id, predictor, version, seconds, None if binary else body,
                              None if out_length is not None else data)
        if length is not None:
            out_headers["inference-header-content-length"] = str(length)
            return Response(data, 200, out_headers, media_type="application/octet-stream")
        return Response(data, 200, out_headers, media_type="application/json")

    async def feedback(self, request: Request) -> Response:
        """Join a label or reward to its answer, score the predictor (and shadows), pass it on to the replica.

        Each answer takes one truth and one reward, as on a replica: a repeat is refused (409) before it is
        passed on or counted. The bandit learns once per answer, from its reward or, before one comes, its truth.
        """
        if (wrong := self._check_name(request)) is not None:
            return wrong
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        try:
            given = decode_feedback(body)
        except InvalidRequest as exc:
            return _json({"error": str(exc)}, 400)
        remembered = self.answers.get(given.id)
        if remembered is None:
            return _json({"error": f"no answer {given.id!r} is known to this gateway (too old, or never given); "
                                   "send feedback with the id of a response"}, 404)
        version = request.path_params.get("version")
        if version is not None and remembered.predictor not in self._serving(version):
            return _json({"error": f"answer {given.id!r} was not given by version {version!r}; send its feedback "
                                   f"to /v2/models/{self.deployment}/feedback"}, 404)
        try:
            given.check_rows(remembered.rows)
        except InvalidRequest as exc:
            return _json({"error": str(exc)}, 400)
        if repeated := remembered.taken & given.kinds:
            return _json({"error": str(repeated_feedback(given.id, repeated))}, 409)
        # Taken before the first await, so that a copy posted at the same moment is refused; given back
        # unless the replica stores it.
        remembered.taken |= given.kinds
        status, data = 503, b""
        try:
            status, data = await self._pass_on(remembered, body)
        finally:
            if status != 200:
                remembered.taken -= given.kinds
        if status != 200:
            return Response(data, status, media_type="application/json")
        predictor, truth, reward = remembered.predictor, given.truth, given.reward
        scored = score(remembered.output, truth)
        self._judge(predictor, remembered, scored, reward)
        if truth is not None:
            remembered.truth, remembered.labelled = truth, True
            self.answers.held(given.id, remembered, len(body))
            for shadow, shadow_output in remembered.shadows.items():
                self._judge(shadow, remembered, score(shadow_output, truth), None)
        # A truth's reward is the share of rows answered correctly.
        value = reward if reward is not None else (None if scored is None else scored[0] / scored[1])
        if value is not None and not remembered.rewarded:
            remembered.rewarded = True
            self.traffic.reward(predictor, value)
        self.metrics.feedback.labels(self.deployment, predictor).inc()
        answer = orjson.loads(data)
        answer["predictor"] = predictor
        return _json(answer)

    def _judge(self, predictor: str, answer: Answer, scored: tuple[int, int] | None, reward: float | None) -> None:
        """Count feedback for `answer` in `predictor`'s window, if it is still the one the answer was given in."""
        if answer.generation == self.generation:
            correct, rows = scored if scored is not None else (None, 1)
            self.window(predictor).add_feedback(correct, reward, rows)

    async def _pass_on(self, remembered: Answer, body: bytes) -> tuple[int, bytes]:
        """Send feedback to the replica that gave the answer (another of its predictor's if that one is gone);
        for a predictor retired since, store it in the DB as its replica would have."""
        predictor, endpoint = remembered.predictor, remembered.endpoint
        path = f"/v2/models/{self.deployment}/feedback"
        pool = self.pools.get(predictor)
        if pool is None:
            return await self._store(remembered, body)
        target = endpoint if endpoint is not None and pool and endpoint in pool.endpoints else None
        headers = {"content-type": "application/json"}
        try:
            if target is not None:
                begun = False
                try:
                    async with self._client().post(target.url + path, data=body, headers=headers) as resp:
                        begun = True
                        return resp.status, await resp.read()
                except (TimeoutError, aiohttp.ClientError):
                    if begun:  # it took the feedback and broke off its answer: it may have stored it
                        raise
                    # That replica went away before taking it (as infer requests are, sent to another below).
            status, _, data, _ = await self._send(predictor, path, body, headers)
            return status, data
        except (ConnectionError, TimeoutError, aiohttp.ClientError) as exc:
            return 503, orjson.dumps({"error": f"predictor {predictor!r} could not take the feedback: {exc}"})

    async def _store(self, remembered: Answer, body: bytes) -> tuple[int, bytes]:
        """Feedback for an answer of a predictor no longer served: no replica will ever take it."""
        predictor = remembered.predictor
        if self.db is None:
            return 503, orjson.dumps({"error": f"predictor {predictor!r} is no longer served (retired after a "
                                               "rollout) and this gateway has no DB to store its feedback in"})
        try:
            stored = await asyncio.to_thread(store_feedback, self.db, self.deployment, remembered,
                                             decode_feedback(body))
        except Conflict as exc:
            return 409, orjson.dumps({"error": str(exc)})
        except Exception as exc:  # the DB's own errors (locked, gone): the client may send it again
            log.warning("feedback for %s not stored: %s", predictor, exc)
            return 503, orjson.dumps({"error": f"feedback for predictor {predictor!r} (no longer served) could "
                                               f"not be stored: {type(exc).__name__}; send it again"})
        return 200, orjson.dumps(stored)

    async def _any_replica(self, method: str, path: str, predictors: list[str] | None = None) -> Response:
        names = predictors if predictors is not None else sorted(self.pools, key=lambda n: -self.weights.get(n, 0.0))
        for name in names:
            endpoint = self.pools[name].pick()
            if endpoint is None:
                continue
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self._client().request(method, endpoint.url + path) as resp:
                    return Response(await resp.read(), resp.status, media_type="application/json")
        return _json({"error": f"deployment {self.deployment!r} has no ready replica"}, 503)

    def ready(self) -> bool:
        """Every predictor with traffic has a replica to send it to."""
        return all(n in self.pools and self.pools[n].ready for n, w in self.weights.items() if w > 0)

    def _build(self) -> Starlette:
        async def live(request: Request) -> Response:
            return _json({"live": True})

        async def ready(request: Request) -> Response:
            if self.ready():
                return _json({"ready": True})
            return _json({"ready": False, "error": "a predictor with traffic has no ready replica"}, 503)

        async def server_metadata(request: Request) -> Response:
            return _json({"name": "skyloop-gateway", "deployment": self.deployment,
                          "extensions": ["binary_tensor_data"]})

        async def model_metadata(request: Request) -> Response:
            if (wrong := self._check_name(request)) is not None:
                return wrong
            # A replica knows only its own version: it is asked at its plain path, once the version chose it.
            version = request.path_params.get("version")
            path = f"/v2/models/{self.deployment}" + ("/ready" if request.url.path.endswith("/ready") else "")
            return await self._any_replica("GET", path, None if version is None else self._serving(version))

        async def prometheus(request: Request) -> Response:
            return Response(generate_latest(self.metrics.registry), 200, media_type=CONTENT_TYPE)

        async def not_found(request: Request, exc: Exception) -> Response:
            return _json({"error": f"no endpoint {request.method} {request.url.path}; see /v2/models/"
                                   f"{self.deployment}/infer"}, 404)

        async def not_allowed(request: Request, exc: Exception) -> Response:
            allow = dict(getattr(exc, "headers", None) or {}).get("Allow", "")
            return _json({"error": f"{request.method} is not allowed on {request.url.path}; use "
                                   f"{allow or 'another method'}"}, 405, {"Allow": allow} if allow else None)

        async def failed(request: Request, exc: Exception) -> Response:
            log.exception("gateway error", exc_info=exc)
            return _json({"error": f"internal error: {type(exc).__name__}"}, 500)

        bases = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
        return Starlette(routes=[
            Route("/v2/health/live", live), Route("/v2/health/ready", ready),
            Route("/v2", server_metadata), Route("/v2/", server_metadata), Route("/metrics", prometheus),
            *(Route(base, model_metadata) for base in bases),
            *(Route(base + "/ready", model_metadata) for base in bases),
            *(Route(base + "/infer", self.infer, methods=["POST"]) for base in bases),
            *(Route(base + "/feedback", self.feedback, methods=["POST"]) for base in bases),
        ], exception_handlers={404: not_found, 405: not_allowed, Exception: failed})
