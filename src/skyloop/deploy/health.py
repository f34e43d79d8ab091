"""A deployment's replicas coming and going: a dead host started again (with `restarts.Restarts` deciding when),
and the status Degraded while a predictor has no replica serving (or replicas waiting for room on Ray), Healthy
again once they serve."""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyloop.deploy.pools import Pool
from skyloop.deploy.rollout import Phase
from skyloop.errors import SkyloopError

if TYPE_CHECKING:
    from skyloop.deploy.replicas import ReplicaHost
    from skyloop.deploy.runner import DeploymentRunner

__all__ = ["check_serving", "restart_host"]


async def restart_host(self: DeploymentRunner, name: str, dead: ReplicaHost) -> None:
    """Start the replicas of `name` again in place of `dead`, its host that died (see `Restarts`), as the running
    spec version has them (`self.spec`: never a later one that failed to apply), serving the versions `dead`
    served (never one an alias moved to since: that one was never rolled out)."""
    failures, error = self.restarts.failures(name)
    why = f"{failures} start(s) in a row failed, the last: {error}" if failures else dead.exit_description()
    await self.event("replicas_restarted", f"{name}: {why}; starting it again")
    await self.stop_host(dead)  # whatever is left of it
    try:
        host = await self.new_host(self.spec.predictor(name), like=dead)
    except (SkyloopError, KeyError) as exc:  # KeyError: an apply removed the predictor meanwhile
        if self.hosts.get(name) is not dead:
            return
        wait = self.restarts.failed(name, str(exc))
        self.status, self.reason = Phase.DEGRADED.value, \
            f"{name}: its replicas died and did not start again: {exc}; next try in {wait:g}s"
        self.restart_reason = self.reason
        await self.event("restart_failed", self.reason)
        await self.write_state(force=True)
        return
    if self.hosts.get(name) is not dead:  # retired, or replaced by an apply, while this one started
        await self.stop_host(host)
        return
    pool = self.gateway.pools.setdefault(name, Pool(name))
    pool.endpoints, pool.version = list(host.endpoints), host.version
    self.hosts[name] = host
    failed = self.restarts.succeeded(name)
    if failed and self.status == Phase.DEGRADED.value and self.reason == self.restart_reason:
        self.status = Phase.HEALTHY.value if self.rollout is None else self.rollout.phase.value
        self.reason = f"{name}: its replicas started again after {failed} failed start(s)"
        await self.event("replicas_recovered", self.reason)
        await self.write_state(force=True)


async def check_serving(self: DeploymentRunner) -> None:
    """Degraded while a predictor has no replica serving (its host died, or Ray restarts its only actors) or
    has replicas waiting for room on its Ray cluster (a rolling update that found no room for all of them in
    time), and back once they serve: the status must not say Healthy while requests fail or capacity is short."""
    down = sorted(n for n, h in self.hosts.items() if n not in self.swapping and not (h.alive and h.endpoints))
    waiting = {n: h.pending for n, h in sorted(self.hosts.items())
               if n not in self.swapping and n not in down and h.alive and h.pending}
    short = down + [f"{n} ({k} waiting)" for n, k in waiting.items()]
    if short and short != self.down:
        reasons = [f"{', '.join(down)}: no replica serving; being restarted"] if down else []
        reasons += [f"{n}: {k} of {self.hosts[n].predictor.replicas} replica(s) wait for room on the Ray cluster "
                    f"({len(self.hosts[n].endpoints)} serve)" for n, k in waiting.items()]
        self.status = Phase.DEGRADED.value
        self.reason = self.down_reason = "; ".join(reasons)
        await self.event("replicas_down" if down else "replicas_waiting", self.reason)
        await self.write_state(force=True)
    elif down and self.status == Phase.DEGRADED.value and self.down_reason and self.reason.startswith(self.down_reason):
        why = "; ".join(f"{n}: {t}" for n in down if (t := self.hosts[n].trouble))  # why, once the host knows
        self.reason = self.down_reason + (f" ({why})" if why else "")
    elif not short and self.down and self.status == Phase.DEGRADED.value and self.down_reason \
            and self.reason.startswith(self.down_reason):
        self.status = Phase.HEALTHY.value if self.rollout is None else self.rollout.phase.value
        self.reason = f"{', '.join(n.split(' ')[0] for n in self.down)}: serving again"
        await self.event("replicas_recovered", self.reason)
        await self.write_state(force=True)
    self.down = short
