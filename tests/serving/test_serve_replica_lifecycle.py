"""`skyloop serve --replicas N` as clients see it while it starts and while it stops."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import yaml
from tests_support import write

from skyloop.config import Settings

pytestmark = pytest.mark.integration

NODES = '''
import os
import time

import numpy as np


class Gated:
    """MODEL whose load() waits until the file `gate` exists: the test says when loading is over."""

    def __init__(self, gate):
        self.gate = gate

    def load(self):
        deadline = time.monotonic() + 60
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.02)

    def predict(self, X):
        return np.asarray(X, dtype=float).sum(axis=1)


class Slow:
    """MODEL that takes as many seconds as its first feature says."""

    def predict(self, X):
        X = np.asarray(X, dtype=float)
        time.sleep(float(X[0][0]))
        return X.sum(axis=1)
'''


def _spec(folder: Path, implementation: str, parameters: dict[str, Any] | None = None) -> Path:
    write(folder / "nodes.py", NODES)
    node: dict[str, Any] = {"name": "m", "type": "MODEL", "implementation": f"nodes.py:{implementation}"}
    if parameters:
        node["parameters"] = parameters
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "graph": node, "batching": {"enabled": False}}))
    return path


def _call(port: int, path: str, body: bytes | None = None, timeout: float = 5) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _body(value: float) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [value]}]})


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _listening(pid: int) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return set()


def _announced(proc: subprocess.Popen[str], count: int) -> list[int]:
    lines: list[str] = []

    def read() -> None:
        while len(lines) < count and proc.stdout is not None and (line := proc.stdout.readline()):
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    ports = [re.search(r"http://127\.0\.0\.1:(\d+)/v2", line) for line in lines]
    assert len(ports) == count and all(ports), lines
    return [int(m.group(1)) for m in ports if m]


@contextlib.contextmanager
def _serve(settings: Settings, spec: Path, count: int = 2) -> Iterator[subprocess.Popen[str]]:
    """`skyloop serve SPEC --replicas COUNT --port 0`; it and everything it started are stopped by PID after."""
    cmd = [sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", str(spec), "--host", "127.0.0.1",
           "--port", "0", "--replicas", str(count)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started: set[int] = set()
    try:
        yield proc
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        for pid in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_health_answers_at_once_while_the_models_load(settings: Settings, tmp_path: Path) -> None:
    gate = tmp_path / "loaded"
    spec = _spec(tmp_path / "graph", "Gated", {"gate": str(gate)})
    with _serve(settings, spec) as proc:
        deadline = time.monotonic() + 60
        while len(ports := _listening(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the replica sockets never listened"
            time.sleep(0.05)
        # The models are loading (the gate is shut): every port answers at once, and says so.
        for port in ports:
            assert _call(port, "/v2/health/live") == (200, {"live": True})
            status, doc = _call(port, "/v2/health/ready")
            assert status == 503 and doc["ready"] is False and "loading" in doc["error"], doc
            status, doc = _call(port, "/v2/models/m/infer", _body(1.0))
            assert status == 503 and "loading" in doc["error"], doc
        assert proc.poll() is None
        gate.touch()
        assert set(_announced(proc, 2)) == ports
        for port in ports:
            deadline = time.monotonic() + 30
            while _call(port, "/v2/health/ready")[0] != 200:
                assert time.monotonic() < deadline, "a replica never became ready"
                time.sleep(0.05)
            status, doc = _call(port, "/v2/models/m/infer", _body(2.0))
            assert status == 200 and doc["outputs"][0]["data"] == [2.0], doc


def test_sigterm_refuses_new_connections_and_finishes_the_requests_in_flight(settings: Settings,
                                                                            tmp_path: Path) -> None:
    spec = _spec(tmp_path / "graph", "Slow")
    with _serve(settings, spec) as proc:
        ports = _announced(proc, 2)
        for port in ports:
            assert _call(port, "/v2/models/m/infer", _body(0.0), timeout=30)[0] == 200
        pids = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())}
        answers: list[tuple[int, dict[str, Any]]] = []
        slow = threading.Thread(target=lambda: answers.append(_call(ports[0], "/v2/models/m/infer", _body(3.0),
                                                                    timeout=30)), daemon=True)
        slow.start()
        deadline = time.monotonic() + 10
        while "skyloop_inflight_requests{model=\"m\"} 1.0" not in urllib.request.urlopen(
                f"http://127.0.0.1:{ports[0]}/metrics", timeout=5).read().decode():
            assert time.monotonic() < deadline, "the slow request never got in flight"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        # Draining: a new connection is refused at once (a proxy goes elsewhere), not queued until the drain ends.
        for port in ports:
            deadline = time.monotonic() + 1.5
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, f"port {port} still took connections while draining"
                time.sleep(0.02)
        assert slow.is_alive(), "the slow request ended before the check: it proves nothing"
        slow.join(30)
        assert len(answers) == 1 and answers[0][0] == 200 and answers[0][1]["outputs"][0]["data"] == [3.0], answers
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, [pid for pid in pids if not _gone(pid)]
            time.sleep(0.02)


# A stand-in for the deployment controller: starts `skyloop serve ARGS` (with its own pid as --parent-pid when
# the first argument says so), then waits to be killed.
_STARTER = ("import os, subprocess, sys, time; "
            "extra = ['--parent-pid', str(os.getpid())] if sys.argv[1] == 'pid' else []; "
            "subprocess.Popen(sys.argv[2:] + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "time.sleep(600)")


@pytest.mark.parametrize("passes_pid", [False, True], ids=["exit-with-parent", "parent-pid"])
def test_replicas_exit_when_their_parent_dies_while_the_models_load(settings: Settings, tmp_path: Path,
                                                                   passes_pid: bool) -> None:
    gate = tmp_path / "loaded"
    spec = _spec(tmp_path / "graph", "Gated", {"gate": str(gate)})
    state_file = tmp_path / "replicas.json"
    cmd = [sys.executable, "-c", _STARTER, "pid" if passes_pid else "-", sys.executable, "-m", "skyloop", "--home",
           str(settings.home), "serve", str(spec), "--host", "127.0.0.1", "--port", "0", "--replicas", "2",
           "--state-file", str(state_file), "--exit-with-parent"]
    starter = subprocess.Popen(cmd)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not (children := psutil.Process(starter.pid).children()) or len(_listening(children[0].pid)) < 2:
            assert time.monotonic() < deadline, "skyloop serve never listened"
            time.sleep(0.05)
        server = children[0].pid
        started.add(server)
        starter.kill()  # the controller dies while the models load
        starter.wait(timeout=5)
        gate.touch()
        deadline = time.monotonic() + 15
        while not _gone(server):
            with contextlib.suppress(psutil.NoSuchProcess):
                started |= {c.pid for c in psutil.Process(server).children()}
            assert time.monotonic() < deadline, "skyloop serve outlived its parent: its replicas serve for nobody"
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while not all(_gone(pid) for pid in started):
            assert time.monotonic() < deadline, [pid for pid in started if not _gone(pid)]
            time.sleep(0.05)
        assert not state_file.exists()
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started |= {c.pid for c in psutil.Process(starter.pid).children(recursive=True)}
        for pid in set(started):
            with contextlib.suppress(psutil.NoSuchProcess):
                started |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        for pid in started | {starter.pid}:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        starter.wait(timeout=5)


def test_replica_ports_past_65535_are_refused_with_the_options_given(settings: Settings) -> None:
    done = subprocess.run([sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", "models:/iris@x",
                           "--port", "65535", "--replicas", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--replicas 2 from --port 65535" in done.stderr and "--port 65536" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
