"""Reconciling a deployment to a spec version: which predictors start, and what becomes of its rollout.

`apply_version` starts a host for every predictor the spec version changed, beside the running ones. Only once
all of them serve does the version become the runner's (`runner.spec`, `runner.spec_version`). An apply that
fails leaves the last good version running, as Kubernetes keeps the old ReplicaSet while a new one cannot start:
its restarts, its rollout and the state written are that version's. The state names the spec it runs
(`running_spec`), so a controller that takes the deployment over starts that version again first (`restore`),
then applies the newer one, which may fail again without leaving the deployment serving nothing.

What becomes of the rollout:
- taken over at the spec version the last controller ran (a restart), it goes on where it stood (`Rollout.resume`);
- a spec version whose rollout has the same target, serving the same (its pinned graph), over the same live
  predictors carries it over (`Rollout.carry`): one in progress goes on, judged by the new analysis, when the
  `rollout:` section is unchanged; a finished one keeps its result, the winner at 100% and the loser stopped;
- otherwise a new rollout starts at its first step (none for a rolling update).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from skyloop.deploy.health import check_serving
from skyloop.deploy.replicas import ReplicaHost, pin_graph
from skyloop.deploy.rollout import Phase, Rollout
from skyloop.deploy.spec import DeploymentSpec, PredictorSpec, Strategy
from skyloop.errors import SkyloopError
from skyloop.serving.spec import GraphNode

if TYPE_CHECKING:
    from skyloop.deploy.runner import DeploymentRunner
    from skyloop.store.deployments import DeploymentInfo

__all__ = ["apply_version", "restore", "served"]

log = logging.getLogger("skyloop.deploy")


def shape(p: PredictorSpec) -> dict[str, Any]:
    """What a predictor is, apart from the traffic it takes."""
    return p.model_dump(mode="json", exclude={"traffic", "shadow"})


def served(graph: GraphNode) -> str:
    """A digest of a pinned graph: what a predictor serves."""
    return hashlib.sha256(graph.model_dump_json().encode()).hexdigest()[:16]


async def restore(runner: DeploymentRunner, info: DeploymentInfo) -> None:
    """Start again the spec version the controller before this one ran, when `info` is a later one (it failed to
    apply, or was not applied yet): with its rollout where it stood, before the later one is applied over it."""
    doc, version = runner.saved_state.get("running_spec"), runner.saved_state.get("spec_version")
    if not isinstance(doc, dict) or type(version) is not int or not 0 < version < info.spec_version:
        return
    try:
        await apply_version(runner, doc, version)
    except (ValidationError, SkyloopError) as exc:  # stored by a skyloop that checked less: the later one decides
        log.warning("%s: spec version %s, the last one run, cannot run again: %s", runner.name, version, exc)


async def apply_version(runner: DeploymentRunner, doc: dict[str, Any], version: int) -> None:
    """Drive the deployment to spec version `version` (`doc`); on failure the running version goes on."""
    old = runner.spec if runner.spec_version else None
    spec = DeploymentSpec.model_validate(doc)
    digest = await _target_digest(runner, spec)
    resumed = _resumed(runner, spec, version)
    if resumed is not None and not resumed.served:  # saved before `served` was
        resumed.served = digest
    carried = _carried(runner, old, spec, digest) if resumed is None else None
    kept = resumed or carried
    # A finished rollout left its loser (the target, or the old stable predictors) at 0%: it stays stopped.
    wanted = [p for p in spec.predictors
              if kept is None or not kept.done or kept.weights.get(p.name, 0) > 0 or p.shadow]
    changed = [p for p in wanted if p.name not in runner.hosts or old is None
               or p.name not in {q.name for q in old.predictors}
               or not await _serves_already(runner, spec, p, old.predictor(p.name))]
    runner.status, runner.reason = Phase.PROGRESSING.value, f"starting {len(changed)} predictor(s)"
    results = await asyncio.gather(*(runner.new_host(p, runner.hosts.get(p.name), spec) for p in changed),
                                   return_exceptions=True)
    failed = [(p, r) for p, r in zip(changed, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        for r in results:
            if isinstance(r, ReplicaHost):
                await runner.stop_host(r)
        runner.status = Phase.DEGRADED.value
        runner.reason = "; ".join(f"{p.name}: {r}" for p, r in failed)
        still = f"; spec version {runner.spec_version} goes on" if runner.spec_version else ""
        await runner.event("failed", f"spec version {version} not applied: {runner.reason}{still}", version=version)
        runner.applied, runner.not_applied = version, (version, runner.reason)
        await runner.write_state(force=True)
        return
    runner.spec, runner.spec_version = spec, version  # every new host serves: this version is the one that runs
    hosts = {p.name: r for p, r in zip(changed, results, strict=True) if isinstance(r, ReplicaHost)}
    # New predictors get their pools first, then the traffic split changes, and only then are running
    # predictors replaced (rolling): a replaced predictor never takes traffic the new split denies it.
    for name in [n for n in hosts if n not in runner.hosts]:
        await runner.swap(name, hosts.pop(name))
    gone = [n for n in runner.hosts if n not in {p.name for p in wanted}]
    _start_traffic(runner, resumed, carried, digest)
    for name, host in hosts.items():
        await runner.swap(name, host)
    for name in gone:
        await runner.retire(name)  # the apply is a task of its own: it may wait for the drain
    await runner.start_loop(old)
    runner.reason = f"spec version {version} applied ({len(changed)} predictor(s) started): {runner.split_text()}"
    if kept is not None and runner.rollout is not None:
        runner.reason += f"; {_kept_text(runner, runner.rollout)}"
    if runner.rollout is None:
        runner.status = Phase.HEALTHY.value
    elif runner.rollout.step >= 0:  # a rollout that goes on (or ended): its phase, not "starting"
        runner.status = runner.rollout.phase.value
    await runner.event("reconciled", runner.reason)
    if runner.rollout is not None and runner.rollout.step < 0:
        await runner.transitions(runner.rollout.start(time.monotonic()))
    runner.down = []  # the status was just set: what does not serve in full says so again (replicas waiting for room)
    await check_serving(runner)
    runner.applied = version
    await runner.write_state(force=True)


async def _target_digest(runner: DeploymentRunner, spec: DeploymentSpec) -> str:
    """What the rollout's target of `spec` would serve now ("" without a rollout, or when it cannot be pinned)."""
    target = spec.rollout.target
    if spec.rollout.strategy is Strategy.ROLLING or not target:
        return ""
    try:
        graph, _ = await asyncio.to_thread(pin_graph, spec.predictor(target).node(), spec.base_dir, runner.resolve)
    except (SkyloopError, KeyError):  # its start fails, and says why
        return ""
    return served(graph)


async def _serves_already(runner: DeploymentRunner, spec: DeploymentSpec, new: PredictorSpec,
                          old: PredictorSpec) -> bool:
    """Whether the running host of `old` already serves what `new` asks for (e.g. `@champion` -> the same
    pinned version): then nothing restarts. An unchanged predictor naming an alias is pinned again: the spec
    was applied again because the alias moved (`deploy.api._moved_aliases`)."""
    host = runner.hosts.get(new.name)
    if shape(new) == shape(old) and (host is None or not any("@" in u for u in new.registered_models())):
        return True
    fields = ("replicas", "resources", "batching")
    if host is None or any(getattr(new, f) != getattr(old, f) for f in fields):
        return False
    try:
        graph, _ = await asyncio.to_thread(pin_graph, new.node(), spec.base_dir, runner.resolve)
    except SkyloopError:
        return False
    return graph == host.graph


def _resumed(runner: DeploymentRunner, spec: DeploymentSpec, version: int) -> Rollout | None:
    """The rollout the controller before this one left at this spec version (None: start afresh)."""
    saved = runner.saved_state.get("rollout") or {}
    runner.saved_state = {}
    # Only a canary or blue-green rollout is resumed. The split of a rolling update or a bandit router is the
    # spec's (a bandit's arms have no `traffic` at all); a bandit's learning is seeded when the runner is made.
    if spec.rollout.strategy is Strategy.ROLLING or saved.get("spec_version") != version \
            or "target" not in saved:  # no rollout had begun (e.g. the spec version failed to apply)
        return None
    resumed = Rollout.resume(spec, saved, time.monotonic())
    if resumed is None:
        log.warning("%s: the saved rollout does not fit spec version %s; starting it afresh", runner.name, version)
    return resumed


def _carried(runner: DeploymentRunner, old: DeploymentSpec | None, spec: DeploymentSpec,
             digest: str) -> Rollout | None:
    """The running rollout carried over to `spec` (None: `spec` starts its own); see the module's docstring."""
    previous = runner.rollout
    if old is None or previous is None or not digest or previous.served != digest:
        return None
    return Rollout.carry(spec, previous, time.monotonic())


def _start_traffic(runner: DeploymentRunner, resumed: Rollout | None, carried: Rollout | None, digest: str) -> None:
    spec = runner.spec
    shadows = runner.spec_shadows(spec)
    kept = carried
    if resumed is not None:
        # Taken up again from the same point, now: the step's clock stood still while the predictors started.
        kept = Rollout.resume(spec, resumed.saved(resumed.last_check), time.monotonic()) or resumed
    if kept is not None:
        runner.rollout = kept
        runner.gateway.set_weights({k: v for k, v in kept.weights.items() if k in runner.hosts},
                                   {**shadows, **kept.mirrors})
    elif spec.rollout.strategy is Strategy.ROLLING:
        runner.rollout = None
        runner.gateway.set_weights(runner.spec_weights(spec), shadows)
    else:
        runner.rollout = Rollout(spec, time.monotonic(), served=digest)
        runner.gateway.set_weights(runner.rollout.weights, shadows)


def _kept_text(runner: DeploymentRunner, rollout: Rollout) -> str:
    if rollout.done:
        return f"the rollout of {rollout.target} had ended {rollout.phase.value}"
    steps = len(runner.spec.rollout.steps)
    where = "its preview" if runner.spec.rollout.strategy is Strategy.BLUE_GREEN else \
        f"step {rollout.step + 1}/{steps}"
    return f"the rollout of {rollout.target} goes on at {where} ({rollout.phase.value}, " \
           f"{time.monotonic() - rollout.step_started:.0f}s in, {rollout.failures} failed check(s))"
