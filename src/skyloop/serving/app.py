"""The REST layer: a Starlette app over the data plane, built by `create_app`. It only routes and maps errors.

Endpoints (Open Inference Protocol, REST):
`GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` (and `/v2/`),
`GET /v2/models/{name}[/versions/{version}]`, `GET /v2/models/{name}[/versions/{version}]/ready`,
`POST /v2/models/{name}[/versions/{version}]/infer`, `POST /v2/models/{name}[/versions/{version}]/feedback`,
`POST /v2/repository/index`, and `GET /metrics` (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from skyloop.errors import (
    Conflict,
    InputRejected,
    InvalidRequest,
    NodeError,
    NotFound,
    NotReady,
    OutputError,
    PayloadTooLarge,
    SignatureMismatch,
    SkyloopError,
    SpecError,
)
from skyloop.serving.dataplane import DataPlane
from skyloop.serving.metrics import CONTENT_TYPE
from skyloop.serving.protocol import header_length

__all__ = ["STATUS", "create_app", "read_body", "status_of"]

log = logging.getLogger("skyloop.serving")
T = TypeVar("T")

STATUS: list[tuple[type[Exception], int]] = [
    (PayloadTooLarge, 413),
    (SignatureMismatch, 422),
    (InputRejected, 422),
    (InvalidRequest, 400),
    (SpecError, 400),
    (NotFound, 404),
    (Conflict, 409),
    (NotReady, 503),
    (NodeError, 500),
    (OutputError, 500),
]
"""Domain error -> HTTP status, most specific first (MLServer's `rest/errors.py` shape)."""

DEFAULT_MAX_BODY = 16 * 1024 * 1024


def status_of(exc: Exception) -> int:
    """The HTTP status for an error raised while handling a request."""
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


def _error(exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):  # nobody to answer; counted as nginx does, not as a server error
        return _json({"error": "the client closed the connection before it was answered"}, 499)
    status = status_of(exc)
    message = str(exc) if isinstance(exc, SkyloopError) else f"internal error: {type(exc).__name__}"
    if not isinstance(exc, SkyloopError):
        log.exception("unexpected error while serving a request", exc_info=exc)
    return _json({"error": message}, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with `PayloadTooLarge` once it is over `limit` bytes.

    A declared length over the limit is refused before anything is read, and a body is never held whole past
    the limit: a client that declares a terabyte, or streams one, gets its 413 at once. The gateway reads
    its bodies with this too, so that it refuses them as a replica does, in the same words.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (begun after the whole body was read), cancelled if the client hangs up first.

    Raises `ClientDisconnect` then: a client that timed out and went away (and may be sending its request
    again) leaves no rows behind it to predict, which under overload would only lengthen the queue for the
    clients still waiting. A batch that has already taken its rows finishes; its answer is dropped. One
    watcher task per request, which cancels this one: cheaper than running `work` in a task of its own.
    """
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.get_running_loop().create_task(_cancel_when_gone(request, task))
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
            raise ClientDisconnect() from None
        raise
    finally:
        watcher.cancel()


async def _cancel_when_gone(request: Request, task: asyncio.Task[Any]) -> None:
    """Cancel `task` once the client has gone (the server says so when it reads the end of the connection)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    task.cancel()


def create_app(plane: DataPlane, max_body_bytes: int = DEFAULT_MAX_BODY, load: bool = True) -> Starlette:
    """The ASGI app serving `plane`. With `load`, the graphs load in the background after startup.

    Until they have loaded, `/v2/health/ready` and model endpoints answer 503 with the reason.
    """
    metrics = plane.metrics

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        if plane.ready():
            return _json({"ready": True})
        return _json({"ready": False, "error": plane.not_ready_reason()}, 503)

    async def server_metadata(request: Request) -> Response:
        return _json(plane.server_metadata())

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        try:
            return _json(plane.model_metadata(p["name"], p.get("version")))
        except SkyloopError as exc:
            return _error(exc)

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        try:
            plane.model(p["name"], p.get("version"))
        except NotReady as exc:
            return _json({"name": p["name"], "ready": False, "error": str(exc)}, 503)
        except SkyloopError as exc:
            return _error(exc)
        return _json({"name": p["name"], "ready": True})

    async def infer(request: Request) -> Response:
        p = request.path_params
        name, version = p["name"], p.get("version")
        start = time.perf_counter()
        served = plane.models.get(name)
        known = served is not None
        # Errors are counted against the version being served, so that a bad version's error rate shows
        # (not the one asked for: any string a client sends would become a new series).
        label_version = served.graph.version if served is not None and served.graph else ""
        if known:
            metrics.inflight.labels(name).inc()
        plane.admit(name)
        try:
            try:
                body = await read_body(request, max_body_bytes)
                length = header_length(request.headers.get("inference-header-content-length"))
            except BaseException:
                plane.release(name)
                raise
            work = plane.infer(name, version, body, length)  # releases the admission
            result = await unless_disconnected(request, work)
        except Exception as exc:
            response = _error(exc)
        else:
            label_version = result.version
            headers = {"skyloop-model-version": f"{result.model}/{result.version}"}
            if result.header_length is not None:
                headers["inference-header-content-length"] = str(result.header_length)
                response = Response(result.body, 200, headers, media_type="application/octet-stream")
            else:
                response = Response(result.body, 200, headers, media_type="application/json")
        if known:
            metrics.inflight.labels(name).dec()
            metrics.requests.labels(name, label_version, str(response.status_code)).inc()
            metrics.latency.labels(name, label_version).observe(time.perf_counter() - start)
        return response

    async def feedback(request: Request) -> Response:
        p = request.path_params
        try:
            body = await read_body(request, max_body_bytes)
            return _json(await plane.feedback(p["name"], p.get("version"), body))
        except Exception as exc:
            return _error(exc)

    async def repository_index(request: Request) -> Response:
        return _json(plane.repository_index())

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), 200, media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if status == 404:
            detail = f"no endpoint {request.method} {request.url.path}; see /v2 and /v2/models/NAME"
        headers = getattr(exc, "headers", None)  # 405: Allow
        return _json({"error": detail}, status, dict(headers) if headers else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = None
        if load:
            async def load_all() -> None:
                await asyncio.to_thread(plane.load)
                plane.start_batching()
                for name, served in plane.models.items():
                    if served.failure:
                        log.error("model %s failed to load: %s", name, served.failure)

            task = asyncio.create_task(load_all())
        else:
            plane.start_batching()
        if plane.relay is not None:  # a worker of several: feedback on its answers may come through another
            await plane.relay.serve(plane.tell_here)
        try:
            yield
        finally:
            if plane.relay is not None:
                await plane.relay.aclose()
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            plane.close()

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/", server_metadata),
        Route("/v2/repository/index", repository_index, methods=["POST", "GET"]),
        Route("/metrics", prometheus),
        *(Route(base, model_metadata) for base in (model, versioned)),
        *(Route(base + "/ready", model_ready) for base in (model, versioned)),
        *(Route(base + "/infer", infer, methods=["POST"]) for base in (model, versioned)),
        *(Route(base + "/feedback", feedback, methods=["POST"]) for base in (model, versioned)),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: http_error})
