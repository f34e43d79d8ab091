"""One deployment inside the controller: its gateway, a replica host per predictor version, its rollout.

The runner serves the gateway on its port, runs one replica host per predictor version
(`replicas.ReplicaHost`, or `ray_replicas.RayReplicaHost`) and the rollout state machine, and starts again a
host that died (`restarts.Restarts`: at once, then backing off while its starts fail). Each transition is
written to `deployment_events` before the gateway's weights change, and the runner's view (weights,
versions, replicas with pids and ports, the last analysis) goes to the deployment row about once a second
for `skyloop deploy status`.

Changes of a new spec version: a predictor whose graph, batching or replica count changed gets a new host;
when every new replica is ready, old and new replicas are swapped one by one (the new one takes traffic,
the old one drains until its in-flight requests are answered), then the old host stops: a rolling update.
A canary or blue-green target is started first, then walked by `rollout.Rollout`; on promotion the
registry alias named by `promote_alias` moves to the target's model version and the old stable
predictor's replicas stop (drained in the background: the control loop does not wait); on rollback the
target's replicas stop. `applying` decides what starts and what becomes of a rollout; a spec version that
fails to apply leaves the last good one running.

A controller that takes over a deployment (after a restart, or from one that died) at the spec version the
last one applied goes on with its rollout where it stood (`Rollout.resume`): in the middle of a step, or
finished, when only the predictors that kept traffic are started again. Without a rollout (rolling updates,
bandit routers) every predictor of the spec is started, as on a first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from skyloop.deploy.applying import apply_version, restore
from skyloop.deploy.gateway import Gateway
from skyloop.deploy.health import check_serving, restart_host
from skyloop.deploy.liveness import Liveness
from skyloop.deploy.pools import Endpoint, Pool
from skyloop.deploy.ray_replicas import RayReplicaHost
from skyloop.deploy.replicas import ReplicaHost, pin_graph
from skyloop.deploy.restarts import Restarts
from skyloop.deploy.rollout import Phase, Rollout, Transition
from skyloop.deploy.spec import DeploymentSpec, PredictorSpec
from skyloop.errors import ModelLoadError, SkyloopError
from skyloop.serving.server import bind
from skyloop.store import deployments as store

if TYPE_CHECKING:
    from skyloop.deploy.controller import Controller
    from skyloop.deploy.loop import Loop

__all__ = ["DeploymentRunner"]

log = logging.getLogger("skyloop.deploy")

_STATE_EVERY = 1.0
_ROOM_TIMEOUT = 180.0
"""Seconds a rolling update on Ray waits for the room its old replicas free (as long as a replica may load), before
it stops the rest of the old ones and goes on with the new ones that serve (the others join as room frees)."""

class _GatewayServer(uvicorn.Server):
    """uvicorn in the controller's loop: the controller, not uvicorn, handles SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DeploymentRunner:
    """One deployment inside the controller."""

    def __init__(self, controller: Controller, info: store.DeploymentInfo) -> None:
        self.controller = controller
        self.name = info.name
        self.spec = DeploymentSpec.model_validate(info.spec)
        self.spec_version = 0
        """The spec version that runs, and `spec` its spec: the last one applied (0: none yet). A later one that
        failed to apply does not replace them: restarts and the state written are the running one's."""
        self.saved_state = info.state
        self.created_at = info.created_at.timestamp()
        """When this deployment was created: logs of an earlier one of the same name are not its own."""
        self.hosts: dict[str, ReplicaHost] = {}
        self.started: set[ReplicaHost] = set()
        """Every host started and not stopped yet, in `hosts` or not (one being rolled in or out, or restarted):
        `stop` stops them all, even those an apply it cancelled held."""
        self.rollout: Rollout | None = None
        self.gateway = Gateway(self.name, self.spec.router, self.spec_weights(self.spec),
                               self.spec_shadows(self.spec), db=controller.workspace.db)
        # A bandit takes up what it had learned before a controller restart (a saved state is only a hint).
        arms = info.state.get("arms") if isinstance(info.state, dict) else None
        self.gateway.traffic.seed(arms if isinstance(arms, dict) else {})
        self.server: _GatewayServer | None = None
        self.serve_task: asyncio.Task[None] | None = None
        self.sock: socket.socket | None = None
        self.status, self.reason = Phase.PROGRESSING.value, "starting"
        self.generation = 0
        self.busy: asyncio.Task[None] | None = None
        self.retiring: set[asyncio.Task[None]] = set()
        """Drains of predictors taken out (`retire`), still in progress."""
        self.swapping: set[str] = set()
        """Predictors whose replicas `swap` is replacing (their pool's endpoints are its to change)."""
        self.restarts = Restarts()
        self.restart_reason = ""
        """The status reason a failed restart set (a later successful one takes it back)."""
        self.down: list[str] = []
        """Predictors with no replica serving, and "NAME (K waiting)" for those with replicas waiting for room, at
        the last tick (see `health.check_serving`)."""
        self.down_reason = ""
        self.liveness = Liveness(self)
        """Probes every replica's `/v2/health/live`; drains and kills one that hangs."""
        self.state_written = 0.0
        self.applied = 0
        """The spec version this runner has acted on (applied, or failed to)."""
        self.not_applied: tuple[int, str] = (0, "")
        """The last spec version that failed to apply, and why."""
        self.loop: Loop | None = None

    @property
    def folder(self) -> Path:
        return self.controller.settings.home / "deployments" / self.name

    @staticmethod
    def spec_weights(spec: DeploymentSpec) -> dict[str, float]:
        """Predictor -> the percent of live traffic `spec` gives it."""
        return {p.name: p.traffic for p in spec.predictors if not p.shadow}

    @staticmethod
    def spec_shadows(spec: DeploymentSpec) -> dict[str, float]:
        """Shadow predictor -> the fraction of live traffic `spec` mirrors to it."""
        return {p.name: p.shadow for p in spec.predictors if p.shadow}

    def versions(self) -> dict[str, str]:
        """Predictor -> the model version its replicas serve."""
        return {n: h.version for n, h in self.hosts.items()}

    async def event(self, kind: str, reason: str, *, step: int | None = None, metrics: dict[str, Any] | None = None,
                    version: int | None = None) -> None:
        """Record a transition (before it takes effect), of spec version `version` (by default the running one)."""
        weights, versions = dict(self.gateway.weights), self.versions()
        version = self.spec_version if version is None else version

        def write() -> None:
            with self.controller.workspace.db.session() as session:
                store.record_event(session, self.name, version, kind, self.status, step=step,
                                   weights=weights, versions=versions, metrics=metrics, reason=reason)

        await asyncio.to_thread(write)
        log.info("%s: %s: %s", self.name, kind, reason)

    # -- start and stop -----------------------------------------------------------------------------------
    async def start(self, info: store.DeploymentInfo) -> None:
        """Open the gateway, then reconcile to the spec."""
        gw = self.spec.gateway
        port = gw.port or int(self.saved_state.get("gateway_port") or 0)
        try:
            self.sock = bind(gw.host, port)
        except SkyloopError:
            self.sock = bind(gw.host, 0) if not gw.port else None
            if self.sock is None:
                raise
        from skyloop.serving.http import BoundedHttpToolsProtocol

        config = uvicorn.Config(self.gateway.app, http=BoundedHttpToolsProtocol, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=10)
        self.server = _GatewayServer(config)
        self.serve_task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await restore(self, info)
        await self.apply(info)

    @property
    def url(self) -> str:
        if self.sock is None:
            return ""
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        """Stop serving: an apply in flight first (a deletion does not wait for it), the gateway, then every
        replica host (logged payloads are written out)."""
        busy = self.busy
        if busy is not None and not busy.done() and busy is not asyncio.current_task():
            busy.cancel()
            await asyncio.wait([busy])
        await self.restarts.cancel()
        await self.liveness.close()
        for task in list(self.retiring):
            task.cancel()
        await asyncio.gather(*self.retiring, return_exceptions=True)
        if self.loop is not None:
            await self.loop.stop()
        if self.server is not None:
            self.server.should_exit = True
        if self.serve_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.serve_task, 15)
        await self.gateway.close()
        await asyncio.gather(*(h.stop() for h in {*self.hosts.values(), *self.started}), return_exceptions=True)
        self.hosts.clear()
        self.started.clear()
        if self.sock is not None:
            self.sock.close()

    # -- reconciling a spec version ---------------------------------------------------------------------
    def resolve(self, uri: str) -> str:
        """The `name/version` a `models:/` URI names now."""
        from skyloop.registry.registry import resolve
        from skyloop.registry.uri import parse_model_ref

        with self.controller.workspace.db.read() as session:
            info = resolve(session, parse_model_ref(uri))
        return f"{info.name}/{info.version}"

    async def new_host(self, predictor: PredictorSpec, replacing: ReplicaHost | None = None,
                       spec: DeploymentSpec | None = None, like: ReplicaHost | None = None) -> ReplicaHost:
        """Start a host for `predictor` of `spec` (by default the running one); one `replacing` a running Ray host
        of it may start with only the replicas the cluster has room for, the rest following as `_roll` stops old
        ones (`RayReplicaHost.pending`). With `like` (a host that died), the graph it served, as it pinned it: an
        alias that moved since is followed only when a spec is applied (`deploy.api._moved_aliases`)."""
        spec = spec or self.spec
        if like is not None:
            graph, version = like.graph, like.version
        else:
            graph, pinned = await asyncio.to_thread(pin_graph, predictor.node(), spec.base_dir, self.resolve)
            version = ",".join(pinned) or "graph"
        self.generation += 1
        host: ReplicaHost
        if spec.backend == "ray":
            host = RayReplicaHost(self.name, predictor, graph, version, self.folder, self.controller.settings,
                                  self.generation, spec.ray_address)
        else:
            host = ReplicaHost(self.name, predictor, graph, version, self.folder, self.controller.settings,
                               self.generation)
        self.started.add(host)
        try:
            if isinstance(host, RayReplicaHost):
                await host.refuse_unplaceable()
                first = None
                if isinstance(replacing, RayReplicaHost) and replacing.alive:
                    first = await self._make_room(host, replacing)
                endpoints = await host.start(ready_first=first)
            else:
                endpoints = await host.start()
        except Exception:  # a start that failed stopped what it began (a cancelled one is left to `stop`)
            self.started.discard(host)
            raise
        log.info("%s: predictor %s ready on ports %s", self.name, predictor.name, [e.port for e in endpoints])
        return host

    async def _make_room(self, host: RayReplicaHost, old: RayReplicaHost) -> int | None:
        """How many of `host`'s replicas to wait for before rolling (None: all, the cluster has room for them
        beside `old`'s). Where there is room for none, old replicas are stopped first (drained: no request
        fails) until one new fits, as long as one old replica keeps serving; else the update is refused."""
        room = await host.room()
        if room >= host.predictor.replicas:
            return None
        if room > 0:
            return room
        name, spare = host.predictor.name, len(old.endpoints) - 1
        if spare < 1 or await host.room(old, spare) == 0:
            raise ModelLoadError(
                f"predictor {name!r}: the Ray cluster has no room for a new replica, even with all but one of the "
                f"{len(old.endpoints)} running replica(s) stopped (a rolling update stops the last old one only "
                "once a new one serves): free room on the cluster, or lower the predictor's resources")
        while room == 0 and len(old.endpoints) > 1:
            victim = old.endpoints[0]
            await self.event("rolling_update", f"{name}: no room on the cluster for a new replica: stopping "
                             f"old replica {victim.index} first ({len(old.endpoints) - 1} keep serving)")
            await self._take_out(victim, self.gateway.pools.get(name), old)
            for _ in range(50):  # what Ray says is free follows a kill by a moment
                if (room := await host.room()) > 0:
                    break
                await asyncio.sleep(0.1)
        return max(1, room)

    async def _roll_as_room_frees(self, name: str, host: RayReplicaHost, old: ReplicaHost, pool: Pool) -> None:
        """The rolling update of a Ray host started with replicas still waiting for room: each new replica that
        serves takes an old one's place, whose stop frees the room the next new one waits for."""
        olds, added = list(old.endpoints), set[int]()
        deadline = time.monotonic() + _ROOM_TIMEOUT
        while True:
            for e in [e for e in host.endpoints if e.index not in added]:
                added.add(e.index)
                pool.endpoints.append(e)
                if olds:
                    await self._take_out(olds.pop(0), pool, old)
            if not host.pending or not host.alive:
                break
            if time.monotonic() > deadline:  # they keep their place in Ray's queue and join once room frees
                await self.event("rolling_update", f"{name}: {host.pending} new replica(s) still wait for room on the "
                                 f"Ray cluster after {_ROOM_TIMEOUT:g}s; the old ones stop, and "
                                 f"{len(host.endpoints)} serve meanwhile")
                break
            await host.refresh()
            await asyncio.sleep(0.1)
        for victim in olds:
            await self._take_out(victim, pool)

    async def _take_out(self, victim: Endpoint, pool: Pool | None, old: ReplicaHost | None = None) -> None:
        """Drain `victim` (its in-flight requests answered) and take it out of `pool`; with `old`, a Ray host,
        stop it too, which gives its room back to the cluster."""
        await self.gateway.drain(victim)
        if pool is not None and victim in pool.endpoints:
            pool.endpoints.remove(victim)
        if isinstance(old, RayReplicaHost):
            await old.stop_replica(victim.index)

    async def apply(self, info: store.DeploymentInfo) -> None:
        """Drive the deployment to spec version `info.spec_version` (acted on, even when it fails: then the
        version running goes on, see `applying`)."""
        try:
            await apply_version(self, info.spec, info.spec_version)
        finally:
            self.applied = max(self.applied, info.spec_version)

    async def start_loop(self, old: DeploymentSpec | None) -> None:
        """A loop for the spec's `loop:` section. One it replaces (the section changed or went) stops: its
        iteration in flight ends there, and what it logged is written out; the gateway logs to the new one first."""
        previous = self.loop
        if previous is not None and old is not None and old.loop == self.spec.loop:
            return
        if self.spec.loop is None:
            self.loop = None
            self.gateway.payloads = None
        else:
            from skyloop.deploy.loop import Loop

            self.loop = Loop(self, self.spec.loop)
        if previous is not None:
            await previous.stop(f"spec version {self.spec_version} " +
                                ("changed the loop" if self.spec.loop is not None else "has no loop"))

    async def swap(self, name: str, host: ReplicaHost) -> None:
        """Put `host` in place of the predictor's current one, replica by replica (rolling)."""
        self.swapping.add(name)
        try:
            await self._roll(name, host)
        finally:
            self.swapping.discard(name)

    async def _roll(self, name: str, host: ReplicaHost) -> None:
        old = self.hosts.get(name)
        pool = self.gateway.pools.setdefault(name, Pool(name))
        self.hosts[name] = host
        pool.version = host.version
        if old is None:
            pool.endpoints = list(host.endpoints)
            return
        waiting = host.pending if isinstance(host, RayReplicaHost) else 0
        await self.event("rolling_update", f"{name}: {old.version} -> {host.version}, "
                         f"{len(host.endpoints)} replica(s) ready" +
                         (f", {waiting} waiting for the room old ones free" if waiting else ""))
        if isinstance(host, RayReplicaHost) and waiting:
            await self._roll_as_room_frees(name, host, old, pool)
            await self.stop_host(old)
            return
        olds, news = list(old.endpoints), list(host.endpoints)
        for i in range(max(len(olds), len(news))):
            if i < len(news):
                pool.endpoints.append(news[i])
            if i < len(olds):
                await self._take_out(olds[i], pool)
        await self.stop_host(old)

    async def stop_host(self, host: ReplicaHost) -> None:
        await host.stop()
        self.started.discard(host)

    def retire(self, name: str) -> asyncio.Task[None]:
        """Take out a predictor that no longer takes traffic: its replicas stop once their in-flight requests are
        answered, in a task of its own (a drain may take 30 s, and the control loop must go on meanwhile)."""
        host = self.hosts.pop(name, None)
        task = asyncio.create_task(self._drain_and_stop(name, host, self.gateway.pools.get(name)),
                                   name=f"retire {self.name}/{name}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
        return task

    async def _drain_and_stop(self, name: str, host: ReplicaHost | None, pool: Pool | None) -> None:
        try:
            if pool is not None:  # the pool stays while draining: retries of in-flight requests still find it
                await asyncio.gather(*(self.gateway.drain(e) for e in list(pool.endpoints)))
                if name not in self.hosts and self.gateway.pools.get(name) is pool:  # not started again meanwhile
                    del self.gateway.pools[name]
            if host is not None:
                await self.stop_host(host)
        except Exception:
            log.exception("%s: stopping the replicas of %s failed", self.name, name)

    def split_text(self) -> str:
        """The traffic split, for a status reason."""
        if self.spec.router.type != "weighted":
            return f"{self.spec.router.type} router over {', '.join(self.gateway.weights)}"
        return ", ".join(f"{n} {w:g}%" for n, w in self.gateway.weights.items())

    # -- the loop -----------------------------------------------------------------------------------------
    async def transitions(self, transitions: list[Transition]) -> None:
        """Record and apply the rollout's transitions; the state is written as soon as the weights changed, and
        the predictors they left at 0% are retired after that, in the background."""
        retired: list[str] = []
        for t in transitions:
            self.status, self.reason = t.status.value, t.reason
            shadows = {**self.spec_shadows(self.spec), **t.mirrors}
            self.gateway.weights = dict(t.weights)  # recorded with the event, applied right after
            await self.event(t.kind, t.reason, step=t.step, metrics=t.metrics)
            self.gateway.set_weights(t.weights, shadows)
            if t.new_window:
                self.gateway.new_windows()
            if t.kind == "promoted":
                await self._move_alias()
            if t.kind in ("promoted", "rolled_back"):
                retired += [n for n, weight in t.weights.items() if weight <= 0 and n not in shadows]
        for name in retired:
            if name in self.hosts:
                self.retire(name)
        if transitions:
            await self.write_state(force=True)

    async def _move_alias(self) -> None:
        alias, target = self.spec.rollout.promote_alias, self.spec.rollout.target
        if not alias or not target or target not in self.hosts:
            return
        pinned = [v for v in self.hosts[target].version.split(",") if "/" in v]
        if len(pinned) != 1:
            await self.event("alias_not_moved", f"{alias}: the target serves {len(pinned)} registered models, "
                             "the alias needs exactly one")
            return
        model, _, version = pinned[0].rpartition("/")

        def move() -> int | None:
            from skyloop.registry.registry import set_alias

            with self.controller.workspace.db.session() as session:
                return set_alias(session, model, alias, int(version))

        previous = await asyncio.to_thread(move)
        was = f"version {previous}" if previous is not None else "nothing"
        await self.event("alias_moved", f"models:/{model}@{alias} moved from {was} to version {version}")

    async def refresh_hosts(self) -> None:
        """Route to replicas their host restarted (a Ray actor on a new port); also while an apply is in flight
        (`busy`), except for a predictor whose replicas are being swapped."""
        for name, host in list(self.hosts.items()):
            if name not in self.swapping and host.alive and await host.refresh() and self.hosts.get(name) is host:
                pool = self.gateway.pools.get(name)
                if pool is not None:
                    pool.endpoints = list(host.endpoints)
            notes, host.notes = host.notes, []
            for kind, reason in notes:  # a replica that died, and why (the host replaces it)
                await self.event(kind, reason)

    async def tick(self, commands: list[str]) -> None:
        """Restart dead hosts, apply commands, advance the rollout, publish the state."""
        await self.refresh_hosts()
        for name, host in list(self.hosts.items()):
            if not host.alive and self.restarts.due(name):
                self.restarts.begin(name, restart_host(self, name, host))
        await check_serving(self)
        await self.liveness.tick()
        now = time.monotonic()
        for command in commands:
            if self.rollout is None or self.rollout.done:
                # `send_command` queues only while a rollout is in progress; this one ended before we got here
                # (or an earlier command ended it): say so rather than drop it silently.
                await self.event("command_ignored", f"{command}: no rollout in progress "
                                 f"(status {self.status}: {self.reason})")
            else:
                await self.transitions(self.rollout.command(command, now))
        if self.rollout is not None:
            await self.transitions(self.rollout.tick(now, self.gateway.windows))
        try:
            if self.loop is not None:
                await self.loop.tick()
        finally:  # status shows what the rest of the tick did, even when the loop failed
            await self.write_state()

    def describe(self) -> dict[str, Any]:
        """The controller's view, stored on the deployment row."""
        rollout = None
        if self.rollout is not None:
            r = self.rollout
            rollout = {**r.saved(time.monotonic()), "spec_version": self.spec_version,
                       "analysis": r.last.to_dict() if r.last else None}
        elif self.status in (Phase.HEALTHY, Phase.DEGRADED):
            rollout = {"phase": self.status, "weights": dict(self.gateway.weights), "spec_version": self.spec_version}
        return {"gateway": self.url, "gateway_port": self.sock.getsockname()[1] if self.sock else None,
                "owner": self.controller.owner, "controller_pid": os.getpid(), "spec_version": self.spec_version,
                "running_spec": self.spec.model_dump(mode="json") if self.spec_version else None,
                "applied": self.applied,
                "predictors": {n: {**h.describe(), "weight": self.gateway.weights.get(n, 0.0),
                                   "shadow": self.gateway.shadows.get(n, 0.0)} for n, h in self.hosts.items()},
                "rollout": rollout, "loop": self.loop.describe() if self.loop else None, **self.gateway.state()}

    async def write_state(self, force: bool = False) -> None:
        """Publish `describe()` on the deployment row (at most about once a second unless forced)."""
        now = time.monotonic()
        if not force and now - self.state_written < _STATE_EVERY:
            return
        self.state_written = now
        doc, status, reason = self.describe(), self.status, self.reason

        def write() -> None:
            with self.controller.workspace.db.session() as session:
                store.update_state(session, self.name, self.controller.owner, status, reason, doc)

        await asyncio.to_thread(write)
