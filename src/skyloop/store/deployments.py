"""Deployments in the metadata DB: the desired spec, the controller's lease and view, transitions, commands.

`skyloop deploy apply` writes a spec version and returns; a controller claims the deployment with a lease
(like an agent claims a run), drives replicas and traffic toward the spec, and writes each transition as
a `deployment_events` row before acting on it, so `skyloop deploy history` explains every change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from skyloop.errors import Conflict, NotFound, SpecError
from skyloop.store.models import DeploymentCommandRow, DeploymentEventRow, DeploymentRow
from skyloop.store.runs import db_now, owner_is_dead, utcnow

__all__ = [
    "COMMANDS",
    "DeploymentEvent",
    "DeploymentInfo",
    "apply_deployment",
    "claim_deployments",
    "delete_deployment",
    "deployment_history",
    "drop_deployment",
    "get_deployment",
    "last_event_times",
    "list_deployments",
    "pending_commands",
    "queue_command",
    "record_event",
    "release_deployment",
    "take_commands",
    "update_state",
]

COMMANDS = ("promote", "promote_full", "rollback")


@dataclass(frozen=True)
class DeploymentInfo:
    """A deployment row, detached from its session."""

    name: str
    spec: dict[str, Any]
    spec_version: int
    desired: str
    status: str
    reason: str
    state: dict[str, Any]
    controller: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (`deploy status --json`)."""
        doc = asdict(self)
        for key in ("lease_expires_at", "created_at", "updated_at"):
            doc[key] = doc[key].isoformat() if doc[key] else None
        return doc


@dataclass(frozen=True)
class DeploymentEvent:
    """One transition: what changed, the traffic and versions after it, and the figures behind it."""

    id: int
    deployment: str
    spec_version: int
    at: datetime
    kind: str
    status: str
    step: int | None
    weights: dict[str, Any]
    versions: dict[str, Any]
    metrics: dict[str, Any] | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (`deploy history --json`)."""
        return {**asdict(self), "at": self.at.isoformat()}


def _info(row: DeploymentRow) -> DeploymentInfo:
    return DeploymentInfo(row.name, row.spec, row.spec_version, row.desired, row.status, row.reason, row.state or {},
                          row.controller, row.lease_expires_at, row.created_at, row.updated_at)


def _row(session: Session, name: str) -> DeploymentRow:
    row = session.get(DeploymentRow, name)
    if row is None:
        raise NotFound(f"no deployment {name!r}; `skyloop deploy status` lists them, `skyloop deploy apply FILE` "
                       "creates one")
    return row


def apply_deployment(session: Session, name: str, spec: dict[str, Any], why: str | None = None,
                     over: int | None = None) -> tuple[int, bool]:
    """Record `spec` as the desired state of `name`; returns (spec version, whether it changed). With `why`, a
    spec equal to the one recorded makes a new version all the same (its aliases now name other versions).
    With `over`, only over that spec version (`Conflict` if another was recorded since, or the deployment was
    deleted): a change computed from version `over` never overwrites one made after it."""
    now = utcnow()
    row = session.get(DeploymentRow, name, with_for_update=over is not None)
    if over is not None and (row is None or row.spec_version != over or row.desired != "running"):
        now_at = "deleted" if row is None or row.desired != "running" else f"at spec version {row.spec_version}"
        raise Conflict(f"deployment {name!r} is {now_at}, no longer at spec version {over}")
    if row is None:
        session.add(DeploymentRow(name=name, spec=spec, spec_version=1, desired="running", status="Pending",
                                  reason="waiting for a controller", state={}, created_at=now, updated_at=now))
        session.flush()
        record_event(session, name, 1, "applied", "Pending", reason="spec version 1 applied")
        return 1, True
    if row.spec == spec and row.desired == "running" and why is None:
        return row.spec_version, False
    row.spec, row.spec_version, row.desired, row.updated_at = spec, row.spec_version + 1, "running", now
    record_event(session, name, row.spec_version, "applied", row.status,
                 reason=f"spec version {row.spec_version} applied" + (f" ({why})" if why else ""))
    return row.spec_version, True


def get_deployment(session: Session, name: str) -> DeploymentInfo:
    """The deployment called `name` (NotFound if there is none)."""
    return _info(_row(session, name))


def list_deployments(session: Session) -> list[DeploymentInfo]:
    """Every deployment, by name."""
    return [_info(r) for r in session.scalars(select(DeploymentRow).order_by(DeploymentRow.name))]


def delete_deployment(session: Session, name: str) -> None:
    """Ask the controller to stop `name`; it drops the row once its replicas are gone."""
    row = _row(session, name)
    row.desired, row.updated_at = "deleted", utcnow()
    record_event(session, name, row.spec_version, "deleted", row.status, reason="deletion requested")


def drop_deployment(session: Session, name: str, owner: str | None) -> bool:
    """Remove a stopped deployment (its history stays); `owner` None: one that no controller holds. False when it
    is not deleted any more (applied again while its replicas stopped): it stays, to be started again."""
    held = DeploymentRow.controller.is_(None) if owner is None else DeploymentRow.controller == owner
    gone = session.execute(delete(DeploymentRow).where(DeploymentRow.name == name, held,
                                                       DeploymentRow.desired == "deleted"))
    if not gone.rowcount:  # type: ignore[attr-defined]
        return False
    session.execute(delete(DeploymentCommandRow).where(DeploymentCommandRow.deployment == name))
    return True


def claim_deployments(session: Session, owner: str, lease_seconds: float) -> list[str]:
    """Renew our leases and take deployments whose controller is gone; returns the names we hold."""
    now = db_now(session)
    expires = now + timedelta(seconds=lease_seconds)
    others = or_(DeploymentRow.controller.is_(None), DeploymentRow.controller != owner)
    for row in session.scalars(select(DeploymentRow).where(others)):
        if row.controller is None:
            free: ColumnElement[bool] = DeploymentRow.controller.is_(None)
        elif owner_is_dead(row.controller):  # a dead process renews nothing
            free = DeploymentRow.controller == row.controller
        elif row.lease_expires_at is None or row.lease_expires_at < now:
            # Still stale when written: a controller that renewed since the read keeps what it holds.
            free = and_(DeploymentRow.controller == row.controller,
                        or_(DeploymentRow.lease_expires_at.is_(None), DeploymentRow.lease_expires_at < now))
        else:
            continue
        # Conditional: of two controllers claiming at once, one wins.
        session.execute(update(DeploymentRow).where(DeploymentRow.name == row.name, free)
                        .values(controller=owner, lease_expires_at=expires))
    session.execute(update(DeploymentRow).where(DeploymentRow.controller == owner).values(lease_expires_at=expires))
    return list(session.scalars(select(DeploymentRow.name).where(DeploymentRow.controller == owner)
                                .order_by(DeploymentRow.name)))


def release_deployment(session: Session, name: str, owner: str) -> None:
    """Give up our lease on `name` (another controller may take it at once)."""
    session.execute(update(DeploymentRow).where(DeploymentRow.name == name, DeploymentRow.controller == owner)
                    .values(controller=None, lease_expires_at=None))


def update_state(session: Session, name: str, owner: str, status: str, reason: str, state: dict[str, Any]) -> bool:
    """Write the controller's view of `name`; False when `owner` no longer holds it."""
    result = session.execute(update(DeploymentRow).where(DeploymentRow.name == name,
                                                         DeploymentRow.controller == owner)
                             .values(status=status, reason=reason, state=state, updated_at=utcnow()))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_event(session: Session, name: str, spec_version: int, kind: str, status: str, *, step: int | None = None,
                 weights: dict[str, Any] | None = None, versions: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None, reason: str = "") -> None:
    """Append a transition to the deployment's history."""
    session.add(DeploymentEventRow(deployment=name, spec_version=spec_version, at=utcnow(), kind=kind, status=status,
                                   step=step, weights=weights or {}, versions=versions or {}, metrics=metrics,
                                   reason=reason))


def deployment_history(session: Session, name: str, limit: int | None = None) -> list[DeploymentEvent]:
    """The transitions of `name`, oldest first (the last `limit` when given, at least 1)."""
    if limit is not None and limit < 1:
        raise SpecError(f"limit must be at least 1 (the last N events), got {limit}")
    query = select(DeploymentEventRow).where(DeploymentEventRow.deployment == name)
    if limit is not None:
        query = query.order_by(DeploymentEventRow.id.desc()).limit(limit)
        rows = list(reversed(session.scalars(query).all()))
    else:
        rows = list(session.scalars(query.order_by(DeploymentEventRow.id)))
    if not rows and session.get(DeploymentRow, name) is None:
        raise NotFound(f"no deployment {name!r} and no history for it")
    return [DeploymentEvent(r.id, r.deployment, r.spec_version, r.at, r.kind, r.status, r.step, r.weights or {},
                            r.versions or {}, r.metrics, r.reason) for r in rows]


def last_event_times(session: Session, name: str, kinds: tuple[str, ...], since: datetime) -> dict[str, datetime]:
    """When each of `kinds` last happened to `name`, at or after `since` (kinds that did not happen are left out)."""
    rows = session.execute(
        select(DeploymentEventRow.kind, func.max(DeploymentEventRow.at))
        .where(DeploymentEventRow.deployment == name, DeploymentEventRow.kind.in_(kinds),
               DeploymentEventRow.at >= since)
        .group_by(DeploymentEventRow.kind))
    return {kind: at for kind, at in rows}


def queue_command(session: Session, name: str, command: str) -> None:
    """Ask the controller of `name` to `promote`, `promote_full` or `rollback`."""
    if command not in COMMANDS:
        raise SpecError(f"unknown deployment command {command!r}; use one of {', '.join(COMMANDS)}")
    row = _row(session, name)
    session.add(DeploymentCommandRow(deployment=name, command=command, created_at=utcnow()))
    record_event(session, name, row.spec_version, f"command.{command}", row.status, reason=f"{command} requested")


def pending_commands(session: Session, names: list[str]) -> set[str]:
    """Which of `names` have commands waiting (a read, so that polling takes no write lock)."""
    return set(session.scalars(select(DeploymentCommandRow.deployment).where(
        DeploymentCommandRow.deployment.in_(names), DeploymentCommandRow.handled_at.is_(None))))


def take_commands(session: Session, name: str) -> list[str]:
    """The commands queued for `name`, oldest first, marked handled."""
    rows = list(session.scalars(select(DeploymentCommandRow).where(DeploymentCommandRow.deployment == name,
                                                                   DeploymentCommandRow.handled_at.is_(None))
                                .order_by(DeploymentCommandRow.id)))
    now = utcnow()
    for row in rows:
        row.handled_at = now
    return [r.command for r in rows]
