"""`/metrics` as Prometheus scrapes it: exact counts across worker processes, restarts of workers and servers."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from skyloop.config import Settings
from skyloop.serving.metrics import ServingMetrics

REQUESTS_200 = ("skyloop_inference_requests_total", (("model", "iris"), ("status", "200"), ("version", "1")))
INFLIGHT = ("skyloop_inflight_requests", (("model", "iris"),))


def _infer(port: int, X: np.ndarray[Any, Any]) -> None:
    body = orjson.dumps({"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64",
                                     "data": X.reshape(-1).tolist()}]})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.integration
def test_a_server_restarted_on_the_same_metrics_dir_counts_from_zero(serve: Any, settings: Settings, iris_uri: str,
                                                                      iris: tuple[Any, Any], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator (or a process manager) giving the folder: the first server's counts must not be added again.
    (tmp_path / "metrics").mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    _, X = iris
    for run in range(2):
        with serve(settings, iris_uri, workers=2) as (_, port):
            for i in range(3):
                _infer(port, X[i:i + 1])
            samples = _scrape(port)
        assert (run, samples[REQUESTS_200], samples[INFLIGHT]) == (run, 3, 0)


@pytest.mark.integration
def test_replaced_workers_keep_their_counts_in_one_set_of_files_per_worker(
        serve: Any, settings: Settings, iris_uri: str, iris: tuple[Any, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    _, X = iris
    with serve(settings, iris_uri, workers=2) as (proc, port):
        server = psutil.Process(proc.pid)
        sent = 0
        for _ in range(4):
            for i in range(5):
                _infer(port, X[i:i + 1])
            sent += 5
            workers = {p.pid for p in server.children()}
            os.kill(min(workers), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while len({p.pid for p in server.children()} - workers) < 1 or len(server.children()) < 2:
                assert time.monotonic() < deadline, "the killed worker was not replaced"
                time.sleep(0.05)
            samples = _scrape(port)
            assert samples[REQUESTS_200] == sent  # nothing the dead worker counted is lost, nothing is counted twice
            # (No series at all when no live worker has taken a request yet: all five went to the one killed.)
            assert samples.get(INFLIGHT, 0) == 0
        # Four workers died and were replaced: still one counter file per worker slot, not one per pid ever run.
        assert len(list(folder.glob("counter_*.db"))) == 2, sorted(p.name for p in folder.iterdir())
        assert len(list(folder.glob("histogram_*.db"))) == 2


def test_latency_buckets_tell_apart_sub_millisecond_times() -> None:
    # A small model's own method takes 0.1-0.5 ms: with a first bucket of 0.5 ms every such time lands in it.
    metrics = ServingMetrics()
    for seconds in (0.00008, 0.0002, 0.0004):
        metrics.node_latency.labels("m", "n").observe(seconds)
    buckets = {float(s.labels["le"]): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in family.samples if s.name == "skyloop_graph_node_seconds_bucket"}
    assert (buckets[0.0001], buckets[0.00025], buckets[0.0005]) == (1, 2, 3)
    assert max(b for b in buckets if b != float("inf")) == 10.0



@pytest.mark.integration
def test_a_metrics_dir_that_does_not_exist_yet_is_made(serve: Any, settings: Settings, iris_uri: str,
                                                        iris: tuple[Any, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "not-yet" / "metrics"))
    _, X = iris
    with serve(settings, iris_uri, workers=2) as (_, port):
        _infer(port, X[:1])
        assert _scrape(port)[REQUESTS_200] == 1
