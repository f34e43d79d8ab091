"""A replica that hangs (its worker process stopped with SIGSTOP: its port still accepts connections, nothing
answers) is found by the controller's liveness probes, taken out of the gateway's pool and killed, against a real
controller process and real `skyloop serve` workers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest
from deploy_support import Env

from skyloop.deploy.liveness import FAILURES, PROBE_EVERY, PROBE_TIMEOUT

pytestmark = pytest.mark.integration

DETECTION = FAILURES * (PROBE_EVERY + PROBE_TIMEOUT) + 5.0
"""Seconds within which a hung replica must be found (the probes' worst case, and room for a busy machine)."""


class Requests:
    """Threads sending 1-row requests through the gateway, recording when each began and ended, and its status."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.done: list[tuple[float, float, int]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                       "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
        while not self.stopping.is_set():
            begun = time.monotonic()
            request = urllib.request.Request(self.url + "/infer", data=body,
                                             headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    resp.read()
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = 599
            self.done.append((begun, time.monotonic(), status))
            time.sleep(0.02)

    def __enter__(self) -> Requests:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=70)


def replicas(env: Env, name: str) -> list[dict[str, Any]]:
    return list(env.info(name).state["predictors"]["main"]["replicas"])


def release(proc: psutil.Process | None) -> None:
    """Let go of a process the test stopped, unless it is gone already: SIGCONT, then SIGKILL (psutil checks the
    pid was not reused meanwhile)."""
    if proc is not None:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)


def gone(proc: psutil.Process, timeout: float = 10.0) -> bool:
    """Whether `proc` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_hung_replica_is_taken_out_of_the_pool_and_killed_and_requests_go_on(env: Env) -> None:
    name = "hung"
    doc = {"name": name, "predictors": [{"name": "main", "model_uri": "models:/iris/1", "replicas": 2,
                                         "traffic": 100}]}
    info = env.apply(doc)
    stopped: psutil.Process | None = None
    try:
        assert info.status == "Healthy", info.reason
        url = env.url(name)
        before = {r["index"]: r["pid"] for r in replicas(env, name)}
        assert len(set(before.values())) == 2
        with Requests(url) as load:
            try:
                time.sleep(1.0)
                stopped = psutil.Process(before[1])
                stopped.send_signal(signal.SIGSTOP)
                at = time.monotonic()
                # Before, nothing noticed: the replica stayed in the pool, the status Healthy, and its requests waited
                # for the gateway's 300 s client timeout.
                deadline = at + DETECTION
                hung: list[Any] = []
                while not hung and time.monotonic() < deadline:
                    hung = [e for e in env.history(name) if e.kind == "replica_hung"]
                    time.sleep(0.1)
                assert hung, f"no replica_hung event within {DETECTION:g}s: {[e.kind for e in env.history(name)]}"
                found = time.monotonic()
                assert f"replica 1 (pid {stopped.pid})" in hung[0].reason, hung[0].reason
                assert "/v2/health/live" in hung[0].reason, hung[0].reason
                assert hung[0].status == "Degraded", hung[0].status  # the status as the event left it
                assert gone(stopped), "the hung replica's process was not killed"
                info = env.wait(name, lambda i: i.status == "Healthy" and
                                {r["index"]: r["pid"] for r in i.state["predictors"]["main"]["replicas"]}.get(1)
                                not in (None, before[1]), timeout=30, what="Healthy again with a new replica 1")
                assert info.reason == "main: replica 1: hung, killed, and serving again", info.reason
                kinds = [e.kind for e in env.history(name)]
                assert "replica_recovered" in kinds, kinds
                time.sleep(2.0)  # requests sent now go to both replicas again
            finally:  # before the requests' threads are joined: one waiting on it would hold them up
                release(stopped)
        assert load.done, "no request answered"
        # Requests waiting on the hung replica when it was killed are sent again (when younger than the gateway's
        # retry window, as they are unless the machine is slow: else a 503); none waits longer than the probes
        # take to find it, and every one sent after that is answered at once.
        failed = [d for d in load.done if d[2] != 200]
        assert len(failed) <= len(load.threads) and all(s == 503 and begun < found for begun, _, s in failed), failed
        slowest = max(end - begun for begun, end, _ in load.done)
        assert slowest < DETECTION + 5, slowest
        late = [end - begun for begun, end, _ in load.done if begun > found + 1.0]
        assert late and max(late) < 3.0, late
        assert sum(begun > found + 1.0 for begun, _, _ in load.done) > 10
        new = {r["index"]: r["pid"] for r in replicas(env, name)}
        assert new[0] == before[0] and new[1] != before[1], (before, new)
        assert not any(r["draining"] for r in replicas(env, name))
    finally:
        release(stopped)
        env.delete(name)


BUSY = '''
import time

import numpy as np


class Busy:
    """MODEL: spins in Python for `seconds` on every request (a long batch: busy, not hung), then answers 0."""

    def __init__(self, seconds):
        self.seconds = seconds

    def predict(self, X):
        end = time.monotonic() + self.seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return np.zeros(len(X), dtype=np.int64)
'''


def test_a_busy_replica_that_still_answers_its_liveness_probe_is_left_alone(env: Env) -> None:
    name = "busy"
    seconds = FAILURES * (PROBE_EVERY + PROBE_TIMEOUT) + 2.0  # longer than a hung one takes to be found
    (env.folder / "busy.py").write_text(BUSY)
    doc = {"name": name, "predictors": [{"name": "main", "replicas": 1, "traffic": 100, "graph": {
        "name": "model", "type": "MODEL", "implementation": "busy.py:Busy", "parameters": {"seconds": seconds}}}]}
    info = env.apply(doc)
    try:
        assert info.status == "Healthy", info.reason
        pid = replicas(env, name)[0]["pid"]
        body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                       "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
        statuses: list[int] = []

        def ask() -> None:
            request = urllib.request.Request(env.url(name) + "/infer", data=body,
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as resp:
                statuses.append(resp.status)

        # Both predict threads of the replica spin, holding the GIL in turns with its event loop.
        askers = [threading.Thread(target=ask, daemon=True) for _ in range(2)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(seconds + 30)
        assert statuses == [200, 200], statuses
        kinds = [e.kind for e in env.history(name)]
        assert "replica_hung" not in kinds, kinds
        assert replicas(env, name)[0]["pid"] == pid
        assert env.info(name).status == "Healthy"
    finally:
        env.delete(name)
