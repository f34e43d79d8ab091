"""The deployment controller: claims deployments from the DB and drives replicas, gateway and rollout.

One process (`skyloop deploy controller`, started by `skyloop deploy apply` when none is running) holds a
lease on each deployment it runs, like an agent holds a run, and drives each with a `runner.DeploymentRunner`:
every tick it claims deployments, hands out the commands queued for them, and ticks each runner that is
not busy applying a spec version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from pydantic import ValidationError

from skyloop.config import Settings
from skyloop.deploy.restarts import Restarts
from skyloop.deploy.rollout import Phase
from skyloop.deploy.runner import DeploymentRunner
from skyloop.errors import SkyloopError
from skyloop.spec.files import format_validation
from skyloop.store import deployments as store
from skyloop.store.runs import process_owner
from skyloop.store.workspace import Workspace

__all__ = ["Controller", "DeploymentRunner"]

log = logging.getLogger("skyloop.deploy")

LEASE_SECONDS = 10.0
_CLAIM_EVERY = 1.0
_GATEWAY_MAX_WAIT = 15.0
"""The longest wait between two tries of a gateway whose port is held by another process."""

class Controller:
    """Runs every deployment it can claim until stopped (or, with `exit_when_idle`, until none is left)."""

    def __init__(self, settings: Settings, exit_when_idle: bool = False, tick_seconds: float = 0.1,
                 parent: int | None = None) -> None:
        self.settings = settings
        self.exit_when_idle = exit_when_idle
        self.parent = parent
        """Stop (as on SIGTERM) once this process's parent is no longer this pid: its starter died."""
        self.tick_seconds = tick_seconds
        self.owner = process_owner()
        self.workspace = Workspace.open(settings)
        self.runners: dict[str, DeploymentRunner] = {}
        self.refused: set[tuple[str, int]] = set()
        """(deployment, spec version)s whose stored spec this controller cannot run (reported once)."""
        self.unbound = Restarts(max_wait=_GATEWAY_MAX_WAIT)
        """Deployments whose gateway could not listen on its port (held by another process): `start` is tried
        again, backing off, with a new runner each time (the spec may have changed meanwhile)."""
        self.stopping = asyncio.Event()

    def _claim(self) -> list[store.DeploymentInfo]:
        with self.workspace.db.session() as session:
            names = store.claim_deployments(session, self.owner, LEASE_SECONDS)
            return [store.get_deployment(session, n) for n in names]

    def _commands(self, names: list[str]) -> dict[str, list[str]]:
        with self.workspace.db.read() as session:  # polled every tick: write only when there is something
            pending = store.pending_commands(session, names)
        if not pending:
            return {}
        with self.workspace.db.session() as session:
            return {n: store.take_commands(session, n) for n in pending}

    async def run(self) -> None:
        """The control loop."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():  # embedded in a thread: the host stops us
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        claimed_at = 0.0
        infos: list[store.DeploymentInfo] = []
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now - claimed_at >= _CLAIM_EVERY:
                    claimed_at = now
                    infos = await asyncio.to_thread(self._claim)
                    await self._reconcile(infos)
                    if self.exit_when_idle and not infos and not self.runners:
                        break
                    if self.parent is not None and os.getppid() != self.parent:
                        log.warning("the process that started this controller (%d) is gone; stopping", self.parent)
                        break
                ready = [r for r in self.runners.values() if r.busy is None or r.busy.done()]
                for runner in [r for r in self.runners.values() if r not in ready]:
                    try:  # an apply in flight must not keep a restarted replica out of its pool, nor hide it
                        await runner.refresh_hosts()
                        await runner.write_state()  # the apply's progress, and replicas as they are (about 1/s)
                    except Exception:
                        log.exception("deployment %s: refreshing replicas failed", runner.name)
                commands = await asyncio.to_thread(self._commands, [r.name for r in ready]) if ready else {}
                for runner in ready:
                    try:
                        await runner.tick(commands.get(runner.name, []))
                    except Exception:
                        log.exception("deployment %s: tick failed", runner.name)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.tick_seconds)
        finally:
            await asyncio.gather(*(r.stop() for r in self.runners.values()), return_exceptions=True)
            await asyncio.to_thread(self._release)
            self.workspace.close()
            if (ray_hosts := sys.modules.get("skyloop.deploy.ray_replicas")) is not None:
                await asyncio.to_thread(ray_hosts.shutdown_ray)

    async def _reconcile(self, infos: list[store.DeploymentInfo]) -> None:
        held = {i.name: i for i in infos}
        for name in [n for n in self.runners if n not in held]:
            await self.runners.pop(name).stop()  # another controller took it over
        for info in infos:
            runner = self.runners.get(info.name)
            if info.desired == "deleted":  # an apply in flight is cancelled: a deletion does not wait for it
                if runner is not None:
                    await self.runners.pop(info.name).stop()
                await asyncio.to_thread(self._drop, info)
                self.unbound.succeeded(info.name)
            elif runner is not None and runner.busy is not None and not runner.busy.done():
                continue
            elif runner is None or runner.sock is None:  # never started, or its gateway could not listen
                if runner is not None:
                    await self.runners.pop(info.name).stop()
                if not self.unbound.due(info.name):
                    continue
                try:
                    runner = DeploymentRunner(self, info)
                except (ValidationError, SkyloopError) as exc:  # stored by a skyloop that checked less
                    if (info.name, info.spec_version) not in self.refused:
                        self.refused.add((info.name, info.spec_version))
                        await asyncio.to_thread(self._refuse, info, exc)
                    continue
                self.runners[info.name] = runner
                runner.busy = asyncio.create_task(self._guard(runner, runner.start(info), info.spec_version))
            elif info.spec_version != runner.applied:  # `spec_version` stays the running one when an apply fails
                runner.busy = asyncio.create_task(self._guard(runner, runner.apply(info), info.spec_version))

    async def _guard(self, runner: DeploymentRunner, work: Any, version: int) -> None:
        try:
            await work
        except Exception as exc:
            runner.status, runner.reason = Phase.DEGRADED.value, f"{type(exc).__name__}: {exc}"
            report = True
            if runner.sock is None:  # the gateway could not listen: the next claim starts it again, later
                before = self.unbound.failures(runner.name)[1]
                wait = self.unbound.failed(runner.name, f"{version}: {runner.reason}")
                report = before != f"{version}: {runner.reason}"  # one event for a port held for long, not one a try
                runner.reason = f"the gateway cannot start: {runner.reason}; trying again in {wait:g}s"
                runner.applied = max(runner.applied, version)  # acted on: `deploy apply` reports the failure
                log.warning("deployment %s: %s", runner.name, runner.reason)
            else:
                log.exception("deployment %s failed", runner.name)
            with contextlib.suppress(Exception):
                if report:
                    await runner.event("failed", runner.reason, version=version)
                await runner.write_state(force=True)
        else:
            if runner.sock is not None and self.unbound.succeeded(runner.name):
                await runner.event("gateway_started", f"the gateway listens on {runner.url} (its port was held before)")

    def _refuse(self, info: store.DeploymentInfo, exc: Exception) -> None:
        why = format_validation(exc, "deployment spec") if isinstance(exc, ValidationError) else str(exc)
        reason = f"spec version {info.spec_version} cannot run: {why}; apply a corrected spec"
        log.error("deployment %s: %s", info.name, reason)
        with self.workspace.db.session() as session:
            store.update_state(session, info.name, self.owner, Phase.DEGRADED.value, reason, info.state)
            store.record_event(session, info.name, info.spec_version, "failed", Phase.DEGRADED.value, reason=reason)

    def _drop(self, info: store.DeploymentInfo) -> None:
        with self.workspace.db.session() as session:
            if store.drop_deployment(session, info.name, self.owner):  # else applied again meanwhile: started next
                store.record_event(session, info.name, info.spec_version, "stopped", "Stopped",
                                   reason="deployment deleted; replicas stopped")

    def _release(self) -> None:
        with contextlib.suppress(Exception), self.workspace.db.session() as session:
            for name in self.runners:
                store.release_deployment(session, name, self.owner)
