"""A predictor's replicas on this machine: one `skyloop serve --replicas N` process per predictor version.

That process loads the graph once and forks one uvicorn worker per replica, each on its own port; it
keeps every listening socket open and replaces a dead worker on the same socket within a fraction of a
second, so a killed replica costs only the requests it had in flight (the gateway sends those again).
The controller starts a host per predictor version, reads its state file (ports and pids), waits until
every replica answers `/v2/health/ready`, and restarts the whole host if it dies. Registered models are
pinned to their version when the host starts, so an alias that moves later does not change what a
running replica serves, or what it loads again after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import yaml

from skyloop.config import Settings
from skyloop.deploy.pools import Endpoint, served_version
from skyloop.deploy.spec import PredictorSpec
from skyloop.errors import ModelLoadError
from skyloop.serving.spec import GraphNode

__all__ = ["ReplicaHost", "absolute_ref", "pin_graph"]

_START_TIMEOUT = 180.0
_STOP_GRACE = 15.0


def absolute_ref(ref: str, base: Path | None) -> str:
    """`file.py:Name` with a relative file made absolute against `base` (other references unchanged)."""
    module, sep, qualname = ref.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_absolute() and base is not None:
        return f"{(base / module).resolve()}:{qualname}"
    return ref


def pin_graph(node: GraphNode, base: Path | None, resolve: Any) -> tuple[GraphNode, list[str]]:
    """A copy of `node` with every `models:/` URI pinned to a version (by `resolve(uri) -> name/version`) and
    every relative file made absolute; returns it and the pinned `name/version`s."""
    pinned: list[str] = []

    def walk(n: GraphNode) -> GraphNode:
        update: dict[str, Any] = {"children": [walk(c) for c in n.children]}
        if n.model_uri and n.model_uri.startswith("models:/"):
            version = resolve(n.model_uri)
            pinned.append(version)
            update["model_uri"] = f"models:/{version}"
        elif n.model_uri and base is not None and not Path(n.model_uri).is_absolute():
            update["model_uri"] = str((base / n.model_uri).resolve())
        if n.implementation:
            update["implementation"] = absolute_ref(n.implementation, base)
        return n.model_copy(update=update)

    return walk(node), pinned


class ReplicaHost:
    """The process serving one predictor version's replicas."""

    def __init__(self, deployment: str, predictor: PredictorSpec, graph: GraphNode, version: str, folder: Path,
                 settings: Settings, generation: int) -> None:
        self.deployment = deployment
        self.predictor = predictor
        self.graph = graph
        self.version = version
        self.settings = settings
        self.generation = generation
        self.folder = folder
        stem = f"{predictor.name}-{generation}"
        self.spec_file = folder / f"{stem}.yaml"
        self.state_file = folder / f"{stem}.state.json"
        self.log_file = folder / f"{stem}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: list[Endpoint] = []
        self.notes: list[tuple[str, str]] = []
        """Events (kind, reason) the host has to tell, taken by the runner (a Ray replica that died, say)."""

    def serve_doc(self) -> dict[str, Any]:
        """The serving spec each replica serves: the pinned graph under the deployment's name, reporting the
        version in a form a V2 path can carry (`served_version`)."""
        return {"name": self.deployment, "version": served_version(self.version),
                "graph": self.graph.model_dump(mode="json"),
                "batching": self.predictor.batching.model_dump(mode="json")}

    def _write_spec(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spec_file.write_text(yaml.safe_dump(self.serve_doc(), sort_keys=False))

    async def start(self, timeout: float = _START_TIMEOUT) -> list[Endpoint]:
        """Start the host and wait until every replica is ready; ModelLoadError with its log if it cannot."""
        self._write_spec()
        self.state_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "skyloop", "--home", str(self.settings.home), "serve", str(self.spec_file),
                "--replicas", str(self.predictor.replicas), "--port", "0", "--state-file", str(self.state_file),
                "--exit-with-parent", "--parent-pid", str(os.getpid()), "--threads", "2"]
        env = {**os.environ, "SKYLOOP_DB_URL": self.settings.resolved_db_url,
               "SKYLOOP_ARTIFACTS_URL": self.settings.resolved_artifacts_url}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env)
        try:
            replicas = await self._wait_ready(timeout)
        except asyncio.CancelledError:  # the controller is stopping: a host nobody will hold must not stay
            await asyncio.shield(self.stop())
            raise
        self.endpoints = [Endpoint(self.predictor.name, r["index"], r["port"]) for r in replicas]
        return self.endpoints

    async def _wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ModelLoadError(f"predictor {self.predictor.name!r} failed to start: {self._tail()}")
                if time.monotonic() > deadline:
                    await self.stop()
                    raise ModelLoadError(f"predictor {self.predictor.name!r} was not ready after {timeout:g}s: "
                                         f"{self._tail()}")
                replicas = self.replicas()
                if len(replicas) == self.predictor.replicas and await self._all_ready(client, replicas):
                    return replicas
                await asyncio.sleep(0.1)

    @staticmethod
    async def _all_ready(client: aiohttp.ClientSession, replicas: list[dict[str, Any]]) -> bool:
        for replica in replicas:
            try:
                async with client.get(f"http://127.0.0.1:{replica['port']}/v2/health/ready") as resp:
                    if resp.status != 200:
                        return False
            except (TimeoutError, aiohttp.ClientError):
                return False
        return True

    def _tail(self, lines: int = 8) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        # The replica's own `error: ...` line, without its label: the message it goes into is an error already.
        return " | ".join(line.removeprefix("error: ") for line in text[-lines:]) or "(empty log)"

    def replicas(self) -> list[dict[str, Any]]:
        """The host's state file: one entry per replica (index, port, pid, restarts, started_at)."""
        try:
            doc = orjson.loads(self.state_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return []
        replicas: list[dict[str, Any]] = doc.get("replicas", [])
        return replicas

    @property
    def alive(self) -> bool:
        """Whether the host process is running."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def trouble(self) -> str:
        """Why some of its replicas are down now, as the host knows it ("": none, or it does not know)."""
        return ""

    @property
    def pending(self) -> int:
        """Replicas that do not serve yet because they wait for room (on a Ray cluster; none here)."""
        return 0

    def exit_description(self) -> str:
        """Why the host is gone (for the event that restarts it)."""
        code = self.proc.returncode if self.proc is not None else None
        return f"replica host exited with code {code}; last log lines: {self._tail(3)}"

    async def refresh(self) -> bool:
        """Whether the endpoints changed since the last call (never here: a replaced replica keeps its port)."""
        return False

    def describe(self) -> dict[str, Any]:
        """For status: pid, version, and each replica with the gateway's in-flight count."""
        inflight = {e.index: e for e in self.endpoints}
        return {"pid": self.proc.pid if self.proc else None, "version": self.version, "generation": self.generation,
                "alive": self.alive, "log": str(self.log_file),
                "replicas": [{**r, "inflight": inflight[r["index"]].inflight if r["index"] in inflight else 0,
                              "draining": inflight[r["index"]].draining if r["index"] in inflight else False}
                             for r in self.replicas()]}

    async def kill_replica(self, index: int) -> int | None:
        """SIGKILL replica `index`'s worker (a hung one: see `liveness`), which the host process replaces on the same
        port; returns its pid (None: no such worker of this host)."""
        pid = next((int(r["pid"]) for r in self.replicas() if r["index"] == index and r.get("pid")), None)
        if pid is None or self.proc is None:
            return None
        if pid == self.proc.pid:  # one replica, served by the host process itself: the host dies and is restarted
            self.proc.kill()
            return pid
        with contextlib.suppress(psutil.Error):  # the pid is still our host's worker: not one reused since
            worker = psutil.Process(pid)
            if worker.ppid() == self.proc.pid:
                worker.send_signal(signal.SIGKILL)
                return pid
        return None

    async def stop(self) -> None:
        """SIGTERM (replicas finish their in-flight requests), then SIGKILL after a grace period."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, _STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
