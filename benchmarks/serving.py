"""Model-serving throughput, latency and cold start: `skyloop serve` against a bare FastAPI endpoint.

    .venv/bin/python benchmarks/serving.py [--workers N] [--duration 5] [--clients 16,64]

Registers a scikit-learn LogisticRegression trained on iris in a fresh home, then starts, each as a
real process on 127.0.0.1: a reference FastAPI app run by uvicorn (1 worker) that loads the same
pickled model and answers the same V2 `infer` request, `skyloop serve` with adaptive batching, and
`skyloop serve --no-batching`. An asyncio load generator in this process (raw keep-alive HTTP/1.1 on
asyncio streams, one connection per client) sends 1-row V2 requests for a fixed time at each
concurrency, and the table gives req/s, p50 and p99 latency, errors (any non-200 answer or broken
connection) and req/s as a multiple of the reference at the same concurrency. Cold start is the time
from `Popen` to the first 200 from the server's health route. Targets: >= 1.0x the reference's req/s
at 64 clients with p99 no worse, cold start <= 1.5 s. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import joblib
from loadgen import HOST, LoadResult, health_ok, run_load, stop, stop_on_sigterm
from rich.console import Console
from rich.table import Table

MODEL = "iris"
TARGET_RATIO = 1.0
TARGET_CLIENTS = 64
TARGET_COLD_START_S = 1.5
START_TIMEOUT_S = 60.0

REFERENCE_APP = textwrap.dedent(
    '''
    """Reference: the same model behind a plain FastAPI route, the way one would write it by hand."""
    import os
    from typing import Any

    import joblib
    import numpy as np
    from fastapi import FastAPI
    from pydantic import BaseModel

    model = joblib.load(os.environ["BENCH_MODEL_PATH"])
    app = FastAPI()


    class Tensor(BaseModel):
        name: str
        shape: list[int]
        datatype: str
        data: list[Any]


    class InferRequest(BaseModel):
        inputs: list[Tensor]


    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}


    @app.post("/v2/models/iris/infer")
    def infer(request: InferRequest) -> dict[str, Any]:
        tensor = request.inputs[0]
        x = np.asarray(tensor.data, dtype=np.float64).reshape(tensor.shape)
        y = model.predict(x)
        return {"model_name": "iris", "outputs": [
            {"name": "output-0", "shape": list(y.shape), "datatype": "INT64", "data": y.tolist()}]}
    '''
)


@dataclass
class Server:
    label: str
    proc: subprocess.Popen[bytes]
    port: int
    cold_start_s: float
    stderr_path: Path


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def fail(server_label: str, proc: subprocess.Popen[bytes], stderr_path: Path, why: str) -> SystemExit:
    stderr = stderr_path.read_text(errors="replace")[-4000:]
    return SystemExit(f"{server_label}: {why} (exit code {proc.poll()})\n{stderr}")


def wait_ready(label: str, proc: subprocess.Popen[bytes], started: float, stderr_path: Path,
               port: int | None) -> Server:
    """Poll until the health route answers 200; with `port` None, read it from the first stdout line."""
    if port is None:
        assert proc.stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        line = lines[0].decode(errors="replace") if lines else ""
        match = re.search(r"http://[^:/]+:(\d+)/v2", line)
        if match is None:
            raise fail(label, proc, stderr_path, f"no port in its first line {line!r}")
        port = int(match.group(1))
    while not health_ok(port):
        if proc.poll() is not None:
            raise fail(label, proc, stderr_path, "exited before it was ready")
        if time.perf_counter() - started > START_TIMEOUT_S:
            raise fail(label, proc, stderr_path, f"not ready after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.005)
    return Server(label, proc, port, time.perf_counter() - started, stderr_path)


def start(label: str, argv: list[str], scratch: Path, procs: list[subprocess.Popen[bytes]],
          port: int | None, env: dict[str, str]) -> Server:
    stderr_path = scratch / f"{label.replace(' ', '-')}.stderr"
    with stderr_path.open("wb") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if port is None else subprocess.DEVNULL,
                                stderr=stderr, env=env)
    procs.append(proc)
    return wait_ready(label, proc, started, stderr_path, port)


def start_skyloop(home: Path, uri: str, workers: int, batching: bool, scratch: Path,
                  procs: list[subprocess.Popen[bytes]]) -> Server:
    argv = [sys.executable, "-m", "skyloop", "--home", str(home), "serve", uri, "--host", HOST, "--port", "0",
            "--workers", str(workers)]
    if not batching:
        argv.append("--no-batching")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    label = "skyloop batching" if batching else "skyloop no-batching"
    return start(label, argv, scratch, procs, None, env)


def start_reference(model_path: Path, scratch: Path, procs: list[subprocess.Popen[bytes]]) -> Server:
    app_dir = scratch / "reference"
    app_dir.mkdir()
    (app_dir / "reference_app.py").write_text(REFERENCE_APP)
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "reference_app:app", "--app-dir", str(app_dir), "--host", HOST,
            "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"]
    env = {**os.environ, "BENCH_MODEL_PATH": str(model_path)}
    return start("reference FastAPI", argv, scratch, procs, port, env)


# ---------------------------------------------------------------- load generator


# ---------------------------------------------------------------- main


def register_model(home: Path, scratch: Path) -> tuple[str, Path, list[list[float]]]:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from skyloop.config import Settings
    from skyloop.registry import log_model

    X, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=1000).fit(X, y)
    info = log_model(clf, MODEL, input_example=X[:5], settings=Settings.for_home(home))
    model_path = scratch / "iris.joblib"
    joblib.dump(clf, model_path)
    return info.uri, model_path, [[float(v) for v in row] for row in X]


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="skyloop worker processes")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per row")
    parser.add_argument("--clients", default="16,64", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    stop_on_sigterm()
    concurrencies = [int(c) for c in args.clients.split(",")]
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a pipe or a file: do not squeeze the table into 80 columns
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="skyloop-bench-serving-") as tmp:
        scratch = Path(tmp)
        home = scratch / "home"
        uri, model_path, rows = register_model(home, scratch)
        results: dict[tuple[str, int], LoadResult] = {}
        cold: dict[str, float] = {}
        starts: list[tuple[str, Callable[[list[subprocess.Popen[bytes]]], Server]]] = [
            ("reference FastAPI", lambda p: start_reference(model_path, scratch, p)),
            ("skyloop batching", lambda p: start_skyloop(home, uri, args.workers, True, scratch, p)),
            ("skyloop no-batching", lambda p: start_skyloop(home, uri, args.workers, False, scratch, p))]
        for label, starter in starts:
            # One server at a time, so none competes with another for the cores.
            with processes() as procs:
                server = starter(procs)
                cold[label] = server.cold_start_s
                for clients in concurrencies:
                    results[label, clients] = run_load(MODEL, server.port, rows, clients, args.duration)
                if server.proc.poll() is not None:
                    raise fail(label, server.proc, server.stderr_path, "died under load")

    table = Table(title=f"V2 infer, 1-row iris LogisticRegression, {args.duration:g} s per row "
                        f"(skyloop --workers {args.workers}; reference: uvicorn 1 worker)")
    for column in ("server", "clients", "req/s", "p50 ms", "p99 ms", "errors", "x reference req/s",
                   "x reference p99"):
        table.add_column(column, justify="right")
    for label, _ in starts:
        for clients in concurrencies:
            result = results[label, clients]
            ref = results["reference FastAPI", clients]
            ratio = result.rps / ref.rps if ref.rps else float("nan")
            p99_ratio = result.percentile_ms(99) / ref.percentile_ms(99) if ref.latencies else float("nan")
            table.add_row(label, str(clients), f"{result.rps:,.0f}", f"{result.percentile_ms(50):.2f}",
                          f"{result.percentile_ms(99):.2f}", str(result.errors), f"{ratio:.2f}x",
                          f"{p99_ratio:.2f}x")
    console.print(table)
    for label, seconds in cold.items():
        meets = "yes" if seconds <= TARGET_COLD_START_S else "NO"
        console.print(f"cold start {label}: {seconds:.2f} s ({seconds / cold['reference FastAPI']:.2f}x reference; "
                      f"target <= {TARGET_COLD_START_S:g} s: {meets})", highlight=False)
    if TARGET_CLIENTS in concurrencies:
        ref = results["reference FastAPI", TARGET_CLIENTS]
        for label in ("skyloop batching", "skyloop no-batching"):
            result = results[label, TARGET_CLIENTS]
            ok = result.rps >= TARGET_RATIO * ref.rps and result.percentile_ms(99) <= ref.percentile_ms(99)
            console.print(f"target {label} at {TARGET_CLIENTS} clients: >= {TARGET_RATIO:g}x reference req/s "
                          f"({result.rps / ref.rps:.2f}x) with p99 no worse ({result.percentile_ms(99):.2f} vs "
                          f"{ref.percentile_ms(99):.2f} ms): {'yes' if ok else 'NO'}", highlight=False)
    console.print(f"note: this machine has {cores} core(s); the load generator runs in this process on the same "
                  "cores and competes with the server, so absolute figures understate a dedicated server.",
                  highlight=False)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
