"""Deployments from Python and the CLI: apply a spec, make sure a controller runs it, read status and history.

    from skyloop.deploy import apply_deployment
    info = apply_deployment("iris.yaml", settings)      # returns once the spec version is in effect
    print(info.state["gateway"])                        # http://127.0.0.1:PORT, serving /v2/models/iris/infer

`apply` writes the spec to the DB (a new version only when it changed) and returns once a controller has
acted on it. When no controller holds a live lease, one is started as a detached process that exits when
no deployment is left; its log is `<home>/deployments/controller.log`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyloop.config import Settings
from skyloop.deploy.rollout import Phase
from skyloop.deploy.spec import DeploymentSpec, Strategy, load_deployment_spec
from skyloop.errors import BackendError, Conflict, ModelLoadError, NotFound, SpecError
from skyloop.store import deployments as store
from skyloop.store.runs import db_now, owner_is_dead
from skyloop.store.workspace import Workspace

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from skyloop.registry.registry import ModelVersionInfo

__all__ = ["apply_deployment", "controller_alive", "delete_deployment", "no_rollout", "send_command",
           "start_controller", "wait_for"]


def _check_models(workspace: Workspace, spec: DeploymentSpec) -> None:
    """Refuse, before anything is recorded, a model the replicas could not load: a registered model that
    does not resolve, or a model folder (any other `model_uri`) without its `model.yaml`."""
    from skyloop.registry.package import read_manifest
    from skyloop.registry.registry import resolve
    from skyloop.registry.uri import parse_model_ref

    with workspace.db.read() as session:
        for predictor in spec.predictors:
            for uri in predictor.registered_models():
                try:
                    info = resolve(session, parse_model_ref(uri))
                except NotFound as exc:
                    raise SpecError(f"predictor {predictor.name!r}: {exc}") from None
                _check_drift_features(workspace, spec, info)
    def code_file(module: str) -> Path:
        return Path(module) if Path(module).is_absolute() or spec.base_dir is None else spec.base_dir / module

    retrain = spec.loop.retrain if spec.loop is not None else None
    module = retrain.pipeline.rpartition(":")[0] if retrain is not None else ""
    if module.endswith(".py") and not code_file(module).is_file():  # else found only when the loop fires
        raise SpecError(f"loop.retrain.pipeline: file {str(code_file(module))!r} does not exist; give "
                        "FILE.py:PIPELINE relative to the spec's folder")
    for predictor in spec.predictors:
        for node in predictor.node().walk():
            module = (node.implementation or "").rpartition(":")[0]
            if module.endswith(".py") and not code_file(module).is_file():
                raise SpecError(f"predictor {predictor.name!r}: node {node.name!r}: implementation file "
                                f"{str(code_file(module))!r} does not exist; give FILE.py:CLASS relative to the "
                                "spec's folder")
            if node.model_uri is None or node.model_uri.startswith("models:/"):
                continue
            folder = Path(node.model_uri)
            if not folder.is_absolute() and spec.base_dir is not None:
                folder = spec.base_dir / folder
            try:
                read_manifest(folder)
            except ModelLoadError as exc:
                raise SpecError(f"predictor {predictor.name!r}: model_uri {node.model_uri!r}: {exc}; give a "
                                "registered model (models:/NAME@ALIAS) or a model folder with its model.yaml") from None


def _check_drift_features(workspace: Workspace, spec: DeploymentSpec, info: ModelVersionInfo) -> None:
    """Refuse drift tests of features the model's stored reference lacks: the loop could never measure them."""
    from skyloop.registry.api import REFERENCE

    named = spec.loop.drift.tests.features if spec.loop is not None else {}
    digest = info.files.get(REFERENCE)
    if not named or digest is None:
        return
    import io

    import pyarrow.parquet as pq

    columns = [str(c) for c in pq.read_schema(io.BytesIO(workspace.store.get_bytes(digest))).names
               if not str(c).startswith("__index_level_")]
    unknown = sorted(set(named) - set(columns))
    if unknown:
        raise SpecError(f"loop.drift.tests.features: {', '.join(map(repr, unknown))} not among the features of the "
                        f"reference stored with models:/{info.name}/{info.version} ({', '.join(columns)}); name "
                        "features from that list")


def controller_alive(workspace: Workspace) -> bool:
    """Whether some deployment is held by a controller whose lease is current and whose process lives."""
    _reap_started()
    with workspace.db.read() as session:
        now = db_now(session)
        return any(d.controller and d.lease_expires_at and d.lease_expires_at > now
                   and not owner_is_dead(d.controller) for d in store.list_deployments(session))


_started: list[subprocess.Popen[bytes]] = []
"""Controllers this process started: kept (a Popen dropped while its process runs warns) and reaped once they end
(a zombie would pass for a live controller to `owner_is_dead`)."""


def _reap_started() -> None:
    _started[:] = [proc for proc in _started if proc.poll() is None]


def start_controller(settings: Settings) -> subprocess.Popen[bytes]:
    """Start `skyloop deploy controller --exit-when-idle` detached from this process."""
    _reap_started()
    folder = settings.home / "deployments"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SKYLOOP_DB_URL": settings.resolved_db_url,
           "SKYLOOP_ARTIFACTS_URL": settings.resolved_artifacts_url}
    argv = [sys.executable, "-m", "skyloop", "--home", str(settings.home), "deploy", "controller", "--exit-when-idle"]
    with open(folder / "controller.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    _started.append(proc)
    return proc


def wait_for(workspace: Workspace, name: str, done: Callable[[store.DeploymentInfo, list[store.DeploymentEvent]],
                                                              bool], timeout: float, what: str) -> store.DeploymentInfo:
    """Poll the deployment until `done(info, events)`; BackendError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with workspace.db.read() as session:
            info = store.get_deployment(session, name)
            events = store.deployment_history(session, name, limit=50)
        if done(info, events):
            return info
        if time.monotonic() > deadline:
            log = workspace.settings.home / "deployments" / "controller.log"
            raise BackendError(f"deployment {name!r}: {what} did not happen within {timeout:g}s (status "
                               f"{info.status}: {info.reason}); see {log}")
        time.sleep(0.2)


def apply_deployment(source: str | Path | dict[str, Any] | DeploymentSpec, settings: Settings, wait: bool = True,
                     timeout: float = 300.0, start: bool = True) -> store.DeploymentInfo:
    """Record a deployment spec; with `wait`, return once a controller has applied it (or failed to)."""
    spec = source if isinstance(source, DeploymentSpec) else load_deployment_spec(source)
    workspace = Workspace.open(settings)
    try:
        _check_models(workspace, spec)
        with workspace.db.session() as session:
            document = spec.model_dump(mode="json")
            version, changed = store.apply_deployment(session, spec.name, document)
            moved = [] if changed else _moved_aliases(session, spec, store.get_deployment(session, spec.name))
            if moved:  # the same text, other versions: applied again, as `kubectl rollout restart` would
                version, _ = store.apply_deployment(session, spec.name, document,
                                                    why="aliases moved: " + "; ".join(moved))
        if start and not controller_alive(workspace):
            start_controller(settings)
        if not wait:
            with workspace.db.read() as session:
                return store.get_deployment(session, spec.name)

        def applied(info: store.DeploymentInfo, events: list[store.DeploymentEvent]) -> bool:
            # Acted on by the controller holding it now (not a stale view left by one that stopped), and that one
            # still lives: one killed moments ago still holds its lease, and its state says it applied this
            # version (the same spec applied again), while nothing serves until the next controller takes over.
            if info.controller is None or info.state.get("owner") != info.controller \
                    or info.state.get("applied") != version:
                return False
            _reap_started()  # a controller this process started and that died since is a zombie until reaped
            return not owner_is_dead(info.controller)

        info = wait_for(workspace, spec.name, applied, timeout, f"applying spec version {version}")
        with workspace.db.read() as session:
            events = [e for e in store.deployment_history(session, spec.name) if e.spec_version == version
                      and e.kind in ("failed", "reconciled")]
        if events and events[-1].kind == "failed":
            raise BackendError(f"deployment {spec.name!r}: {events[-1].reason}")
        return info
    finally:
        workspace.close()


def _moved_aliases(session: Session, spec: DeploymentSpec, info: store.DeploymentInfo) -> list[str]:
    """The predictors of `spec` whose registry aliases now name other versions than they serve: a spec applied
    again unchanged after `skyloop models alias` moved one is meant to serve the version it names now."""
    from skyloop.registry.registry import resolve
    from skyloop.registry.uri import parse_model_ref

    moved = []
    served = info.state.get("predictors") or {}
    for predictor in spec.predictors:
        uris = predictor.registered_models()
        version = (served.get(predictor.name) or {}).get("version")
        if not version or not any("@" in uri for uri in uris):
            continue
        named = sorted(f"{i.name}/{i.version}" for i in (resolve(session, parse_model_ref(u)) for u in uris))
        if named != sorted(v for v in str(version).split(",") if "/" in v):
            moved.append(f"{predictor.name}: {version} -> {','.join(named)}")
    return moved


def no_rollout(info: store.DeploymentInfo) -> str | None:
    """Why a `promote` or `rollback` has nothing to act on in `info` (None: a rollout is in progress, or is
    about to start from a spec version the controller has not applied yet, and the command waits for it)."""
    if info.desired == "deleted":
        return f"deployment {info.name!r} is being deleted; it has no rollout to promote or roll back"
    rollout = info.state.get("rollout") or {}
    if rollout.get("phase") in (Phase.PROGRESSING, Phase.PAUSED):
        return None
    rolling = DeploymentSpec.model_validate(info.spec).rollout.strategy is Strategy.ROLLING
    if not rolling and int(info.state.get("applied") or 0) < info.spec_version:
        return None
    status = f"{info.status}: {info.reason}" if info.reason else info.status
    if rolling:
        return (f"deployment {info.name!r} has no rollout in progress (its status is {status}): its rollout "
                "strategy is rolling, which replaces replicas with no steps to promote or roll back; `skyloop deploy "
                "apply` a spec with a canary or blue_green rollout to start one")
    return (f"deployment {info.name!r} has no rollout in progress (its status is {status}); `skyloop deploy apply` "
            "a changed spec to start a new one")


def send_command(settings: Settings, name: str, command: str) -> None:
    """Queue `promote`, `promote_full` or `rollback` for the deployment's rollout.

    Raises `NotFound` for an unknown deployment and `Conflict` when it has no rollout in progress (`no_rollout`).
    A rollout that ends before the controller takes the command (it finished its last step, or rolled back on
    its own) leaves it ignored, as a `command_ignored` event in the deployment's history."""
    if command not in store.COMMANDS:
        raise SpecError(f"unknown deployment command {command!r}; use one of {', '.join(store.COMMANDS)}")
    workspace = Workspace.open(settings)
    try:
        # One write transaction: the controller's view read here is still current when the command is queued.
        with workspace.db.session() as session:
            refusal = no_rollout(store.get_deployment(session, name))
            if refusal is not None:
                raise Conflict(refusal)
            store.queue_command(session, name, command)
    finally:
        workspace.close()


def delete_deployment(settings: Settings, name: str, wait: bool = True, timeout: float = 60.0) -> None:
    """Stop a deployment's gateway and replicas and remove it (its history stays)."""
    workspace = Workspace.open(settings)
    try:
        alive = controller_alive(workspace)
        with workspace.db.session() as session:
            store.delete_deployment(session, name)
            if not alive:  # nothing runs it: nothing to stop
                info = store.get_deployment(session, name)
                store.record_event(session, name, info.spec_version, "stopped", "Stopped",
                                   reason="deployment deleted (no controller was running it)")
                store.release_deployment(session, name, info.controller or "")
                store.drop_deployment(session, name, None)
                return
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with workspace.db.read() as session:
                try:
                    store.get_deployment(session, name)
                except NotFound:
                    return
            time.sleep(0.2)
        raise BackendError(f"deployment {name!r} was not stopped within {timeout:g}s; is its controller running?")
    finally:
        workspace.close()
