"""`skyloop serve --replicas N`: one worker per port, replaced on the same socket when it dies."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skyloop.config import Settings

pytestmark = pytest.mark.integration

# A stand-in for the deployment controller: starts `skyloop serve` (sharing its stdout), then waits to be killed.
_INTERMEDIATE = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)"


def _infer(port: int, X: np.ndarray[Any, Any], timeout: float = 10) -> list[int]:
    body = orjson.dumps({"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64",
                                     "data": X.reshape(-1).tolist()}]})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return list(orjson.loads(response.read())["outputs"][0]["data"])


def _state(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(path.read_bytes())
    return doc


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` is true; fails after `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def _read_ports(stdout: Any, count: int) -> list[int]:
    lines: list[str] = []

    def read() -> None:
        while len(lines) < count and (line := stdout.readline()):
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    ports = [re.fullmatch(r"replica (\d+) serving iris on http://127\.0\.0\.1:(\d+)/v2\n", line) for line in lines]
    assert len(ports) == count and all(ports), lines
    assert [int(m.group(1)) for m in ports if m] == list(range(count))
    return [int(m.group(2)) for m in ports if m]


def _ready(port: int) -> bool:
    with contextlib.suppress(OSError), \
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
        return bool(response.status == 200)
    return False


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


@contextlib.contextmanager
def _replicas(settings: Settings, uri: str, state_file: Path, count: int = 2,
              via_intermediate: bool = False) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """`skyloop serve URI --replicas COUNT` (directly or from an intermediate process); everything it started
    is stopped by PID afterwards."""
    cmd = [sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", uri, "--host", "127.0.0.1",
           "--port", "0", "--replicas", str(count), "--state-file", str(state_file)]
    if via_intermediate:
        cmd = [sys.executable, "-c", _INTERMEDIATE, *cmd, "--exit-with-parent"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started: set[int] = {proc.pid}
    try:
        assert proc.stdout is not None
        ports = _read_ports(proc.stdout, count)
        state = _state(state_file)
        started |= {state["pid"], *(r["pid"] for r in state["replicas"])}
        _wait_for(lambda: all(_ready(p) for p in ports), 30, "replicas ready")
        yield proc, ports
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError):
            state = _state(state_file)
            started |= {state["pid"], *(r["pid"] for r in state["replicas"])}
        with contextlib.suppress(psutil.NoSuchProcess):
            started |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        _kill_all(started - {proc.pid})


def test_each_replica_answers_on_its_own_port(settings: Settings, iris_uri: str, iris: tuple[Any, Any],
                                              tmp_path: Path) -> None:
    clf, X = iris
    state_file = tmp_path / "replicas.json"
    with _replicas(settings, iris_uri, state_file) as (proc, ports):
        assert len(set(ports)) == 2
        expected = clf.predict(X[::10]).tolist()
        assert _infer(ports[0], X[::10]) == _infer(ports[1], X[::10]) == expected
        assert _infer(ports[0], X[:1]) == clf.predict(X[:1]).tolist()
        state = _state(state_file)
        assert state["pid"] == proc.pid
        assert [(r["index"], r["port"], r["restarts"]) for r in state["replicas"]] == [(0, ports[0], 0),
                                                                                        (1, ports[1], 0)]
        assert {r["pid"] for r in state["replicas"]} == {c.pid for c in psutil.Process(proc.pid).children()}
        assert all(abs(r["started_at"] - time.time()) < 120 for r in state["replicas"])
        # Each replica's /metrics counts its own requests (the router sees every replica separately).
        for port, count in zip(ports, (2, 1), strict=True):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            key = ("skyloop_inference_requests_total", (("model", "iris"), ("status", "200"), ("version", "1")))
            assert samples[key] == count


def test_a_killed_replica_is_replaced_on_its_socket(settings: Settings, iris_uri: str, iris: tuple[Any, Any],
                                                    tmp_path: Path) -> None:
    clf, X = iris
    expected = clf.predict(X[:1]).tolist()
    state_file = tmp_path / "replicas.json"
    with _replicas(settings, iris_uri, state_file) as (_, ports):
        victim = _state(state_file)["replicas"][0]
        done = threading.Event()
        answers: list[bool] = []
        failures: list[BaseException] = []

        def steady() -> None:  # a steady stream to the other replica, which must never notice
            while not done.is_set():
                try:
                    answers.append(_infer(ports[1], X[:1]) == expected)
                except Exception as exc:
                    failures.append(exc)

        stream = threading.Thread(target=steady, daemon=True)
        stream.start()
        try:
            time.sleep(0.2)
            os.kill(victim["pid"], signal.SIGKILL)
            _wait_for(lambda: _gone(victim["pid"]), 2, "the killed replica to exit")
            sent = time.monotonic()
            assert _infer(ports[0], X[:1], timeout=2) == expected  # queued in the backlog, or served by the new one
            assert time.monotonic() - sent < 2

            def replaced() -> bool:
                with contextlib.suppress(ValueError):  # never half-written, but be safe while polling
                    replica = _state(state_file)["replicas"][0]
                    return bool(replica["pid"] != victim["pid"] and replica["restarts"] == 1)
                return False

            _wait_for(replaced, 2, "the state file to show the replacement")
            replica = _state(state_file)["replicas"][0]
            assert replica["port"] == ports[0] and not _gone(replica["pid"])
            assert _state(state_file)["replicas"][1]["restarts"] == 0
            time.sleep(0.2)
        finally:
            done.set()
            stream.join(15)
        assert not failures, failures[:3]
        assert len(answers) > 10 and all(answers)
        assert all(_infer(ports[0], X[:1]) == expected for _ in range(5))


def test_connections_wait_in_the_backlog_while_a_replica_is_down(settings: Settings, iris_uri: str,
                                                                 iris: tuple[Any, Any], tmp_path: Path) -> None:
    clf, X = iris
    state_file = tmp_path / "replicas.json"
    with _replicas(settings, iris_uri, state_file, count=1) as (proc, ports):
        victim = _state(state_file)["replicas"][0]["pid"]
        answers: list[list[int]] = []
        os.kill(proc.pid, signal.SIGSTOP)  # hold the replacement back, to be sure the request finds no worker
        try:
            os.kill(victim, signal.SIGKILL)
            _wait_for(lambda: _gone(victim), 2, "the killed replica to exit")
            request = threading.Thread(target=lambda: answers.append(_infer(ports[0], X[:3], timeout=10)),
                                       daemon=True)
            request.start()
            time.sleep(0.3)
            assert request.is_alive() and not answers  # neither refused nor answered: waiting in the backlog
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        request.join(2)
        assert answers == [clf.predict(X[:3]).tolist()]
        assert _state(state_file)["replicas"][0]["restarts"] == 1


def test_sigterm_stops_every_replica_and_removes_the_state_file(settings: Settings, iris_uri: str,
                                                                tmp_path: Path) -> None:
    state_file = tmp_path / "replicas.json"
    with _replicas(settings, iris_uri, state_file) as (proc, _):
        pids = [proc.pid, *(r["pid"] for r in _state(state_file)["replicas"])]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        _wait_for(lambda: all(_gone(pid) for pid in pids), 5, "every replica to exit")
        assert not state_file.exists()
        assert not list(tmp_path.glob(".replicas.json.*"))  # no temporary file left behind either


def test_replicas_exit_with_their_parent(settings: Settings, iris_uri: str, tmp_path: Path) -> None:
    state_file = tmp_path / "replicas.json"
    with _replicas(settings, iris_uri, state_file, via_intermediate=True) as (intermediate, _):
        state = _state(state_file)
        pids = [state["pid"], *(r["pid"] for r in state["replicas"])]
        assert state["pid"] != intermediate.pid
        intermediate.kill()
        intermediate.wait(timeout=5)
        _wait_for(lambda: all(_gone(pid) for pid in pids), 5, "serve and its replicas to exit")
        assert not state_file.exists()


def test_replicas_and_workers_do_not_mix(settings: Settings) -> None:
    done = subprocess.run([sys.executable, "-m", "skyloop", "--home", str(settings.home), "serve", "models:/iris@x",
                           "--replicas", "2", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "replicas each run one worker" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
