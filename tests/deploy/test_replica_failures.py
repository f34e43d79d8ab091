"""Failures around a deployment's replicas and gateway, against a real controller process on 127.0.0.1:
a gateway port held by another process when the deployment first starts, and a request that kills its replica."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest
from deploy_support import Env

from skyloop.errors import BackendError

pytestmark = pytest.mark.integration


def predict(url: str, rows: list[list[float]]) -> list[int]:
    body = {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                        "data": [v for row in rows for v in row]}]}
    request = urllib.request.Request(url + "/infer", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return [int(v) for v in json.load(resp)["outputs"][0]["data"]]


def test_a_gateway_port_held_at_first_start_fails_the_apply_and_the_gateway_listens_once_it_is_free(
        env: Env) -> None:
    name = "portheld"
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    doc: dict[str, Any] = {"name": name, "gateway": {"port": port},
                           "predictors": [{"name": "main", "model_uri": "models:/iris/1", "traffic": 100}]}
    try:
        # Before, the apply said Healthy (exit 0) with no gateway, and none ever listened on the port.
        with pytest.raises(BackendError, match=rf"cannot listen on 127\.0\.0\.1:{port}"):
            env.apply(doc, timeout=60)
        info = env.info(name)
        assert info.status == "Degraded" and "the gateway cannot start" in info.reason, info.reason
        assert not info.state.get("gateway")
    finally:
        holder.close()
    info = env.wait(name, lambda i: i.status == "Healthy" and bool(i.state.get("gateway")), timeout=60,
                    what="the gateway listening once its port is free")
    assert info.state["gateway"] == f"http://127.0.0.1:{port}" and info.state["gateway_port"] == port
    labels = predict(env.url(name), env.X[:10].tolist())
    assert len(labels) == 10 and set(labels) <= {0, 1, 2}
    kinds = [e.kind for e in env.history(name)]
    assert kinds.count("failed") == 1, kinds  # one event for the held port, not one a try
    assert "gateway_started" in kinds
    env.delete(name)


DEADLY = '''
import os

import numpy as np


class Deadly:
    """MODEL: answers 0, and kills its process on a first value of 666 (a query of death)."""

    def predict(self, X):
        if float(np.asarray(X)[0][0]) == 666:
            os._exit(2)
        return np.zeros(len(X), dtype=np.int64)
'''


def test_a_request_that_kills_its_replica_is_sent_again_once_not_to_every_replica(env: Env) -> None:
    name = "deadly"
    (env.folder / "deadly.py").write_text(DEADLY)
    doc = {"name": name, "predictors": [{"name": "main", "replicas": 3, "traffic": 100, "graph": {
        "name": "model", "type": "MODEL", "implementation": "deadly.py:Deadly"}}]}
    info = env.apply(doc)
    try:
        assert info.status == "Healthy", info.reason
        pids = [r["pid"] for r in info.state["predictors"]["main"]["replicas"]]
        assert len(set(pids)) == 3
        url = env.url(name)
        assert predict(url, [[1.0, 2.0]]) == [0]
        with pytest.raises(urllib.error.HTTPError) as caught:
            predict(url, [[666.0, 2.0]])
        error = json.loads(caught.value.read())["error"]
        assert caught.value.code == 502 and "died while handling the request" in error, error
        time.sleep(1.0)
        # Before, the request was sent to each replica in turn for 5 s, and every one of them died.
        alive = [p for p in pids if psutil.pid_exists(p)]
        assert len(alive) == 1, (pids, alive)
        env.wait(name, lambda i: i.status == "Healthy", timeout=60, what="serving again")
        assert predict(url, [[1.0, 2.0]]) == [0]
    finally:
        env.delete(name)
