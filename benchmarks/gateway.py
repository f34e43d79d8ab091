"""Gateway overhead and the cost of payload logging: a replica straight, through its gateway, and logged.

    .venv/bin/python benchmarks/gateway.py [--duration 5] [--clients 16,64]

Registers a scikit-learn LogisticRegression trained on iris in a fresh home and starts a deployment
controller as a real process (`skyloop --home H deploy controller`). Each deployment has one predictor
of 1 replica (`models:/iris/1`, default adaptive batching) behind its gateway; they run one at a time,
each deleted before the next is applied. An asyncio load generator in this process (raw keep-alive
HTTP/1.1 on asyncio streams, one connection per client) sends 1-row V2 requests for a fixed time at
each concurrency, to:

1. `replica direct`: the replica's own port (the baseline);
2. `gateway`: the gateway of the same deployment, which has no `loop:` section;
3. `gateway + payload log (100%)`: the gateway of a deployment with `loop: {log: {sample: 1.0}}` (no
   triggers): every answered inference is buffered at the gateway and written as a parquet segment about
   once a second, and the loop's drift and quality checks run every 5 s in the controller;
4. `gateway + payload log (10%)`: a third deployment, with `sample: 0.1`.

(Separate deployments rather than one re-applied with a new `loop:`, so that each phase starts from a
fresh gateway.) The rows a logging deployment
wrote are read back with `read_payloads` after its phase (after a pause longer than a flush) and set
against the 200 answers its clients got, warm-up included, to show that logging really happened. The
table gives req/s, p50 and p99 latency, errors (any non-200 answer or broken connection), req/s as a
multiple of the replica's, and the logging gateways' req/s as a multiple of the plain gateway's.
Target: payload logging costs < 10% of the gateway's throughput (100% logged req/s >= 0.9x gateway
req/s). Figures are printed, never asserted.

On a small machine (2 cores, say) the load generator, the controller (gateway and loop, one event loop)
and the replica share the cores, so the gateway's overhead includes the cores it takes from the replica
and from the load generator; absolute figures understate dedicated machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadgen import LoadResult, health_ok, run_load, stop, stop_on_sigterm
from rich.console import Console
from rich.table import Table

MODEL = "iris"
TARGET_COST = 0.10
START_TIMEOUT_S = 60.0
FLUSH_PAUSE_S = 2.5  # longer than a flush (1 s) plus a controller tick: a phase's rows are all written by then

DIRECT, GATEWAY, LOG_ALL, LOG_TENTH = ("replica direct", "gateway", "gateway + payload log (100%)",
                                       "gateway + payload log (10%)")


# ---------------------------------------------------------------- processes


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not health_ok(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"port {port}: not ready after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def start_controller(settings: Any, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "skyloop", "--home", str(settings.home), "deploy", "controller"]
    env = {**os.environ, "SKYLOOP_DB_URL": settings.resolved_db_url,
           "SKYLOOP_ARTIFACTS_URL": settings.resolved_artifacts_url}
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


# ---------------------------------------------------------------- main


def register_model(settings: Any) -> list[list[float]]:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model

    X, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=1000).fit(X, y)
    log_model(clf, MODEL, input_example=X[:5], settings=settings)
    return [[float(v) for v in row] for row in X]


def spec(name: str, sample: float | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name,
                           "predictors": [{"name": "main", "model_uri": f"models:/{MODEL}/1", "replicas": 1,
                                           "traffic": 100}]}
    if sample is not None:
        doc["loop"] = {"log": {"sample": sample}}
    return doc


def apply(name: str, sample: float | None, settings: Any) -> tuple[int, int]:
    """Apply a deployment; return its gateway's port and its replica's."""
    from skyloop.deploy.api import apply_deployment

    info = apply_deployment(spec(name, sample), settings, start=False, timeout=90)
    gateway = int(urlsplit(info.state["gateway"]).port or 0)
    replica = int(info.state["predictors"]["main"]["replicas"][0]["port"])
    wait_ready(gateway)
    wait_ready(replica)
    return gateway, replica


def logged_rows(settings: Any, name: str) -> int:
    from skyloop.monitoring.payloads import read_payloads
    from skyloop.store.workspace import Workspace

    workspace = Workspace.open(settings)
    try:
        return len(read_payloads(workspace, name))
    finally:
        workspace.close()


def measure(settings: Any, rows: list[list[float]], concurrencies: list[int], duration: float,
            ) -> tuple[dict[tuple[str, int], LoadResult], dict[str, tuple[int, int]]]:
    """Every row of the table, and the logged and answered rows per logging phase.

    One deployment at a time, deleted before the next starts, so that no idle gateway, loop or replica
    competes for the cores (the controller hosts every gateway on one event loop)."""
    from skyloop.deploy.api import delete_deployment

    results: dict[tuple[str, int], LoadResult] = {}
    logged: dict[str, tuple[int, int]] = {}
    plan: list[tuple[str, float | None, list[str]]] = [
        ("bench-gw", None, [DIRECT, GATEWAY]), ("bench-log-all", 1.0, [LOG_ALL]),
        ("bench-log-tenth", 0.1, [LOG_TENTH])]
    for name, sample, labels in plan:
        gateway, replica = apply(name, sample, settings)
        for label in labels:
            for clients in concurrencies:
                port = replica if label == DIRECT else gateway
                results[label, clients] = run_load(name, port, rows, clients, duration)
        if sample is not None:
            time.sleep(FLUSH_PAUSE_S)
            answered = sum(results[labels[0], c].answered for c in concurrencies)
            logged[labels[0]] = (logged_rows(settings, name), answered)
        # Not in a `finally`: after an error or a Ctrl-C, stopping the controller stops the deployment too, while a
        # delete would wait its whole timeout on a controller that Ctrl-C (sent to the process group) ended.
        delete_deployment(settings, name)
    return results, logged


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per row")
    parser.add_argument("--clients", default="16,64", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    stop_on_sigterm()
    concurrencies = [int(c) for c in args.clients.split(",")]
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # a pipe or a file: do not squeeze the table into 80 columns

    from skyloop.config import Settings
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="skyloop-bench-gateway-") as tmp:
        settings = Settings.for_home(Path(tmp) / "home")
        rows = register_model(settings)
        controller = start_controller(settings, Path(tmp) / "controller.log")
        try:
            results, logged = measure(settings, rows, concurrencies, args.duration)
        except BaseException:
            log = (Path(tmp) / "controller.log").read_text(errors="replace")[-4000:]
            console.print(f"controller log (tail):\n{log}", highlight=False, markup=False)
            raise
        finally:
            stop(controller)

    table = Table(title=f"V2 infer through a deployment gateway, 1-row iris LogisticRegression, 1 replica, "
                        f"{args.duration:g} s per row")
    for column in ("path", "clients", "req/s", "p50 ms", "p99 ms", "errors", "x direct req/s",
                   "x gateway req/s", "logged / answered"):
        table.add_column(column, justify="right")
    for label in (DIRECT, GATEWAY, LOG_ALL, LOG_TENTH):
        for clients in concurrencies:
            result = results[label, clients]
            direct, gateway = results[DIRECT, clients], results[GATEWAY, clients]
            vs_gateway = ratio(result.rps, gateway.rps) if label in (LOG_ALL, LOG_TENTH) else ""
            rows_logged = ""
            if label in logged and clients == concurrencies[0]:
                done, answered = logged[label]
                rows_logged = f"{done:,} / {answered:,} ({done / answered:.0%})" if answered else f"{done:,} / 0"
            table.add_row(label, str(clients), f"{result.rps:,.0f}", f"{result.percentile_ms(50):.2f}",
                          f"{result.percentile_ms(99):.2f}", str(result.errors),
                          ratio(result.rps, direct.rps) if label != DIRECT else "", vs_gateway, rows_logged)
    console.print(table)
    console.print("logged / answered: rows read back with read_payloads for the whole phase (all concurrencies, "
                  "warm-up included) against the 200 answers the clients got", highlight=False)
    for clients in concurrencies:
        gateway, logging = results[GATEWAY, clients], results[LOG_ALL, clients]
        cost = 1 - logging.rps / gateway.rps if gateway.rps else float("nan")
        verdict = "met" if cost < TARGET_COST else "missed"
        console.print(f"target at {clients} clients: payload logging (100%) costs < {TARGET_COST:.0%} of the gateway's "
                      f"req/s; it costs {cost:.1%} ({logging.rps:,.0f} vs {gateway.rps:,.0f} req/s): {verdict}",
                      highlight=False)
    console.print(f"note: this machine has {os.cpu_count() or 1} core(s); the load generator, the controller "
                  "(gateway) and the replica share them. Took "
                  f"{time.perf_counter() - began:.0f} s.", highlight=False)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
