"""`skyloop serve` as a real process, spoken to by tritonclient (the NVIDIA V2 client) and raw HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pytest
import tritonclient.http as triton
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests_support import post, until

from skyloop.config import Settings
from skyloop.store.feedback import list_feedback
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration


def _post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return post(f"http://127.0.0.1:{port}{path}", body, headers)


def _rows(X: np.ndarray[Any, Any], datatype: str = "FP64", name: str = "input-0") -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(X.shape), "datatype": datatype,
                                     "data": X.reshape(-1).tolist()}]})


def test_tritonclient_talks_to_every_endpoint(serve: Any, settings: Settings, iris_uri: str,
                                               iris: tuple[Any, Any]) -> None:
    clf, X = iris
    with serve(settings, iris_uri, workers=2) as (_, port):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.get_server_metadata()["name"] == "skyloop"
            for version in ("", "1"):
                meta = client.get_model_metadata("iris", version)
                assert meta["versions"] == ["1"]
                assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
                assert client.is_model_ready("iris", version)
            assert not client.is_model_ready("iris", "7")
            assert not client.is_model_ready("nope")
            assert client.get_model_repository_index() == [{"name": "iris", "state": "READY", "version": "1"}]
            for binary in (True, False):
                tensor = triton.InferInput("input-0", [25, 4], "FP64")
                tensor.set_data_from_numpy(X[::6], binary_data=binary)
                outputs = [triton.InferRequestedOutput("predict", binary_data=binary)]
                result = client.infer("iris", [tensor], outputs=outputs, request_id=f"r-{binary}")
                np.testing.assert_array_equal(result.as_numpy("predict"), clf.predict(X[::6]))
                assert result.get_response()["id"] == f"r-{binary}"
            # No outputs named: tritonclient asks for every output as binary data.
            tensor = triton.InferInput("input-0", [1, 4], "FP64")
            tensor.set_data_from_numpy(X[100:101])
            assert client.infer("iris", [tensor], model_version="1").as_numpy("predict").tolist() == \
                clf.predict(X[100:101]).tolist()
        finally:
            client.close()


def test_bad_input_gets_4xx_and_the_server_keeps_serving(serve: Any, settings: Settings, iris_uri: str,
                                                         iris: tuple[Any, Any]) -> None:
    clf, X = iris
    with serve(settings, iris_uri, "--max-body", "1500") as (proc, port):
        cases = [
            ("/v2/models/iris/infer", _rows(X[:2, :3]), 422, "must have shape [-1, 4]"),
            ("/v2/models/iris/infer", _rows(X[:2], "INT64"), 400, "must be integers"),
            ("/v2/models/iris/infer", orjson.dumps({"inputs": [{"name": "input-0", "shape": [2, 4],
                                                                "datatype": "BYTES", "data": ["a"] * 8}]}),
             422, "must be FP64, got BYTES"),
            ("/v2/models/iris/infer", _rows(X[:2], name="x"), 422, "unknown input 'x'"),
            ("/v2/models/iris/infer", b'{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", '
                                      b'"data": [1, 2, 3]}]}', 400, "needs 4 values, 'data' has 3"),
            ("/v2/models/iris/infer", b"{oops", 400, "not valid JSON"),
            ("/v2/models/iris/infer", _rows(X[:100]), 413, "over the limit of 1500"),
            ("/v2/models/nope/infer", _rows(X[:1]), 404, "unknown model 'nope'"),
            ("/v2/models/iris/versions/9/infer", _rows(X[:1]), 404, "no version '9'"),
            ("/v2/models/iris/feedback", b'{"truth": 1}', 400, "needs the 'id'"),
            ("/v2/models/iris/feedback", b'{"id": "x", "reward": "big"}', 400, "must be a number between"),
        ]
        # Values the model cannot take, in a request that fits its signature: the request's fault (422).
        nan = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                        "parameters": {"binary_data_size": 32}}]})
        cases.append(("/v2/models/iris/infer", nan + np.array([np.nan, 1, 2, 3]).tobytes(), 422,
                      "model 'iris' refused the input"))
        for path, body, status, message in cases:
            headers = {"Inference-Header-Content-Length": str(len(nan))} if body.startswith(nan) else None
            got, doc = _post(port, path, body, headers)
            assert (got, set(doc)) == (status, {"error"}), (path, got, doc)
            assert message in doc["error"], doc
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/iris/infer", timeout=10)
        except urllib.error.HTTPError as exc:
            assert (exc.code, exc.headers["allow"]) == (405, "POST")
        else:
            raise AssertionError("GET on the infer endpoint was answered")
        got, doc = _post(port, "/v2/models/iris/infer", _rows(X[:1]), {"Inference-Header-Content-Length": "\u00b9"})
        assert got == 400 and "must be a number of bytes" in doc["error"]
        unknown_output = orjson.loads(_rows(X[:1]))
        unknown_output["outputs"] = [{"name": "proba"}]
        got, doc = _post(port, "/v2/models/iris/infer", orjson.dumps(unknown_output))
        assert got == 400 and "unknown output 'proba'" in doc["error"]
        got, doc = _post(port, "/v2/models/iris/infer", _rows(X[:3]))
        assert got == 200 and doc["outputs"][0]["data"] == clf.predict(X[:3]).tolist()
        assert proc.poll() is None
        # Feedback for that answer is stored against the served version; a ragged truth is refused first.
        answered = doc["id"]
        got, bad = _post(port, "/v2/models/iris/feedback", orjson.dumps({"id": answered, "truth": [[1], [2, 3]]}))
        assert got == 400 and "regular (rectangular) array" in bad["error"]
        got, doc = _post(port, "/v2/models/iris/feedback", orjson.dumps({"id": answered, "truth": [2, 0, 1]}))
        assert got == 200 and doc["stored"] is True
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            assert [row.truth for row in list_feedback(session, "iris")] == [[2, 0, 1]]
    finally:
        workspace.close()


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


SLOW = '''
import time

import numpy as np


class Slow:
    """MODEL that takes as many seconds as its first feature says, and writes down each first feature it sees."""

    def __init__(self, log):
        self.log = log

    def predict(self, X):
        X = np.asarray(X, dtype=float)
        with open(self.log, "a") as f:
            f.write(f"{X[0][0]}\\n")
        time.sleep(float(X[0][0]))
        return X.sum(axis=1)
'''


@pytest.mark.parametrize("batching", [True, False])
def test_a_client_that_hangs_up_while_its_rows_wait_leaves_nothing_to_predict(
        serve: Any, settings: Settings, tmp_path: Path, batching: bool) -> None:
    (tmp_path / "nodes.py").write_text(SLOW)
    log = tmp_path / "predicted.txt"
    spec = tmp_path / "slow.yaml"
    spec.write_text(yaml.safe_dump({"name": "slow", "batching": {"enabled": batching}, "graph": {
        "name": "m", "type": "MODEL", "implementation": "nodes.py:Slow", "parameters": {"log": str(log)}}}))

    def body(seconds: float) -> bytes:
        return orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [seconds]}]})

    with serve(settings, str(spec), "--threads", "1") as (_, port):
        busy = threading.Thread(target=_post, args=(port, "/v2/models/slow/infer", body(1.5)))
        busy.start()  # holds the one model thread
        until(log.exists, 10)
        waiting = body(0.25)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(waiting), waiting))
            time.sleep(0.3)  # read whole, and queued behind the busy thread
        busy.join(30)
        assert _post(port, "/v2/models/slow/infer", body(0.5))[0] == 200  # the next one is served as before
        samples = _samples(port)
    # The rows of the client that went away were never predicted.
    assert log.read_text().split() == ["1.5", "0.5"]
    assert samples[("skyloop_inference_requests_total", (("model", "slow"), ("status", "499"), ("version", "1")))] == 1


def test_metrics_count_requests_batches_and_latency(serve: Any, settings: Settings, iris_uri: str,
                                                     iris: tuple[Any, Any]) -> None:
    _, X = iris
    with serve(settings, iris_uri, workers=2) as (_, port):
        for i in range(12):
            assert _post(port, "/v2/models/iris/infer", _rows(X[i:i + 2]))[0] == 200
        for _ in range(3):
            assert _post(port, "/v2/models/iris/infer", _rows(X[:1, :2]))[0] == 422
        # A version asked for that is not served is counted against the one served, not as a new series.
        assert _post(port, "/v2/models/iris/versions/no-such/infer", _rows(X[:1]))[0] == 404
        # A client that hangs up mid-body is not a server error.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    ok = samples[("skyloop_inference_requests_total", (("model", "iris"), ("status", "200"), ("version", "1")))]
    bad = samples[("skyloop_inference_requests_total", (("model", "iris"), ("status", "422"), ("version", "1")))]
    missing = samples[("skyloop_inference_requests_total", (("model", "iris"), ("status", "404"), ("version", "1")))]
    assert (ok, bad, missing) == (12, 3, 1)
    assert not [labels for _, labels in samples if ("version", "no-such") in labels]
    assert not [labels for _, labels in samples if ("status", "500") in labels]
    assert samples[("skyloop_inference_request_seconds_count", (("model", "iris"), ("version", "1")))] == 17
    assert samples[("skyloop_batch_size_sum", (("model", "iris"),))] == 24  # rows predicted, summed over workers
    assert samples[("skyloop_graph_node_seconds_count", (("model", "iris"), ("node", "iris")))] >= 1
    assert samples[("skyloop_inflight_requests", (("model", "iris"),))] == 0


def test_a_killed_worker_is_replaced(serve: Any, settings: Settings, iris_uri: str, iris: tuple[Any, Any]) -> None:
    _, X = iris
    with serve(settings, iris_uri, workers=2) as (proc, port):
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            now = {c.pid for c in psutil.Process(proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE}
            if len(now) == 2 and workers[0].pid not in now:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        assert all(_post(port, "/v2/models/iris/infer", _rows(X[:1]))[0] == 200 for _ in range(10))


def _serve_fails(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", *args,
                           "--port", "0", "--workers", "1"], capture_output=True, text=True, timeout=60)


def test_a_tampered_model_is_refused_at_start(serve: Any, settings: Settings, iris_uri: str) -> None:
    from skyloop.registry import load_model

    folder = load_model(iris_uri, settings).path  # the verified extracted directory
    victim = next(p for p in Path(folder).iterdir() if p.name != "model.yaml")
    victim.write_bytes(victim.read_bytes() + b"tampered")
    done = _serve_fails(settings, iris_uri)
    assert done.returncode == 6, done.stderr  # StoreError: the stored bytes do not match
    assert "was altered" in done.stderr and "Traceback" not in done.stderr


def test_a_model_directory_with_a_missing_file_is_refused(serve: Any, settings: Settings, iris_uri: str,
                                                           tmp_path: Path) -> None:
    import shutil

    from skyloop.registry import load_model

    copy = tmp_path / "copy"
    shutil.copytree(load_model(iris_uri, settings).path, copy)
    next(p for p in copy.iterdir() if p.name != "model.yaml").unlink()
    done = _serve_fails(settings, str(copy))
    assert done.returncode != 0 and "error:" in done.stderr and "Traceback" not in done.stderr


def test_serve_refusals_have_the_exit_code_of_their_cause(serve: Any, settings: Settings, iris_uri: str) -> None:
    def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", *args],
                              capture_output=True, text=True, timeout=60)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve_cli(iris_uri, "--port", str(taken.getsockname()[1]), "--workers", "1")
    assert busy.returncode == 4, busy.stderr  # Conflict: the port is someone else's, not a model that failed to load
    assert "Address already in use; pick another --port" in busy.stderr
    twice = serve_cli(iris_uri, iris_uri, "--port", "0", "--workers", "1")
    assert twice.returncode == 2 and "two served models share a name" in twice.stderr, twice.stderr
    for option, value in (("--workers", "0"), ("--port", "70000"), ("--threads", "0")):
        refused = serve_cli(iris_uri, option, value)
        assert refused.returncode == 2 and f"Invalid value for '{option}'" in refused.stderr, refused.stderr
    late = serve_cli(iris_uri, "--max-batch-time", "soon", "--port", "0")
    lines = [line for line in late.stderr.splitlines() if line.strip()]
    assert late.returncode == 2 and lines == ["error: invalid batching option: --max-batch-time: 'soon' is not a "
                                              "duration; write e.g. 2ms, 1.5s, 5m or 1h"], late.stderr
