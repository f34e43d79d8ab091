"""Prometheus metrics of the model server (served at `/metrics`).

| name | type | labels | what |
|---|---|---|---|
| `skyloop_inference_requests_total` | counter | model, version, status | inference requests by HTTP status |
| `skyloop_inference_request_seconds` | histogram | model, version | time from request to response |
| `skyloop_graph_node_seconds` | histogram | model, node | time in a graph node's own method |
| `skyloop_batch_size` | histogram | model | rows per predicted batch |
| `skyloop_queue_depth` | gauge | model | rows waiting for a batch |
| `skyloop_inflight_requests` | gauge | model | requests being handled |
| `skyloop_feedback_total` | counter | model, kind | feedback received (kind: truth, reward) |

With several worker processes the server sets `PROMETHEUS_MULTIPROC_DIR` before they start and `/metrics`
adds up every worker's values. Latencies are in seconds, from 100 µs (a small model's own method) to 10 s.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "ServingMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The server's metrics, in their own registry (or the multiprocess files when workers share them)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode values go to files whatever the registry; a private registry keeps two apps in
        # one process (tests) from clashing over metric names.
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        self.requests = Counter("skyloop_inference_requests", "Inference requests by model, version and status.",
                                ["model", "version", "status"], registry=reg)
        self.latency = Histogram("skyloop_inference_request_seconds", "Time from request to response.",
                                 ["model", "version"], buckets=LATENCY_BUCKETS, registry=reg)
        self.node_latency = Histogram("skyloop_graph_node_seconds", "Time in a graph node's own method.",
                                      ["model", "node"], buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("skyloop_batch_size", "Rows per predicted batch.", ["model"],
                                    buckets=_BATCH, registry=reg)
        self.queue_depth = Gauge("skyloop_queue_depth", "Rows waiting for a batch.", ["model"],
                                 registry=reg, multiprocess_mode="livesum")
        self.inflight = Gauge("skyloop_inflight_requests", "Requests being handled.", ["model"],
                              registry=reg, multiprocess_mode="livesum")
        self.feedback = Counter("skyloop_feedback", "Feedback received by model and kind.", ["model", "kind"],
                                registry=reg)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
