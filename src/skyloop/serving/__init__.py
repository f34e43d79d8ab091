"""Model serving over the Open Inference Protocol (V2 REST): inference graphs, adaptive batching, metrics.

    skyloop serve models:/iris@champion --port 8080
    skyloop serve graph.yaml

The codec (`protocol`), graph runtime (`graph`), batching and data plane know nothing of HTTP; `app` is
the Starlette layer over them, and `server` runs it under uvicorn with worker processes. A graph node refuses a
bad request by raising `InputRejected` (422, "node 'NAME' refused the input: ..."); any other exception it raises is
a server error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyloop._lazy import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from skyloop.errors import InputRejected
    from skyloop.serving.app import create_app
    from skyloop.serving.dataplane import DataPlane
    from skyloop.serving.server import serve, spec_for_target
    from skyloop.serving.spec import BatchingSpec, GraphNode, NodeType, ServeSpec, load_serve_spec

# Lazy on purpose: `serve` must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported.
_LAZY = {
    "create_app": "skyloop.serving.app",
    "DataPlane": "skyloop.serving.dataplane",
    "InputRejected": "skyloop.errors",
    **dict.fromkeys(["serve", "spec_for_target"], "skyloop.serving.server"),
    **dict.fromkeys(["BatchingSpec", "GraphNode", "NodeType", "ServeSpec", "load_serve_spec"], "skyloop.serving.spec"),
}


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "BatchingSpec",
    "DataPlane",
    "GraphNode",
    "InputRejected",
    "NodeType",
    "ServeSpec",
    "create_app",
    "load_serve_spec",
    "serve",
    "spec_for_target",
]
