"""Liveness probes of a deployment's replicas: a replica that hangs (stopped, deadlocked, a native loop holding
the GIL) is taken out of the gateway's pool and killed, so that its host starts another.

A dead replica is seen by its host (a worker that exits, a Ray actor that dies); one that hangs is not: its
port still accepts connections, and requests sent there wait for the gateway's client timeout. So the controller
asks each replica `GET /v2/health/live`, as a Kubernetes liveness probe does: `FAILURES` probes in a row
unanswered within `PROBE_TIMEOUT` mark it hung. It is drained at once (`Endpoint.draining`: the gateway sends it
nothing new), an event `replica_hung` says which and for how long, the status is Degraded, and the replica is
killed (`ReplicaHost.kill_replica`: SIGKILL of its worker, which the `skyloop serve` parent replaces; a Ray actor
killed, which its host replaces). Once it answers again, it takes traffic again (`replica_recovered`).

A replica busy with a long batch still answers: its event loop answers health while predictions run in the
data plane's threads. The probes run in a task of their own: the control loop never waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from skyloop.deploy.pools import Endpoint
from skyloop.deploy.rollout import Phase

if TYPE_CHECKING:
    from skyloop.deploy.replicas import ReplicaHost
    from skyloop.deploy.runner import DeploymentRunner

__all__ = ["FAILURES", "PROBE_EVERY", "PROBE_TIMEOUT", "Liveness"]

log = logging.getLogger("skyloop.deploy")

PROBE_EVERY = 1.0
"""Seconds between the starts of two rounds of liveness probes (a round still waiting is not repeated)."""
PROBE_TIMEOUT = 1.0
"""Seconds a replica has to answer `GET /v2/health/live` before the probe counts as failed (Kubernetes' default)."""
FAILURES = 3
"""Failed probes in a row that mark a replica hung (then it is drained and killed)."""
LATE = 1.0
"""Seconds past `PROBE_TIMEOUT` after which a round counts only its answers, not its failures: the controller's
own loop was held up (a slow DB write, a busy machine), and a timeout then says nothing of the replicas."""


@dataclass
class _Replica:
    """What the probes know of one replica of a host."""

    failures: int = 0
    since: float = 0.0
    """When the first failed probe of the current run began."""
    hung: bool = False
    drained: Endpoint | None = None
    """The endpoint the probes drained (theirs to put back once it answers)."""


class Liveness:
    """The liveness probes of one deployment's replicas (`tick` from the runner's tick)."""

    def __init__(self, runner: DeploymentRunner) -> None:
        self.runner = runner
        self.replicas: dict[tuple[ReplicaHost, int], _Replica] = {}
        self.running: asyncio.Task[dict[Endpoint, bool]] | None = None
        self.probed: list[tuple[str, ReplicaHost, Endpoint, float]] = []
        self.next_at = 0.0
        self.reason = ""
        """The status reason the probes set (taken back once the hung replicas answer again)."""
        self.named = ""
        """The hung replicas `reason` names."""
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # a new connection each time: a kept one to a killed replica would fail once
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0),
                                                  timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def _probe(self, endpoint: Endpoint) -> bool:
        try:
            async with self._client().get(endpoint.url + "/v2/health/live") as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _round(self, endpoints: list[Endpoint]) -> dict[Endpoint, bool]:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        answers = dict(zip(endpoints, await asyncio.gather(*(self._probe(e) for e in endpoints)), strict=True))
        if loop.time() - begun > PROBE_TIMEOUT + LATE:  # this loop was late, not (only) the replicas
            return {endpoint: True for endpoint, live in answers.items() if live}
        return answers

    async def tick(self) -> None:
        """Take in the last round's answers (acting on hung and recovered replicas), start the next when due."""
        runner, now = self.runner, time.monotonic()
        if self.running is not None:
            if not self.running.done():
                return
            done, self.running = self.running, None
            try:
                answers = done.result()
            except Exception:  # never expected: a probe's failure is an answer
                log.exception("%s: liveness probes failed", runner.name)
                answers = {}
            events = [e for name, host, endpoint, begun in self.probed
                      if endpoint in answers and runner.hosts.get(name) is host and name not in runner.swapping
                      and (e := await self._answered(name, host, endpoint, answers[endpoint], begun))]
            await self._status()  # the status the events record
            for kind, reason in events:
                await runner.event(kind, reason)
        hosts = {h for n, h in runner.hosts.items() if n not in runner.swapping}
        self.replicas = {k: v for k, v in self.replicas.items() if k[0] in hosts}
        if now < self.next_at:
            return
        self.next_at = now + PROBE_EVERY
        self.probed = [(n, h, e, now) for n, h in runner.hosts.items() if n not in runner.swapping and h.alive
                       for e in h.endpoints]
        if self.probed:
            endpoints = [e for _, _, e, _ in self.probed]
            self.running = asyncio.create_task(self._round(endpoints), name=f"liveness {runner.name}")

    async def _answered(self, name: str, host: ReplicaHost, endpoint: Endpoint, live: bool,
                        begun: float) -> tuple[str, str] | None:
        """Act on one probe's answer; returns the event to record, if any."""
        state = self.replicas.setdefault((host, endpoint.index), _Replica())
        if live:
            self.replicas[(host, endpoint.index)] = _Replica()
            if not state.hung:
                return None
            if state.drained is endpoint and endpoint in host.endpoints:
                endpoint.draining = False
            return "replica_recovered", f"{name}: replica {endpoint.index} answers /v2/health/live again and " \
                                        "takes traffic again"
        if not state.failures:
            state.since = begun
        state.failures += 1
        if state.failures < FAILURES:
            return None
        hung_for = time.monotonic() - state.since
        state.failures = 0  # a replica that stays hung is killed again after as many failed probes
        state.since = 0.0
        if not endpoint.draining:
            endpoint.draining = True  # nothing new for it; what it has in flight fails over once it is killed
            state.drained = endpoint
        first, state.hung = not state.hung, True
        pid = await host.kill_replica(endpoint.index)
        what = f"replica {endpoint.index}" + (f" (pid {pid})" if pid else "")
        return "replica_hung", f"{name}: {what} did not answer /v2/health/live for {hung_for:.0f}s ({FAILURES} " \
                               f"probes in a row, {PROBE_TIMEOUT:g}s each): " \
                               + ("taken out of the gateway's pool and " if first else "still hung: ") \
                               + "killed; a new one takes its place"

    def hung(self) -> list[str]:
        """`predictor: replica N` of every replica hung now."""
        names = {h: n for n, h in self.runner.hosts.items()}
        hung = [(h, i) for (h, i), s in self.replicas.items() if s.hung and h in names]
        for h, i in hung:  # one a rolling update stopped meanwhile is not waited for
            if i not in {r["index"] for r in h.replicas()}:
                del self.replicas[(h, i)]
        return sorted(f"{names[h]}: replica {i}" for h, i in hung if (h, i) in self.replicas)

    async def _status(self) -> None:
        """Degraded while a replica hangs, naming it; back once every hung replica answers again."""
        runner, hung = self.runner, self.hung()
        if hung:
            reason = f"{', '.join(hung)}: hung (no answer to /v2/health/live); killed, being restarted"
            if reason != self.reason and (runner.status != Phase.DEGRADED.value or not runner.reason
                                          or runner.reason == self.reason):
                runner.status, runner.reason = Phase.DEGRADED.value, reason
                self.reason, self.named = reason, ", ".join(hung)
                await runner.write_state(force=True)
        elif self.reason:
            if runner.status == Phase.DEGRADED.value and runner.reason == self.reason:
                runner.status = Phase.HEALTHY.value if runner.rollout is None else runner.rollout.phase.value
                runner.reason = f"{self.named}: hung, killed, and serving again"
                await runner.write_state(force=True)
            self.reason = ""

    async def close(self) -> None:
        """Stop the round in flight and close the probes' connections."""
        if self.running is not None:
            self.running.cancel()
            await asyncio.wait([self.running])
            self.running = None
        if self._session is not None:
            await self._session.close()
            self._session = None
