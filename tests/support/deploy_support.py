"""Helpers for deployment tests (importable as `deploy_support`): the environment the `env` fixture builds,
and a load generator (asyncio + aiohttp in a thread) that records every answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import yaml

from skyloop.config import Settings
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace

NODES = '''
import random
import time

import numpy as np


class Sleep:
    """TRANSFORMER: waits `delay` seconds, then passes the features on."""

    def __init__(self, delay=0.05):
        self.delay = delay

    def transform_input(self, X):
        time.sleep(self.delay)
        return X


class Flaky:
    """TRANSFORMER: fails a share `rate` of requests."""

    def __init__(self, rate=0.3):
        self.rate = rate

    def transform_input(self, X):
        if random.random() < self.rate:
            raise RuntimeError("flaky transformer failed")
        return X


class Constant:
    """MODEL: answers one class for every row (a bad classifier)."""

    def __init__(self, label=0):
        self.label = label

    def predict(self, X):
        return np.full(len(X), self.label, dtype=np.int64)


class Slow(Constant):
    """MODEL: Constant, which takes `seconds` to load."""

    def __init__(self, seconds, label=0):
        time.sleep(seconds)
        super().__init__(label)


class Fragile(Constant):
    """MODEL: Constant, which fails to load while the file `marker` exists (its weights went bad)."""

    def __init__(self, marker, label=0):
        import os

        if os.path.exists(marker):
            raise RuntimeError("the weights file is corrupt")
        super().__init__(label)
'''


@dataclass
class Env:
    """The module's deployment environment."""

    settings: Settings
    folder: Path
    X: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]

    def spec(self, doc: dict[str, Any]) -> Path:
        path = self.folder / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def apply(self, doc: dict[str, Any], timeout: float = 120.0) -> store.DeploymentInfo:
        from skyloop.deploy.api import apply_deployment

        return apply_deployment(self.spec(doc), self.settings, timeout=timeout, start=False)

    def info(self, name: str) -> store.DeploymentInfo:
        workspace = Workspace.open(self.settings)
        try:
            with workspace.db.read() as session:
                return store.get_deployment(session, name)
        finally:
            workspace.close()

    def history(self, name: str) -> list[store.DeploymentEvent]:
        workspace = Workspace.open(self.settings)
        try:
            with workspace.db.read() as session:
                return store.deployment_history(session, name)
        finally:
            workspace.close()

    def wait(self, name: str, check: Callable[[store.DeploymentInfo], bool], timeout: float = 60.0,
             what: str = "condition") -> store.DeploymentInfo:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(name)
            if check(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: {what} not reached in {timeout}s: {info.status} {info.reason}")
            time.sleep(0.1)

    def delete(self, name: str) -> None:
        from skyloop.deploy.api import delete_deployment

        delete_deployment(self.settings, name)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`skyloop ARGS` against this home, as a real process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
        env.update(COLUMNS="200", NO_COLOR="1")
        return subprocess.run([sys.executable, "-m", "skyloop", "--home", str(self.settings.home), *args],
                              capture_output=True, text=True, env=env, cwd=self.folder, timeout=120)

    def url(self, name: str) -> str:
        return f"{self.info(name).state['gateway']}/v2/models/{name}"


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(proc.pid).children(recursive=True)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def stop_pid(pid: int) -> None:
    """Kill the process `pid` (one this test did not start as a child, e.g. a detached controller) and its tree."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        for child in [*process.children(recursive=True), process]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


@dataclass
class Answer:
    """One request's outcome."""

    status: int
    predictor: str
    version: str
    at: float
    label: Any = None
    row: int = -1


@dataclass
class Load:
    """Clients sending 1-row V2 requests (and feedback, when asked) until stopped or `total` is reached."""

    url: str
    X: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    clients: int = 8
    total: int | None = None
    feedback: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    feedbacks: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def wait(self, timeout: float = 120.0) -> None:
        """Until `total` requests are answered."""
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"load not finished in {timeout}s ({len(self.answers)} answers)"

    @property
    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def share(self, predictor: str, answers: list[Answer] | None = None) -> float:
        answers = self.answers if answers is None else answers
        return sum(a.predictor == predictor for a in answers) / max(len(answers), 1)

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    def _more(self) -> bool:
        return not self._stop.is_set() and (self.total is None or len(self.answers) < self.total)

    async def _client(self, session: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        while self._more():
            i = rng.randrange(len(self.X))
            body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                "data": [float(v) for v in self.X[i]]}]}
            try:
                async with session.post(self.url + "/infer", json=body, headers=self.headers) as resp:
                    doc = await resp.json(content_type=None)
                    status = resp.status
                    predictor = resp.headers.get("skyloop-predictor", "")
                    version = resp.headers.get("skyloop-model-version", "")
            except (TimeoutError, aiohttp.ClientError):
                status, predictor, version, doc = 599, "", "", {}
            label = doc["outputs"][0]["data"][0] if status == 200 else None
            self.answers.append(Answer(status, predictor, version, time.monotonic(), label, i))
            if self.feedback and status == 200:
                async with session.post(self.url + "/feedback", json={"id": doc["id"], "truth": int(self.y[i])}) as r:
                    if r.status == 200:
                        self.feedbacks += 1


@contextlib.contextmanager
def controller(env: Env) -> Iterator[subprocess.Popen[bytes]]:
    """One `skyloop deploy controller` process for the block, stopped (with its replicas) by PID after it."""
    argv = [sys.executable, "-m", "skyloop", "--home", str(env.settings.home), "deploy", "controller"]
    with open(env.folder.parent / "controller.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_tree(proc)


@contextlib.contextmanager
def in_process_controller(root: Path) -> Iterator[tuple[Env, Any]]:
    """A home under `root` with `iris/1` (the fitted classifier given back too), a `specs` folder, and a controller
    running in this process on a thread (Ray deployments: the driver is this process), stopped on exit."""
    import uvloop
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from skyloop.deploy.controller import Controller
    from skyloop.registry import log_model

    settings = Settings.for_home(root / "home")
    X, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500).fit(X, y)
    log_model(clf, "iris", input_example=X[:5], settings=settings)
    (root / "specs").mkdir()
    controller = Controller(settings)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(controller.run(),), daemon=True)
    thread.start()
    try:
        yield Env(settings, root / "specs", X, y), clf
    finally:
        loop.call_soon_threadsafe(controller.stopping.set)
        thread.join(60)
        with contextlib.suppress(Exception):
            loop.close()
