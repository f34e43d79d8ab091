"""A predictor's replicas as Ray actors (`backend: ray`): a drop-in for `replicas.ReplicaHost`.

Each replica is one actor (`ReplicaServer`) placed by Ray with the predictor's `resources`. Its
constructor loads the pinned graph into a `DataPlane` and serves it with uvicorn from a thread, on a free
port of its node's address; the controller's gateway forwards to that address. The spec and the DB and
artifact store URLs travel with the actor (not a file path), so a replica can run on another node that
reaches the same DB and store.

An actor whose process dies is not restarted by Ray (`max_restarts=0`): `refresh()` replaces that one
replica with a new actor (at once the first time, then backing off while the new ones die before they
serve: 1 s, 2 s, 4 s ... up to a minute, as `restarts.Restarts` does for a local host), and its siblings
go on serving meanwhile. Why it died is kept (`trouble`) and told in `notes`, which the runner records
as events. `refresh()` asks every actor for its address (a call that waits while a new actor loads, so it
costs the controller nothing) and swaps the endpoint once the new one answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from skyloop.config import Settings
from skyloop.deploy.pools import Endpoint
from skyloop.deploy.replicas import ReplicaHost
from skyloop.deploy.spec import PredictorSpec
from skyloop.errors import ModelLoadError
from skyloop.serving.spec import GraphNode

__all__ = ["RayReplicaHost", "ReplicaServer"]

_START_TIMEOUT = 180.0
_owned: list[Any] = []
"""The `ray` module, once a host of this process started (or connected) the Ray it uses: see `shutdown_ray`."""
_STOP_GRACE = 15.0
_PROBE_EVERY = 0.2
_FIRST_WAIT = 1.0
_MAX_WAIT = 60.0
"""The waits before a new actor for a replica whose last new actors died before serving (doubling)."""
"""Seconds between address calls to one actor (a call still waiting is not repeated)."""


class ReplicaServer:
    """Inside a Ray actor: one replica's data plane, served by uvicorn on a free port of the node."""

    def __init__(self, spec: dict[str, Any], home: str, db_url: str, artifacts_url: str, threads: int = 2) -> None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # one process, one replica: in-memory metrics
        import ray
        import uvicorn

        from skyloop.serving.app import create_app
        from skyloop.serving.dataplane import DataPlane
        from skyloop.serving.http import BoundedHttpToolsProtocol
        from skyloop.serving.server import bind
        from skyloop.serving.spec import ServeSpec

        settings = Settings.for_home(home).model_copy(update={"db_url": db_url, "artifacts_url": artifacts_url})
        # Behind the deployment's gateway, which checks feedback ids against the answers it gave.
        plane = DataPlane([ServeSpec.model_validate(spec)], settings, threads=threads, behind_router=True)
        plane.load()
        failed = [f"{m.name}: {m.failure}" for m in plane.models.values() if m.failure]
        if failed:
            plane.close()
            raise ModelLoadError("; ".join(failed))
        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        sock = bind(host, 0)
        # uvloop: the default asyncio loop costs ~40 ms a request in a Ray worker.
        config = uvicorn.Config(create_app(plane, load=False), loop="uvloop", http=BoundedHttpToolsProtocol,
                                log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=int(_STOP_GRACE))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="skyloop-replica",
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise ModelLoadError(f"the replica's server on {host}:{sock.getsockname()[1]} stopped at start")
            time.sleep(0.005)
        self.info = {"host": host, "port": sock.getsockname()[1], "pid": os.getpid(), "started_at": time.time(),
                     "node": ray.get_runtime_context().get_node_id()}

    def address(self) -> dict[str, Any]:
        """Where this replica listens: host, port, pid, node and when it started."""
        return self.info

    def stop(self) -> None:
        """Stop listening and return once the in-flight requests are answered (or the grace period ends)."""
        self.server.should_exit = True
        self.thread.join(_STOP_GRACE + 5)


@dataclass(eq=False)
class _Replica:
    """The host's view of one actor."""

    index: int
    actor: Any
    info: dict[str, Any] | None
    """Where it listens; None while it waits for room on the cluster (or loads) during a rolling update."""
    restarts: int = 0
    down: bool = False
    """The actor's process died and Ray has not restarted it yet: its endpoint is out of the pool."""
    probe: Any = None
    """The address call in flight (an ObjectRef)."""
    probed: float = 0.0
    fresh: bool = False
    """`actor` replaces one that died, and has not served yet."""
    failures: int = 0
    """New actors of this replica that died in a row before serving."""
    cause: str = ""
    """Why its last actor died (while it is down)."""
    retry_at: float = 0.0
    """With no `actor` (it died): when a new one starts."""


class RayReplicaHost(ReplicaHost):
    """One predictor version's replicas, each a Ray actor."""

    def __init__(self, deployment: str, predictor: PredictorSpec, graph: GraphNode, version: str, folder: Path,
                 settings: Settings, generation: int, ray_address: str | None = None) -> None:
        super().__init__(deployment, predictor, graph, version, folder, settings, generation)
        self.ray_address = ray_address or settings.execution.ray_address
        self._ray: Any = None
        self._replicas: list[_Replica] = []
        self._stopped = False
        self._new_actor: Any = None
        """Starts one more actor of this predictor (set by `start`)."""

    def _options(self) -> dict[str, Any]:
        res = self.predictor.resources
        options: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus, "resources": dict(res.custom),
                                   "max_restarts": 0, "max_task_retries": 0,
                                   "max_concurrency": 4}  # `address` answers while `stop` waits
        if res.memory > 0:
            options["memory"] = res.memory
        return options

    async def _connect(self) -> Any:
        from skyloop.execution.backends.ray_connect import connect_ray

        if self._ray is None:
            self._ray, owns = await asyncio.to_thread(connect_ray, self.ray_address, self.settings.execution)
            if owns:
                _owned.append(self._ray)
        return self._ray

    def _wants(self) -> dict[str, Any]:
        return {k: v for k, v in self._options().items() if k in ("num_cpus", "num_gpus", "memory", "resources")}

    async def refuse_unplaceable(self) -> None:
        """ModelLoadError, at once, when the whole cluster could never hold one replica, or all of them at the same
        time (whatever else stopped): not after the start timeout, and before a rolling update stops anything."""
        name, replicas = self.predictor.name, self.predictor.replicas
        ray = await self._connect()
        total: dict[str, float] = await asyncio.to_thread(ray.cluster_resources)
        asked = self._asked()
        short = sorted(k for k, v in asked.items() if v > total.get(k, 0.0) + 1e-9)
        if short:
            raise ModelLoadError(f"predictor {name!r} asks for {self._wants()} per replica, more {', '.join(short)} "
                                 f"than the whole Ray cluster has ({ {k: total.get(k, 0.0) for k in short} }); lower "
                                 "the predictor's resources or add nodes")
        short = sorted(k for k, v in asked.items() if v * replicas > total.get(k, 0.0) + 1e-9)
        if short:
            need = {k: round(asked[k] * replicas, 6) for k in short}
            raise ModelLoadError(f"predictor {name!r} asks for {replicas} replicas of {self._wants()}: {need} in all, "
                                 f"more than the whole Ray cluster has ({ {k: total.get(k, 0.0) for k in short} }), "
                                 "so they could never all serve; lower `replicas` or the resources, or add nodes")

    def _asked(self) -> dict[str, float]:
        res = self.predictor.resources
        return {"CPU": res.cpus, "GPU": res.gpus, "memory": res.memory, **res.custom}

    async def room(self, freed: RayReplicaHost | None = None, stopped: int = 0) -> int:
        """How many of this predictor's replicas the cluster has room for now (at most `replicas`), by what Ray
        says is free across its nodes (a replica's request split over two nodes would not fit: an estimate);
        with `freed`, as if `stopped` of its replicas had stopped."""
        ray = await self._connect()
        free: dict[str, float] = dict(await asyncio.to_thread(ray.available_resources))
        for k, v in (freed._asked() if freed is not None else {}).items():
            free[k] = free.get(k, 0.0) + v * stopped
        fits = [int(free.get(k, 0.0) / v + 1e-9) for k, v in self._asked().items() if v > 0]
        return max(0, min([self.predictor.replicas, *fits]))

    @property
    def pending(self) -> int:
        """Replicas that do not serve yet: waiting for room on the cluster, or loading."""
        return sum(r.info is None for r in self._replicas)

    async def start(self, timeout: float = _START_TIMEOUT, ready_first: int | None = None) -> list[Endpoint]:
        """Start one actor per replica and wait until each answers `/v2/health/ready`; ModelLoadError if not.

        With `ready_first`, return once that many serve: the others wait (in Ray's queue, for the room the old
        replicas of a rolling update free) and join the endpoints through `refresh()`."""
        name = self.predictor.name
        ray = await self._connect()
        wants = self._wants()
        doc = self.serve_doc()
        s = self.settings
        actor_class = ray.remote(ReplicaServer).options(**self._options())
        self._new_actor = lambda: actor_class.remote(doc, str(s.home), s.resolved_db_url, s.resolved_artifacts_url)
        actors = [self._new_actor() for _ in range(self.predictor.replicas)]
        deadline = time.monotonic() + timeout
        refs = [a.address.remote() for a in actors]
        first = len(refs) if ready_first is None else max(1, min(ready_first, len(refs)))
        try:
            done, _ = await asyncio.to_thread(ray.wait, refs, num_returns=first, timeout=timeout)
            if len(done) < first:
                raise ray.exceptions.GetTimeoutError
            got = set(done)
            infos = [await asyncio.to_thread(ray.get, ref) if ref in got else None for ref in refs]
        except ray.exceptions.GetTimeoutError:
            self._kill(actors)
            raise ModelLoadError(f"predictor {name!r}: its Ray actors did not start within {timeout:g}s: the cluster "
                                 f"had no room for {wants} each (what else runs there, or a rolling update that "
                                 "needs the old and the new replicas at once), or a replica's process died while "
                                 "loading and Ray kept restarting it (see the worker logs in Ray's session "
                                 "folder)") from None
        except Exception as exc:  # ActorDiedError wrapping the constructor's error, most often
            self._kill(actors)
            raise ModelLoadError(f"predictor {name!r} failed to start on Ray: {_cause(exc)}") from exc
        except asyncio.CancelledError:  # the controller is stopping: actors nobody will hold must not stay
            self._kill(actors)
            raise
        self._replicas = [_Replica(i, a, info, probe=None if info is not None else ref)
                          for i, (a, info, ref) in enumerate(zip(actors, infos, refs, strict=True))]
        try:
            await self._until_ready(deadline, timeout)
        except asyncio.CancelledError:
            self._kill(actors)
            raise
        self.endpoints = [self._endpoint(r) for r in self._replicas if r.info is not None]
        return self.endpoints

    async def _until_ready(self, deadline: float, timeout: float) -> None:
        name = self.predictor.name
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
            while not await self._all_ready_at(client):
                if time.monotonic() > deadline:
                    await self.stop()
                    raise ModelLoadError(f"predictor {name!r}: its Ray replicas were not ready after {timeout:g}s")
                await self.refresh()
                lost = next((r for r in self._replicas if r.failures), None)
                if lost is not None:  # a new actor for one that died failed too: the graph cannot serve there
                    await self.stop()
                    raise ModelLoadError(f"predictor {name!r} failed to start on Ray: replica {lost.index}: "
                                         f"{lost.cause}")
                await asyncio.sleep(0.1)

    async def _all_ready_at(self, client: aiohttp.ClientSession) -> bool:
        for r in self._replicas:
            if r.info is None:  # waits for room: not what this start waits for
                continue
            try:
                async with client.get(f"http://{r.info['host']}:{r.info['port']}/v2/health/ready") as resp:
                    if resp.status != 200:
                        return False
            except (TimeoutError, aiohttp.ClientError):
                return False
        return True

    def _endpoint(self, r: _Replica) -> Endpoint:
        assert r.info is not None
        return Endpoint(self.predictor.name, r.index, int(r.info["port"]), str(r.info["host"]))

    def _kill(self, actors: list[Any]) -> None:
        for actor in actors:
            if actor is None:
                continue
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)

    def replicas(self) -> list[dict[str, Any]]:
        """One entry per replica that started: index, host, port, pid, node, restarts, started_at, and whether it
        is down (see `pending` for the others)."""
        return [{"index": r.index, "port": r.info["port"], "pid": r.info["pid"], "restarts": r.restarts,
                 "started_at": r.info["started_at"], "host": r.info["host"], "node": r.info["node"], "down": r.down,
                 **({"cause": r.cause} if r.down and r.cause else {})}
                for r in self._replicas if r.info is not None]

    @property
    def alive(self) -> bool:
        """Whether the host can still serve: started and not stopped (it replaces a replica whose actor died)."""
        return bool(self._replicas) and not self._stopped

    @property
    def trouble(self) -> str:
        """Why replicas are down now and when they start again ("" when none is)."""
        now = time.monotonic()
        return "; ".join(
            f"replica {r.index} died: {r.cause}" + (f" ({r.failures} new one(s) in a row died before serving; next "
                                                    f"try in {max(0.0, r.retry_at - now):.0f}s)"
                                                    if r.failures and r.actor is None else "")
            for r in self._replicas if r.down and r.cause)

    def _lost(self, r: _Replica, cause: str, now: float) -> None:
        """`r`'s actor died: a new one takes its place, at once unless the last new ones died before serving."""
        self._kill([r.actor])
        r.failures += r.fresh
        wait = min(_MAX_WAIT, _FIRST_WAIT * 2.0 ** (r.failures - 1)) if r.failures else 0.0
        r.actor, r.probe, r.fresh, r.down, r.cause, r.retry_at = None, None, False, True, cause, now + wait
        name = self.predictor.name
        if r.failures:
            self.notes.append(("restart_failed", f"{name}: replica {r.index} did not start again ({r.failures} "
                                                 f"in a row): {cause}; next try in {wait:g}s"))
        else:
            self.notes.append(("replica_lost", f"{name}: replica {r.index} died: {cause}; starting a new one "
                                               "(the other replicas go on serving)"))

    def exit_description(self) -> str:
        """Why the host is gone (for the event that restarts it)."""
        return "Ray replicas stopped" if self._stopped else "Ray replicas not started"

    async def refresh(self) -> bool:
        """Take in actors that Ray restarted (a new port) or lost; True when the endpoints changed."""
        ray, now, changed = self._ray, time.monotonic(), False
        pending = [r.probe for r in self._replicas if r.probe is not None]
        done = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else set()
        for r in self._replicas:
            if r.probe is not None and r.probe in done:
                probe, r.probe = r.probe, None
                try:
                    info = ray.get(probe, timeout=0)
                except ray.exceptions.ActorUnavailableError:  # out of reach for now (it may answer again)
                    changed |= not r.down
                    r.down = True
                    continue
                except ray.exceptions.RayActorError as exc:  # its process died: only this replica is replaced
                    changed |= not r.down and r.info is not None
                    self._lost(r, _cause(exc), now)
                    continue
                if r.fresh:
                    r.fresh, r.failures, r.cause = False, 0, ""
                if r.info is not None and (info["pid"], info["started_at"]) != (r.info["pid"], r.info["started_at"]):
                    r.restarts += 1
                # (No info before: a replica that waited for room, or loaded, serves now.)
                changed |= r.info is None or r.down or (info["host"], info["port"]) != (r.info["host"], r.info["port"])
                r.info, r.down = info, False
            if r.actor is None and now >= r.retry_at and not self._stopped:
                r.actor, r.fresh = self._new_actor(), True
            if r.actor is not None and r.probe is None and now - r.probed >= _PROBE_EVERY:
                r.probe, r.probed = r.actor.address.remote(), now
        if changed:
            kept = {e.index: e for e in self.endpoints}
            self.endpoints = [kept[r.index] if r.index in kept and kept[r.index].port == r.info["port"]
                              and kept[r.index].host == r.info["host"] else self._endpoint(r)
                              for r in self._replicas if not r.down and r.info is not None]
        return changed

    def describe(self) -> dict[str, Any]:
        """For status: version, Ray address, and each replica with the gateway's in-flight count."""
        endpoints = {e.index: e for e in self.endpoints}
        return {"pid": None, "backend": "ray", "ray_address": self.ray_address, "version": self.version,
                "trouble": self.trouble,
                "generation": self.generation, "alive": self.alive, "log": None, "pending": self.pending,
                "replicas": [{**r, "inflight": endpoints[r["index"]].inflight if r["index"] in endpoints else 0,
                              "draining": endpoints[r["index"]].draining if r["index"] in endpoints else False}
                             for r in self.replicas()]}

    async def stop_replica(self, index: int) -> None:
        """Stop one replica (its in-flight requests answered) and give its room back to the cluster."""
        replica = next((r for r in self._replicas if r.index == index), None)
        if replica is None:
            return
        self._replicas.remove(replica)
        self.endpoints = [e for e in self.endpoints if e.index != index]
        with contextlib.suppress(Exception):
            if replica.actor is not None:
                await asyncio.to_thread(self._ray.wait, [replica.actor.stop.remote()], timeout=_STOP_GRACE + 5)
        self._kill([replica.actor])

    async def kill_replica(self, index: int) -> int | None:
        """Kill replica `index`'s actor (a hung one: see `liveness`); `refresh` then starts a new one in its place,
        the other replicas serving meanwhile. Returns the pid it had (None: no such replica serving)."""
        r = next((r for r in self._replicas if r.index == index and r.actor is not None), None)
        if r is None or r.info is None:
            return None
        ray, pid, node = self._ray, int(r.info["pid"]), r.info.get("node")

        def kill() -> None:
            with contextlib.suppress(Exception):
                ray.kill(r.actor, no_restart=True)
            # A stopped process takes no message from Ray: one on this node gets SIGKILL as well.
            with contextlib.suppress(Exception):
                if node and node == ray.get_runtime_context().get_node_id():
                    os.kill(pid, signal.SIGKILL)

        await asyncio.to_thread(kill)
        return pid

    def drop_pending(self) -> int:
        """Kill the replicas that do not serve yet (no room came for them); returns how many."""
        waiting = [r for r in self._replicas if r.info is None]
        self._replicas = [r for r in self._replicas if r.info is not None]
        self._kill([r.actor for r in waiting])
        return len(waiting)

    async def stop(self) -> None:
        """Let every actor answer its in-flight requests and stop listening, then kill the actors."""
        if self._stopped or not self._replicas:
            self._stopped = True
            return
        self._stopped = True
        self.drop_pending()  # nothing to answer: a stop call would wait for their constructors first
        ray, actors = self._ray, [r.actor for r in self._replicas if r.actor is not None]
        with contextlib.suppress(Exception):
            refs = [a.stop.remote() for a in actors]
            await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=_STOP_GRACE + 5)
        self._kill(actors)


def _cause(exc: BaseException) -> str:
    """The first line of what Ray says, without its boilerplate where it can be found."""
    text = str(exc).strip()
    for marker in ("ModelLoadError: ", "SkyloopError: "):
        if marker in text:
            text = text[text.rindex(marker):]
            break
    return text.splitlines()[0] if text else type(exc).__name__


def shutdown_ray() -> None:
    """End the Ray connection the hosts of this process made (a local Ray started here stops): a controller's
    local Ray otherwise outlived it for minutes (its agents, orphaned, holding ports). Not one this process had
    before its first host (a test's, say): that belongs to whoever started it."""
    while _owned:
        ray = _owned.pop()
        with contextlib.suppress(Exception):
            ray.shutdown()
