"""Feedback on a real `skyloop serve`: each answer takes one truth and one reward, held by the DB across
worker processes and restarts, and never counted twice; feedback must name an answer the server gave."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests_support import at_once, post

from skyloop.config import Settings
from skyloop.serving.answered import AnsweredIds
from skyloop.store.feedback import Feedback, list_feedback
from skyloop.store.workspace import Workspace

pytestmark = pytest.mark.integration


def _post(port: int, path: str, doc: Any) -> tuple[int, Any]:
    return post(f"http://127.0.0.1:{port}{path}", orjson.dumps(doc))


def _answer(port: int, X: np.ndarray[Any, Any]) -> str:
    status, doc = _post(port, "/v2/models/iris/infer", {"inputs": [
        {"name": "input-0", "shape": list(X.shape), "datatype": "FP64", "data": X.reshape(-1).tolist()}]})
    assert status == 200, doc
    return str(doc["id"])


def _feedback_counted(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["kind"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "skyloop_feedback_total" and s.labels.get("model") == "iris"}


def test_each_answer_takes_one_truth_and_one_reward(serve: Any, settings: Settings, iris_uri: str,
                                                    iris: tuple[Any, Any]) -> None:
    _, X = iris
    feedback = "/v2/models/iris/feedback"
    with serve(settings, iris_uri, workers=2) as (_, port):
        first = _answer(port, X[:1])
        assert _post(port, feedback, {"id": first, "truth": 0})[0] == 200
        for repeat in ({"id": first, "truth": 0}, {"id": first, "truth": 2}, {"id": first, "truth": 1, "reward": 1}):
            status, doc = _post(port, feedback, repeat)
            assert (status, doc) == (409, {"error": f"feedback for inference id {first!r} was already recorded; "
                                                    "each answer takes one truth"}), repeat
        # A reward is a separate signal (a click now, a label later): it may come once, apart from the truth.
        assert _post(port, feedback, {"id": first, "reward": 1.0})[0] == 200
        status, doc = _post(port, feedback, {"id": first, "reward": 0.0})
        assert (status, doc) == (409, {"error": f"feedback for inference id {first!r} was already recorded; "
                                                "each answer takes one reward"})

        # Posted at the same moment, to either worker process: one is taken, the others are refused.
        second = _answer(port, X[60:61])
        statuses = at_once(8, lambda _: _post(port, feedback, {"id": second, "truth": 1})[0])
        assert sorted(statuses) == [200] + [409] * 7
        assert _feedback_counted(port) == {"truth": 2.0, "reward": 1.0}  # summed over the workers

    # The DB holds the rule across a restart (the answers themselves are forgotten).
    with serve(settings, iris_uri) as (_, port):
        status, doc = _post(port, feedback, {"id": second, "truth": 2})
        assert status == 409 and "each answer takes one truth" in doc["error"]
        assert _post(port, feedback, {"id": second, "reward": 0.5})[0] == 200
    assert _stored(settings, "iris") == {(first, 0, 1.0), (second, 1, 0.5)}


def test_a_truth_gives_one_value_per_row_of_the_answer(serve: Any, settings: Settings, iris_uri: str,
                                                       iris: tuple[Any, Any]) -> None:
    _, X = iris
    feedback = "/v2/models/iris/feedback"
    with serve(settings, iris_uri) as (_, port):
        two, one = _answer(port, X[:2]), _answer(port, X[:1])
        for truth, got in ((0, "a single value"), ([0, 0, 0], "a list of 3"), ([[0, 0]], "a list of 1")):
            assert _post(port, feedback, {"id": two, "truth": truth}) == (400, {
                "error": f"answer {two!r} has 2 rows, so 'truth' must be a list of 2 values, one per row like the "
                         f"output; got {got}"})
        assert _post(port, feedback, {"id": one, "truth": [0, 1]}) == (400, {
            "error": f"answer {one!r} has 1 row, so 'truth' must be a list of 1 value, one per row like the "
                     "output; got a list of 2"})
        assert _post(port, feedback, {"id": two, "truth": [0, 1]})[0] == 200
        assert _post(port, feedback, {"id": one, "truth": 0})[0] == 200  # one row: the bare value
    assert {row.inference_id: row.truth for row in _feedback(settings, "iris")} == {two: [0, 1], one: 0}


def test_the_rows_check_holds_in_whichever_worker_takes_the_feedback(serve: Any, settings: Settings,
                                                                      iris_uri: str, iris: tuple[Any, Any]) -> None:
    # Feedback reaching another worker than the one that answered was checked against nothing: the same bare
    # truth for a 2-row answer was refused or stored depending on the worker.
    _, X = iris
    with serve(settings, iris_uri, workers=2) as (_, port):
        answers = [_answer(port, X[:2]) for _ in range(12)]
        for answer in answers:
            status, doc = _post(port, "/v2/models/iris/feedback", {"id": answer, "truth": 0})
            assert status == 400 and "has 2 rows" in doc["error"], (status, doc)
        assert all(_post(port, "/v2/models/iris/feedback", {"id": a, "truth": [0, 0]})[0] == 200 for a in answers)


def test_the_shared_table_keeps_each_answers_rows() -> None:
    table = AnsweredIds(parts=2)
    table.add("iris", "a", rows=3)
    table.use_part(1)
    table.add("iris", "b", rows=70_000)
    table.add("iris", "c")
    assert (table.rows("iris", "a"), table.rows("iris", "b"), table.rows("iris", "c")) == (3, 70_000, 0)
    assert table.rows("iris", "d") is None and table.rows("wine", "a") is None


def _feedback(settings: Settings, model: str) -> list[Feedback]:
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            return list_feedback(session, model)
    finally:
        workspace.close()


def _stored(settings: Settings, model: str) -> set[tuple[str, Any, Any]]:
    return {(row.inference_id, row.truth, row.reward) for row in _feedback(settings, model)}


def _replace_workers(proc: Any) -> None:
    """SIGKILL every worker of the server at `proc`, and wait until as many new ones serve."""
    old = psutil.Process(proc.pid).children()
    for worker in old:
        os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = {c.pid for c in psutil.Process(proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE}
        if len(now) == len(old) and not now & {w.pid for w in old}:
            return
        assert time.monotonic() < deadline, now
        time.sleep(0.05)


def test_feedback_must_name_an_answer_of_this_server(serve: Any, settings: Settings, iris_uri: str,
                                                     iris: tuple[Any, Any], nodes_dir: Path) -> None:
    _, X = iris
    constant = nodes_dir / "constant.yaml"
    constant.write_text(yaml.safe_dump({"name": "constant", "graph": {
        "name": "const", "type": "MODEL", "implementation": "nodes.py:Constant"}}))
    with serve(settings, iris_uri, str(constant), workers=2) as (proc, port):
        status, doc = _post(port, "/v2/models/iris/feedback", {"id": "made-up", "truth": 1})
        assert status == 404
        assert doc["error"] == ("no inference with id 'made-up' was answered by model 'iris' on this server; feedback "
                                "must name the id of an inference response (each worker process remembers its last "
                                "20,000 answers or more, and for good those that took feedback before)")
        # An answer of one model is not one of another model's.
        answered = _answer(port, X[:1])
        status, doc = _post(port, "/v2/models/constant/feedback", {"id": answered, "truth": 1})
        assert status == 404 and f"id {answered!r} was answered by model 'constant'" in doc["error"]

        # Whichever worker answered, any worker takes its feedback, even once every worker was replaced
        # (the answers are no longer in any live process's own memory).
        ids = [_answer(port, X[i:i + 1]) for i in range(20)]
        _replace_workers(proc)
        for i, inference_id in enumerate(ids[:10]):
            assert _post(port, "/v2/models/iris/feedback", {"id": inference_id, "truth": i % 3})[0] == 200
        assert _feedback_counted(port) == {"truth": 10.0}  # the refused ones were not counted
        late = ids[10]

    # After a restart the answers are forgotten: feedback is taken only for one that took feedback before.
    with serve(settings, iris_uri) as (_, port):
        assert _post(port, "/v2/models/iris/feedback", {"id": ids[0], "reward": 1.0})[0] == 200
        status, doc = _post(port, "/v2/models/iris/feedback", {"id": late, "truth": 1})
        assert status == 404 and f"no inference with id {late!r} was answered by model 'iris'" in doc["error"]
    assert _stored(settings, "iris") == {(i, n % 3, 1.0 if n == 0 else None) for n, i in enumerate(ids[:10])}
    assert _stored(settings, "constant") == set()


LEARNING_NODES = '''
import os
import re
import socket

import numpy as np


class Learner:
    """ROUTER that learns: notes each reward it hears, with its process."""

    def __init__(self, log):
        self.log = log

    def route(self, X):
        return 0

    def send_feedback(self, features, reward, truth, routing):
        with open(self.log, "a") as out:
            out.write(f"{os.getpid()} {reward} {routing}\\n")


class Pid:
    """MODEL: answers the pid of the worker process that ran it."""

    def predict(self, X):
        return np.full(len(X), os.getpid(), dtype=np.int64)
'''


def _learning_graph(folder: Path) -> tuple[Path, Path]:
    """(the spec of a learning router over a model that answers its worker's pid, the file the router notes in)."""
    (folder / "learning.py").write_text(LEARNING_NODES)
    heard, spec = folder / "heard.txt", folder / "learning.yaml"
    spec.write_text(yaml.safe_dump({"name": "learning", "graph": {
        "name": "learner", "type": "ROUTER", "implementation": "learning.py:Learner",
        "parameters": {"log": str(heard)},
        "children": [{"name": "pid", "type": "MODEL", "implementation": "learning.py:Pid"}]}}))
    return spec, heard


def test_feedback_reaches_the_nodes_of_the_worker_that_answered(serve: Any, settings: Settings,
                                                                tmp_path: Path) -> None:
    # With several workers, feedback that reached another worker than the one that answered was stored but told
    # no node: a learning router heard the rewards for about half of its answers with 2 workers.
    spec, heard = _learning_graph(tmp_path)

    def answer(_: int) -> tuple[str, int]:
        status, doc = _post(port, "/v2/models/learning/infer", {"inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]})
        assert status == 200, doc
        return str(doc["id"]), int(doc["outputs"][0]["data"][0])

    with serve(settings, str(spec), workers=2) as (proc, port):
        answers = [pair for _ in range(6) for pair in at_once(8, answer)]
        workers = {c.pid for c in psutil.Process(proc.pid).children()}
        assert {pid for _, pid in answers} == workers, "both workers must answer for this test to mean anything"
        rewards = {inference_id: float(i) for i, (inference_id, _) in enumerate(answers)}
        replies = at_once(len(answers), lambda i: _post(port, "/v2/models/learning/feedback",
                                                         {"id": answers[i][0], "reward": rewards[answers[i][0]]}))
        assert all(status == 200 and doc["nodes_told"] == 1 and doc["nodes_failed"] == {}
                   for status, doc in replies), [doc for status, doc in replies if doc.get("nodes_told") != 1]
    lines = [line.split() for line in heard.read_text().splitlines()]
    # Every reward reached the router of the worker that gave that answer, once, with the route it chose.
    assert sorted((int(pid), float(reward), int(route)) for pid, reward, route in lines) == \
        sorted((pid, rewards[inference_id], 0) for inference_id, pid in answers)


def _raw_request(path: str, doc: Any) -> bytes:
    body = orjson.dumps(doc)
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _raw_response(sock: socket.socket) -> tuple[int, Any]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"content-length: *(\d+)", data.partition(b"\r\n\r\n")[0], re.I).group(1)):  # type: ignore[union-attr]
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection with no answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


def test_feedback_taken_while_the_server_stops_is_answered_at_once(serve: Any, settings: Settings,
                                                                   tmp_path: Path) -> None:
    # Worker A holds a request for feedback on worker B's answer as the server stops; B drains and exits first.
    # The parent kept listening on B's relay socket: A waited for an answer that never came until it was killed,
    # and its client got none. Now B's socket refuses A at once, and A answers (the feedback is stored).
    spec, _ = _learning_graph(tmp_path)
    infer = _raw_request("/v2/models/learning/infer", {"inputs": [
        {"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]})
    with serve(settings, str(spec), workers=2) as (proc, port):
        connections: dict[int, tuple[socket.socket, str]] = {}
        for _ in range(200):  # a kept-alive connection on each worker, with an answer of that worker
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(infer)
            status, doc = _raw_response(sock)
            assert status == 200, doc
            pid = int(doc["outputs"][0]["data"][0])
            if pid in connections:
                sock.close()
            else:
                connections[pid] = (sock, str(doc["id"]))
            if len(connections) == 2:
                break
        (a, _), (b, answered_by_b) = connections.values()
        b.close()
        feedback = _raw_request("/v2/models/learning/feedback", {"id": answered_by_b, "reward": 1.0})
        a.sendall(feedback[:-3])  # A is handling a request as the stop begins
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # B, idle, has drained and exited
        a.sendall(feedback[-3:])
        status, doc = _raw_response(a)
        a.close()
        assert status == 200 and doc["stored"] and doc["nodes_told"] == 0, doc
        assert "could not be reached" in next(iter(doc["nodes_failed"].values())), doc
        assert proc.wait(timeout=30) == 0
