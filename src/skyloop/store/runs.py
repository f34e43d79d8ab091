"""Repository functions for runs, step runs and events (each takes the session explicitly)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, defer
from sqlalchemy.sql.elements import ColumnElement

from skyloop.errors import Conflict, NotFound, SpecError, StoreError
from skyloop.store.models import Event, RunRow, StepRunRow

__all__ = [
    "ACTIVE_RUN_STATES",
    "CANCELLED_BY_USER",
    "RUN_STATUSES",
    "add_event",
    "cancel_requested",
    "claim_run",
    "claimable_runs",
    "create_run",
    "db_now",
    "disown_runs",
    "get_run",
    "list_runs",
    "owner_is_dead",
    "process_owner",
    "reap_expired_runs",
    "release_run",
    "renew_lease",
    "renew_leases",
    "request_cancel",
    "step_runs",
    "utcnow",
]

ACTIVE_RUN_STATES = ("PENDING", "RUNNING")
RUN_STATUSES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
"""Every status a run row can have: queued by `submit`, held by an orchestrator, or ended."""


ORCHESTRATOR_LOST = "orchestrator lost while the step ran"
"""The error of an attempt left RUNNING by a process that vanished: the step's fault it is not (no retry spent)."""

CANCEL_REQUESTED = "run.cancel_requested"
CANCELLED_BY_USER = "cancelled by the user (skyloop runs cancel)"


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


def db_now(session: Session) -> datetime:
    """Now by the clock that leases are judged by: the database server's where processes on several hosts share
    it (PostgreSQL), so that a host whose clock runs ahead neither takes live runs nor keeps dead ones; this
    host's for SQLite, whose processes share one host. (PostgreSQL's `now()` is the transaction's start: a
    lease is read and written in one short transaction.)"""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        found = session.execute(select(func.now())).scalar_one()
        return found if found.tzinfo is not None else found.replace(tzinfo=UTC)
    return utcnow()


def _pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid), or "" where there is none to read."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return "".join(c for c in link if c.isdigit())


def _boot_id() -> str:
    """This machine's boot id (of its running kernel; shared by its containers), shortened, or "" where none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return ""


_NAMESPACE = _pid_namespace()
_BOOT = _boot_id()


def process_owner() -> str:
    """The owner id of this process for leases: `host:pid:nonce:pidns:boot`. A pid is judged alive or dead only by
    a process that sees the same pids: on the same machine (the boot id: two machines may share a hostname, and
    the PID namespace of every machine's host processes has the same number) and in the same PID namespace
    (two containers that share a hostname, with host networking)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}:{_NAMESPACE}:{_BOOT}"


def create_run(session: Session, *, run_id: str, pipeline: str, spec: dict[str, Any], params: dict[str, Any],
               backend: str | None, owner: str | None, lease_seconds: float, priority: int = 0,
               weight: float = 1.0) -> RunRow:
    """Insert a new run: RUNNING and owned by `owner`, or QUEUED for an agent when `owner` is None (for an
    agent of `backend`, or any agent when it is None)."""
    now = db_now(session)
    queued = owner is None
    row = RunRow(id=run_id, pipeline=pipeline, spec=spec, params=params, status="QUEUED" if queued else "RUNNING",
                 backend=backend, created_at=now, started_at=None if queued else now, owner=owner,
                 priority=priority, weight=weight,
                 lease_expires_at=None if queued else now + timedelta(seconds=lease_seconds))
    session.add(row)
    session.flush()  # no ORM relationships: the run row must exist before rows that point at it
    # A queued run's event keeps the backend it asked for: `runs.backend` changes to the one an agent runs it
    # on, and should that agent die, the run still goes only to an agent of the backend it asked for.
    data = {"backend": backend} if queued else {}
    add_event(session, run_id, "run.queued" if queued else "run.started",
              f"run of {pipeline} {'queued' if queued else 'started'} for {backend or 'any backend'}", **data)
    return row


def get_run(session: Session, run_id: str) -> RunRow:
    """The run with this id (a unique prefix of at least 6 characters works too)."""
    found_id = _run_id(session, run_id)
    try:
        row = session.get(RunRow, found_id)
    except ValueError as exc:  # the JSON columns no longer parse: say which run, not a traceback
        raise StoreError(f"run {found_id[:12]} is damaged in the metadata DB: its stored spec or parameters "
                         f"are not valid JSON ({exc}); the other runs are not affected") from None
    assert row is not None  # found just above, in the same transaction
    return row


def _run_id(session: Session, run_id: str) -> str:
    """The full id of the run `run_id` names (itself, or a unique prefix of at least 6 characters)."""
    found = session.scalars(select(RunRow.id).where(RunRow.id == run_id)).all()
    if not found and len(run_id) >= 6:
        found = session.scalars(select(RunRow.id).where(RunRow.id.startswith(run_id, autoescape=True)).limit(2)).all()
        if len(found) > 1:
            raise NotFound(f"run id prefix {run_id!r} is ambiguous; give more characters")
    if not found:
        short = " (an id prefix needs 6 characters or more)" if len(run_id) < 6 else ""
        raise NotFound(f"no run with id {run_id!r}{short}; `skyloop runs list` shows the runs")
    return found[0]


def list_runs(session: Session, *, limit: int = 50, pipeline: str | None = None,
              status: str | None = None) -> Sequence[RunRow]:
    """Newest runs first, without their spec and parameters (not loaded: a list must not need them, and one
    unreadable run must not hide the others). A status that no run can have is refused."""
    query = (select(RunRow).options(defer(RunRow.spec), defer(RunRow.params))
             .order_by(RunRow.created_at.desc()).limit(limit))
    if pipeline:
        query = query.where(RunRow.pipeline == pipeline)
    if status:
        if status.upper() not in RUN_STATUSES:
            raise SpecError(f"unknown run status {status!r}; choose one of {', '.join(RUN_STATUSES)}")
        query = query.where(RunRow.status == status.upper())
    return session.scalars(query).all()


def step_runs(session: Session, run_id: str) -> Sequence[StepRunRow]:
    """Every attempt of every task of the run, oldest first."""
    query = (select(StepRunRow).where(StepRunRow.run_id == run_id)
             .order_by(StepRunRow.created_at, StepRunRow.task, StepRunRow.map_index, StepRunRow.attempt))
    return session.scalars(query).all()


def add_event(session: Session, run_id: str, kind: str, message: str = "", step_run_id: str | None = None,
              **data: Any) -> None:
    """Record a state change worth showing."""
    session.add(Event(run_id=run_id, step_run_id=step_run_id, at=utcnow(), kind=kind, message=message, data=data))


def renew_lease(session: Session, run_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend our lease; False when someone else took the run over."""
    result = session.execute(
        update(RunRow).where(RunRow.id == run_id, RunRow.owner == owner)
        .values(lease_expires_at=db_now(session) + timedelta(seconds=lease_seconds))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def owner_is_dead(owner: str) -> bool:
    """Whether `owner` (`process_owner()`) is a process of this machine, in this PID namespace, that no longer
    exists. An owner of another machine (boot id) or namespace, or of a version that did not record them, is never
    judged dead here: its lease decides."""
    host, pid_text, _, namespace, boot = ([*owner.split(":", 4), "", "", "", ""])[:5]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    if namespace != _NAMESPACE or boot != _BOOT or not boot:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def renew_leases(session: Session, run_ids: Sequence[str], owner: str, lease_seconds: float) -> set[str]:
    """Extend our leases on these runs; returns the ones still ours."""
    if not run_ids:
        return set()
    session.execute(
        update(RunRow).where(RunRow.id.in_(run_ids), RunRow.owner == owner)
        .values(lease_expires_at=db_now(session) + timedelta(seconds=lease_seconds))
    )
    return set(session.scalars(select(RunRow.id).where(RunRow.id.in_(run_ids), RunRow.owner == owner)))


def disown_runs(session: Session, run_ids: Sequence[str], owner: str) -> None:
    """Let go of runs (still RUNNING) so that any agent adopts them at once."""
    if run_ids:
        session.execute(update(RunRow).where(RunRow.id.in_(run_ids), RunRow.owner == owner)
                        .values(owner=None, lease_expires_at=None))
        for run_id in run_ids:
            add_event(session, run_id, "run.disowned", f"{owner} stopped; the run waits for another agent")


def claimable_runs(session: Session, limit: int = 10, backend: str | None = None,
                   exclude: Collection[str] = ()) -> list[str]:
    """Runs an agent may take, highest priority first, then oldest: queued ones, and RUNNING ones whose owner is
    gone (lease expired, let go of, or a dead process on this host). With `backend`, only runs queued for it or
    for any backend (a run `skyloop run` started, then left: any); never those of `exclude` (runs the agent gave
    up on: listed, they would take the places of the `limit` that others wait behind)."""
    query = select(RunRow.id, RunRow.priority, RunRow.created_at).where(RunRow.status == "QUEUED")
    if backend is not None:
        query = query.where(or_(RunRow.backend.is_(None), RunRow.backend == backend))
    if exclude:
        query = query.where(RunRow.id.not_in(list(exclude)))
    found = list(session.execute(query.order_by(RunRow.priority.desc(), RunRow.created_at).limit(limit)).tuples())
    now = db_now(session)
    # Only the columns needed: every RUNNING run is read at each poll (and one damaged row must not stop them).
    running = session.execute(select(RunRow.id, RunRow.priority, RunRow.created_at, RunRow.owner,
                                     RunRow.lease_expires_at).where(RunRow.status == "RUNNING")).tuples()
    orphans = [(run_id, priority, created) for run_id, priority, created, owner, expires in running
               if run_id not in exclude and (owner is None or (expires is not None and expires < now)
                                             or owner_is_dead(owner))]
    if backend is not None and orphans:
        asked = _queued_for(session, [run_id for run_id, _, _ in orphans])
        orphans = [orphan for orphan in orphans if asked.get(orphan[0]) in (None, backend)]
    # Orphans compete with the queue by priority: a busy queue must not keep a dead agent's runs from going on.
    found.extend(orphans)
    found.sort(key=lambda run: (-run[1], run[2]))
    return [run_id for run_id, _, _ in found[:limit]]


def _queued_for(session: Session, run_ids: Sequence[str]) -> dict[str, str | None]:
    """The backend each of these runs was queued for (None: any; runs never queued are left out)."""
    queued = session.execute(select(Event.run_id, Event.data).where(Event.run_id.in_(run_ids),
                                                                    Event.kind == "run.queued")).tuples()
    return {run_id: (data or {}).get("backend") for run_id, data in queued}


def claim_run(session: Session, run_id: str, owner: str, lease_seconds: float,
              backend: str | None = None, *, resume: bool = True) -> RunRow:
    """Adopt a run whose owner is gone (lease expired, released, or a dead local process);
    `Conflict` if it is alive. `backend`: the one it runs on from now (recorded on the run).

    `resume=True` (`skyloop run --resume`) takes a run that ended FAILED or CANCELLED back too, and a cancel
    requested before it is not applied. An agent claims with `resume=False`: only a run still QUEUED or
    RUNNING (one cancelled or ended since the agent listed it is `Conflict`: it does not run again), and a run
    whose cancel was requested while another process held it is ended CANCELLED instead (returned so: check
    `status`). A claim by the run's own holder records nothing new."""
    found = _run_id(session, run_id)
    # Without the spec and parameters: a run whose stored JSON is damaged can still be claimed to be failed. Locked
    # (PostgreSQL; SQLite's writers take turns anyway): a cancel requested at this moment is seen, see below.
    row = session.get(RunRow, found, options=[defer(RunRow.spec), defer(RunRow.params)], with_for_update=True)
    assert row is not None  # found just above, in the same transaction
    now = db_now(session)
    if row.status == "SUCCEEDED":
        raise Conflict(f"run {row.id} already succeeded; nothing to resume")
    if not resume and row.status not in ("QUEUED", "RUNNING"):
        raise Conflict(f"run {row.id} already ended {row.status}; an agent does not run it again "
                       f"(`skyloop run --resume {row.id}` does)")
    expires = row.lease_expires_at
    alive = expires is not None and expires > now
    if row.owner and row.owner != owner and expires is not None and alive and not owner_is_dead(row.owner):
        wait = (expires - now).total_seconds()
        raise Conflict(f"run {row.id} is held by a live process ({row.owner}); "
                       f"its lease expires in {wait:.0f}s if that process is gone")
    previous = row.owner  # read before the refresh below replaces it with ours
    # Conditional update: of two processes adopting at once, only one wins, and a lease its owner renewed
    # since the read above stays theirs (a dead process renews nothing, so its runs need no such check).
    taken: ColumnElement[bool]
    if previous is None:
        taken = RunRow.owner.is_(None)
    elif previous == owner or owner_is_dead(previous):
        taken = RunRow.owner == previous
    else:
        taken = and_(RunRow.owner == previous,
                     or_(RunRow.lease_expires_at.is_(None), RunRow.lease_expires_at <= now))
    if not resume:  # a run cancelled or ended since it was read (its owner is None then too) stays so
        taken = and_(taken, RunRow.status.in_(("QUEUED", "RUNNING")))
    # The request its previous holder never read (it stopped, died, or let go of the run first): honoured here.
    cancel = not resume and previous != owner and bool(cancel_requested(session, [row.id]))
    values: dict[str, Any] = {"owner": owner, "status": "RUNNING", "ended_at": None, "error": None,
                              "backend": backend or row.backend, "started_at": func.coalesce(RunRow.started_at, now),
                              "lease_expires_at": now + timedelta(seconds=lease_seconds)}
    if cancel:
        values = {"status": "CANCELLED", "error": CANCELLED_BY_USER, "ended_at": now, "owner": None,
                  "lease_expires_at": None}
    result = session.execute(update(RunRow).where(RunRow.id == row.id, taken).values(**values))
    if not result.rowcount:  # type: ignore[attr-defined]
        if not resume:
            session.refresh(row, ["status"])
            if row.status not in ("QUEUED", "RUNNING"):
                raise Conflict(f"run {row.id} ended {row.status} just now; an agent does not run it again")
        raise Conflict(f"run {row.id} was adopted by another process just now")
    session.refresh(row, list(values))
    if cancel:
        session.execute(update(StepRunRow)
                        .where(StepRunRow.run_id == row.id, StepRunRow.state.in_(("RUNNING", "PENDING")))
                        .values(state="CANCELLED", ended_at=now, error=CANCELLED_BY_USER))
        add_event(session, row.id, "run.cancelled", CANCELLED_BY_USER)
    elif previous != owner:
        add_event(session, row.id, "run.adopted", f"run adopted by {owner}", previous_owner=previous)
    return row


def release_run(session: Session, run_id: str, owner: str, status: str, error: str | None = None) -> bool:
    """Finish the run and give up its lease; False (and nothing recorded) when `owner` no longer holds it."""
    result = session.execute(
        update(RunRow).where(RunRow.id == run_id, RunRow.owner == owner)
        .values(status=status, error=error, ended_at=utcnow(), owner=None, lease_expires_at=None)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    add_event(session, run_id, f"run.{status.lower()}", error or "")
    return True


def reap_expired_runs(session: Session, grace_seconds: float = 0.0) -> list[str]:
    """Fail runs whose orchestrator vanished (lease expired `grace_seconds` ago) and their RUNNING attempts.

    The run can still be resumed; this only keeps nothing RUNNING forever. The grace leaves agents,
    which adopt orphaned runs as soon as their lease expires, the first claim. A run submitted to the queue
    is left alone: it was given to agents, and it waits for the next one as a queued run does (an agent fleet
    restarted over more than the grace must not find its runs failed by whoever listed them meanwhile).
    """
    now = db_now(session)
    cutoff = now - timedelta(seconds=grace_seconds)
    queued = select(Event.id).where(Event.run_id == RunRow.id, Event.kind == "run.queued").exists()
    expired = session.scalars(
        select(RunRow).where(RunRow.status == "RUNNING", RunRow.lease_expires_at < cutoff, ~queued)
    ).all()
    reaped = []
    for row in expired:
        reason = (f"orchestrator {row.owner} stopped renewing its lease; "
                  f"resume with `skyloop run --resume {row.id}`")
        # The run first, on the condition read above: an owner that renewed its lease since (or an agent
        # that adopted the run) keeps the run and its attempts untouched.
        result = session.execute(
            update(RunRow).where(RunRow.id == row.id, RunRow.status == "RUNNING", RunRow.owner == row.owner,
                                 RunRow.lease_expires_at < cutoff)
            .values(status="FAILED", error=reason, ended_at=now, owner=None, lease_expires_at=None)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            continue
        session.execute(
            update(StepRunRow).where(StepRunRow.run_id == row.id, StepRunRow.state.in_(("RUNNING", "PENDING")))
            .values(state="CRASHED", ended_at=now, error=ORCHESTRATOR_LOST)
        )
        add_event(session, row.id, "run.lost", reason)
        reaped.append(row.id)
    return reaped


def request_cancel(session: Session, run_id: str) -> tuple[str, str]:
    """Cancel a run: one queued, or RUNNING with nobody holding it, ends CANCELLED now; one an orchestrator
    holds gets a request, which its heartbeat reads (it cancels the attempts and ends the run). Returns the
    run's id and `CANCELLED` or `REQUESTED`; `Conflict` for a run that has ended."""
    row = get_run(session, run_id)
    # The run row locked: a process adopting the run at this moment either adopted it first, and is the one that
    # gets the request (recorded after its adoption), or finds the request when it adopts. (PostgreSQL numbers
    # events at insert, not commit: unlocked, an adoption could commit past a request it never saw, and the
    # request, older by its number, was ignored while the CLI said REQUESTED.)
    session.refresh(row, with_for_update=True)
    now = db_now(session)
    if row.status == "QUEUED":
        done = session.execute(update(RunRow).where(RunRow.id == row.id, RunRow.status == "QUEUED")
                               .values(status="CANCELLED", error=f"{CANCELLED_BY_USER} before it started",
                                       ended_at=now))
        if done.rowcount:  # type: ignore[attr-defined]
            add_event(session, row.id, "run.cancelled", CANCELLED_BY_USER)
            return row.id, "CANCELLED"
        session.refresh(row)  # an agent claimed it just now: it holds it, so it gets the request below
    if row.status != "RUNNING":
        raise Conflict(f"run {row.id[:12]} already ended {row.status}; nothing to cancel")
    expires = row.lease_expires_at
    if row.owner is None or (expires is not None and expires <= now) or owner_is_dead(row.owner):
        # Nobody drives it: end it here, on the condition read (an agent adopting it meanwhile keeps it).
        held: ColumnElement[bool] = RunRow.owner.is_(None) if row.owner is None else RunRow.owner == row.owner
        done = session.execute(update(RunRow).where(RunRow.id == row.id, RunRow.status == "RUNNING", held,
                                                    or_(RunRow.lease_expires_at.is_(None),
                                                        RunRow.lease_expires_at == expires))
                               .values(status="CANCELLED", error=CANCELLED_BY_USER, ended_at=now, owner=None,
                                       lease_expires_at=None))
        if done.rowcount:  # type: ignore[attr-defined]
            session.execute(update(StepRunRow)
                            .where(StepRunRow.run_id == row.id, StepRunRow.state.in_(("RUNNING", "PENDING")))
                            .values(state="CANCELLED", ended_at=now, error=CANCELLED_BY_USER))
            add_event(session, row.id, "run.cancelled", CANCELLED_BY_USER)
            return row.id, "CANCELLED"
    add_event(session, row.id, CANCEL_REQUESTED, "the user asked to cancel the run")
    return row.id, "REQUESTED"


def cancel_requested(session: Session, run_ids: Sequence[str]) -> set[str]:
    """The runs among `run_ids` asked to be cancelled since they were last adopted (a run resumed after a
    cancel is not cancelled again by the old request)."""
    if not run_ids:
        return set()
    last = dict(session.execute(
        select(Event.run_id, func.max(Event.id)).where(Event.run_id.in_(run_ids), Event.kind == CANCEL_REQUESTED)
        .group_by(Event.run_id)).tuples().all())
    if not last:
        return set()
    adopted = dict(session.execute(
        select(Event.run_id, func.max(Event.id)).where(Event.run_id.in_(list(last)), Event.kind == "run.adopted")
        .group_by(Event.run_id)).tuples().all())
    return {run_id for run_id, at in last.items() if at > adopted.get(run_id, 0)}
