"""The load generator the serving benchmarks share: raw keep-alive HTTP/1.1 on asyncio streams, one
connection per client, 1-row V2 `infer` requests for a fixed time, and process clean-up by PID.

Imported by `serving.py` and `gateway.py` (run as scripts, so this folder is on `sys.path`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import signal
import subprocess
import time
from dataclasses import dataclass, field
from types import FrameType

import numpy as np
import orjson
import psutil

__all__ = ["HOST", "WARMUP_S", "LoadResult", "health_ok", "run_load", "stop", "stop_on_sigterm"]

HOST = "127.0.0.1"
WARMUP_S = 0.5


@dataclass
class LoadResult:
    """What a load phase measured (after its warm-up)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    answered: int = 0
    """Every 200, warm-up included (what a gateway may have logged)."""
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop `proc` and every process under it, by PID: terminate, wait, then kill what is left."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill PID`, `timeout`) end this process as Ctrl-C does, through its `finally` blocks, which
    stop the servers it started; Python's default ends it at once and leaves them running."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM is not held up by the clean-up
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def health_ok(port: int) -> bool:
    """Whether the server on `port` answers `/v2/health/ready` with 200."""
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _request(model: str, port: int, row: list[float]) -> bytes:
    body = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": row}]})
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked body); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _reconnect(port: int, stop_at: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    while True:
        try:
            return await asyncio.open_connection(HOST, port)
        except OSError:
            if time.perf_counter() >= stop_at:
                raise
            await asyncio.sleep(0.01)


async def _client(port: int, payloads: list[bytes], stop_at: float, measure_from: float,
                  result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    i = 0
    try:
        while (now := time.perf_counter()) < stop_at:
            payload = payloads[i % len(payloads)]
            i += 1
            try:
                writer.write(payload)
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if now >= measure_from:
                    result.errors += 1
                writer.close()
                reader, writer = await _reconnect(port, stop_at)
                continue
            result.answered += status == 200
            if now < measure_from:
                continue
            if status == 200:
                result.latencies.append(time.perf_counter() - now)
            else:
                result.errors += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _load(model: str, port: int, rows: list[list[float]], clients: int, duration: float) -> LoadResult:
    payloads = [_request(model, port, row) for row in rows]
    result = LoadResult()
    measure_from = time.perf_counter() + WARMUP_S
    stop_at = measure_from + duration
    await asyncio.gather(*(_client(port, payloads[i:] + payloads[:i], stop_at, measure_from, result)
                           for i in range(clients)))
    result.elapsed = duration
    return result


def run_load(model: str, port: int, rows: list[list[float]], clients: int, duration: float) -> LoadResult:
    """`clients` connections sending 1-row requests for `model` to `port` for `duration` s (after a warm-up)."""
    try:
        import uvloop

        return uvloop.run(_load(model, port, rows, clients, duration))
    except ImportError:
        return asyncio.run(_load(model, port, rows, clients, duration))
