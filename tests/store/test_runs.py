"""Runs and their leases: creating, claiming, renewing, releasing, reaping a vanished owner's runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from tests_support import before_first_update, dead_process_owner

from skyloop.errors import Conflict, NotFound
from skyloop.store import runs as runs_module
from skyloop.store.db import Database
from skyloop.store.models import Event, RunRow, StepRunRow
from skyloop.store.runs import (
    cancel_requested,
    claim_run,
    claimable_runs,
    create_run,
    disown_runs,
    get_run,
    list_runs,
    owner_is_dead,
    process_owner,
    reap_expired_runs,
    release_run,
    renew_lease,
    request_cancel,
    step_runs,
    utcnow,
)


def new_run(db: Database, run_id: str, owner: str = "alice", lease_seconds: float = 60,
            pipeline: str = "p") -> None:
    with db.session() as session:
        create_run(session, run_id=run_id, pipeline=pipeline, spec={"name": pipeline}, params={},
                   backend="local", owner=owner, lease_seconds=lease_seconds)


def add_step_run(db: Database, run_id: str, task: str, state: str) -> str:
    step_run_id = f"{run_id}-{task}"
    now = utcnow()
    with db.session() as session:
        session.add(StepRunRow(id=step_run_id, run_id=run_id, task=task, map_index=-1, attempt=1, state=state,
                               step_ref=f"mod:{task}", resources={}, created_at=now, started_at=now,
                               ended_at=None if state == "RUNNING" else now))
    return step_run_id


def expire_lease(db: Database, run_id: str) -> None:
    with db.session() as session:
        session.execute(update(RunRow).where(RunRow.id == run_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def events(db: Database, run_id: str) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(Event.kind).where(Event.run_id == run_id).order_by(Event.id)))


def test_create_run_starts_it_owned_and_leased(db: Database) -> None:
    before = utcnow()
    new_run(db, "r1", lease_seconds=30)
    with db.session() as session:
        row = get_run(session, "r1")
    assert (row.status, row.owner) == ("RUNNING", "alice")
    assert row.lease_expires_at is not None
    assert before + timedelta(seconds=29) < row.lease_expires_at < utcnow() + timedelta(seconds=31)
    assert events(db, "r1") == ["run.started"]


def test_get_run_by_unique_prefix(db: Database) -> None:
    new_run(db, "abcdef111111")
    new_run(db, "abcdef222222")
    with db.session() as session:
        assert get_run(session, "abcdef1").id == "abcdef111111"
        with pytest.raises(NotFound, match="ambiguous"):
            get_run(session, "abcdef")
        with pytest.raises(NotFound, match="no run"):
            get_run(session, "abc")  # too short to be a prefix
        with pytest.raises(NotFound):
            get_run(session, "zzzzzzzz")
        for wildcard in ("abcdef1_", "%%%%%%", "abcdef11%"):  # LIKE wildcards are plain characters here
            with pytest.raises(NotFound, match="no run"):
                get_run(session, wildcard)


def test_list_runs_newest_first_with_filters(db: Database) -> None:
    new_run(db, "old", pipeline="a")
    new_run(db, "mid", pipeline="b")
    new_run(db, "new", pipeline="a")
    with db.session() as session:
        release_run(session, "mid", "alice", "SUCCEEDED")
    with db.session() as session:
        assert [r.id for r in list_runs(session)] == ["new", "mid", "old"]
        assert [r.id for r in list_runs(session, pipeline="a")] == ["new", "old"]
        assert [r.id for r in list_runs(session, status="succeeded")] == ["mid"]
        assert [r.id for r in list_runs(session, limit=1)] == ["new"]


def test_claiming_a_run_with_a_live_lease_is_a_conflict(db: Database) -> None:
    new_run(db, "r1", owner="alice", lease_seconds=60)
    with pytest.raises(Conflict, match="held by a live process \\(alice\\)"), db.session() as session:
        claim_run(session, "r1", "bob", lease_seconds=60)
    with db.session() as session:
        assert get_run(session, "r1").owner == "alice"


def test_a_run_of_a_dead_local_process_can_be_claimed_before_its_lease_ends(db: Database) -> None:
    dead_owner = dead_process_owner()
    live_owner = process_owner()
    new_run(db, "dead", owner=dead_owner, lease_seconds=600)
    new_run(db, "live", owner=live_owner, lease_seconds=600)
    new_run(db, "remote", owner="some-other-host:1:abc", lease_seconds=600)
    with db.session() as session:
        assert claim_run(session, "dead", "bob", lease_seconds=60).owner == "bob"
    for run_id in ("live", "remote"):
        with pytest.raises(Conflict, match="live process"), db.session() as session:
            claim_run(session, run_id, "bob", lease_seconds=60)


def test_a_dead_pid_is_judged_only_by_a_process_that_sees_the_same_pids(db: Database) -> None:
    # Two containers sharing the host's name (host networking) each have their own PID namespace: a live agent
    # over there has a pid that does not exist here. Only its lease may say it is gone.
    # Nor can another machine of the same name judge it: the PID namespace of every machine's host processes has
    # the same number (4026531836), so a live agent of another machine was taken for dead, its runs adopted and
    # its steps run a second time, its pool slots given out again.
    host, pid, nonce, namespace, boot = dead_process_owner().split(":")
    assert boot and owner_is_dead(f"{host}:{pid}:{nonce}:{namespace}:{boot}")
    other_namespace = f"{host}:{pid}:{nonce}:{int(namespace or 0) + 1}:{boot}"
    other_machine = f"{host}:{pid}:{nonce}:{namespace}:{'0' * len(boot)}"
    before = [f"{host}:{pid}:{nonce}", f"{host}:{pid}:{nonce}:{namespace}"]  # owner ids of older versions
    for owner in (other_namespace, other_machine, *before):
        assert not owner_is_dead(owner), owner
    for i, owner in enumerate((other_namespace, other_machine)):
        new_run(db, f"theirs{i}", owner=owner, lease_seconds=600)
        with db.read() as session:
            assert f"theirs{i}" not in claimable_runs(session)
        with pytest.raises(Conflict, match="live process"), db.session() as session:
            claim_run(session, f"theirs{i}", "bob", lease_seconds=60)


def test_the_owner_may_claim_its_own_run(db: Database) -> None:
    new_run(db, "r1", owner="alice")
    with db.session() as session:
        assert claim_run(session, "r1", "alice", lease_seconds=60).owner == "alice"


def test_a_run_can_be_claimed_once_its_lease_expired(db: Database) -> None:
    new_run(db, "r1", owner="alice", lease_seconds=60)
    expire_lease(db, "r1")
    with db.session() as session:
        row = claim_run(session, "r1", "bob", lease_seconds=60)
        assert (row.owner, row.status) == ("bob", "RUNNING")
        assert row.lease_expires_at is not None and row.lease_expires_at > utcnow() + timedelta(seconds=50)
    with db.session() as session:
        # The old owner learns it lost the run at its next heartbeat; the new one keeps renewing.
        assert renew_lease(session, "r1", "alice", 60) is False
        assert renew_lease(session, "r1", "bob", 60) is True
    assert events(db, "r1") == ["run.started", "run.adopted"]
    with db.session() as session:
        adopted = session.scalars(select(Event).where(Event.kind == "run.adopted")).one()
        assert adopted.data == {"previous_owner": "alice"}
    with pytest.raises(Conflict), db.session() as session:
        claim_run(session, "r1", "alice", lease_seconds=60)


def test_a_released_run_can_be_claimed_and_a_succeeded_one_cannot(db: Database) -> None:
    new_run(db, "failed", owner="alice")
    new_run(db, "done", owner="alice")
    with db.session() as session:
        release_run(session, "failed", "alice", "FAILED", "step 'x' FAILED: boom")
        release_run(session, "done", "alice", "SUCCEEDED")
    with db.session() as session:
        row = get_run(session, "failed")
        assert (row.status, row.owner, row.lease_expires_at, row.error) == ("FAILED", None, None,
                                                                             "step 'x' FAILED: boom")
        assert row.ended_at is not None
        claimed = claim_run(session, "failed", "bob", lease_seconds=60)
        assert (claimed.owner, claimed.status, claimed.error, claimed.ended_at) == ("bob", "RUNNING", None, None)
    with pytest.raises(Conflict, match="already succeeded"), db.session() as session:
        claim_run(session, "done", "bob", lease_seconds=60)


def test_release_by_someone_else_changes_nothing(db: Database) -> None:
    new_run(db, "r1", owner="alice")
    with db.session() as session:
        assert not release_run(session, "r1", "mallory", "FAILED")
    with db.session() as session:
        row = get_run(session, "r1")
        assert (row.status, row.owner) == ("RUNNING", "alice")
    assert events(db, "r1") == ["run.started"]  # no "run.failed" for a run that did not end
    with db.session() as session:
        assert release_run(session, "r1", "alice", "SUCCEEDED")
    assert events(db, "r1") == ["run.started", "run.succeeded"]


def renew_from_elsewhere(url: str, run_id: str, owner: str) -> Callable[[], None]:
    def renew() -> None:
        other = Database(url)
        try:
            with other.session() as session:
                assert renew_lease(session, run_id, owner, lease_seconds=60)
        finally:
            other.dispose()
    return renew


# PostgreSQL only: on SQLite every write transaction takes the lock at BEGIN, so no write fits in between.
@pytest.mark.postgres
def test_a_lease_renewed_between_the_reapers_read_and_write_keeps_the_run_and_its_steps(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        new_run(db, "late", owner="alice")
        running = add_step_run(db, "late", "train", "RUNNING")
        expire_lease(db, "late")
        # Before: the attempts were marked CRASHED first, unconditionally, so a renewal in between left a
        # live run with its running step recorded as crashed (and a `run.lost` event).
        with before_first_update(db, renew_from_elsewhere(pg_url, "late", "alice")), db.session() as session:
            assert reap_expired_runs(session) == []
        with db.session() as session:
            row = get_run(session, "late")
            assert (row.status, row.owner) == ("RUNNING", "alice")
            assert {r.id: r.state for r in step_runs(session, "late")} == {running: "RUNNING"}
        assert "run.lost" not in events(db, "late")
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_claim_and_a_renewal_of_an_expired_lease_take_turns(pg_url: str) -> None:
    # A claim locks the run row as it reads it: a renewal by the old owner coming in between waits for the claim,
    # then finds the run taken (and its owner lets it go), rather than landing between the claim's read and write.
    db = Database(pg_url)
    try:
        new_run(db, "busy", owner="alice")
        expire_lease(db, "busy")
        renewed: list[bool] = []

        def renew() -> None:
            other = Database(pg_url)
            try:
                with other.session() as session:
                    renewed.append(renew_lease(session, "busy", "alice", lease_seconds=60))
            finally:
                other.dispose()

        renewal = threading.Thread(target=renew)
        with before_first_update(db, renewal.start), db.session() as session:
            assert claim_run(session, "busy", "bob", lease_seconds=60).owner == "bob"
            time.sleep(0.3)
            assert renewal.is_alive()  # it waits for the claim's transaction
        renewal.join(30)
        assert renewed == [False]
        with db.session() as session:
            assert get_run(session, "busy").owner == "bob"
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_cancel_requested_as_an_agent_adopts_the_run_is_not_lost(pg_url: str) -> None:
    # PostgreSQL numbers events at insert, not commit: an adoption that did not see a request still uncommitted,
    # committed past it with a higher number, and the request counted as older than the adoption: ignored, while
    # the CLI had said REQUESTED.
    db = Database(pg_url)
    try:
        new_run(db, "r", owner="alice", lease_seconds=1)
        claimed: list[str] = []

        def adopt() -> None:  # an agent, once alice's lease has run out
            with db.session() as session:
                claimed.append(claim_run(session, "r", "bob", lease_seconds=60, resume=False).status)

        agent = threading.Thread(target=adopt)
        with db.session() as session:
            assert request_cancel(session, "r")[1] == "REQUESTED"  # alice's lease holds yet
            time.sleep(1.5)
            agent.start()
            time.sleep(0.5)  # the adoption runs now, before the request commits
        agent.join(30)
        assert claimed == ["CANCELLED"]
        with db.read() as session:
            assert get_run(session, "r").status == "CANCELLED"
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_cancel_coming_as_an_agent_claims_a_queued_run_waits_for_the_claim_and_reaches_the_agent(
        pg_url: str) -> None:
    """Before the claim locked the run row, a cancel landed between its read and its write, and the claim's update,
    which only asked that nobody held the run, set the cancelled run RUNNING again and ran it. Now the cancel
    waits for the claim, and asks the agent that holds the run to cancel it."""
    db = Database(pg_url)
    try:
        with db.session() as session:
            create_run(session, run_id="queued", pipeline="p", spec={}, params={}, backend=None, owner=None,
                       lease_seconds=0)
        answers: list[tuple[str, str]] = []

        def cancel() -> None:
            other = Database(pg_url)
            try:
                with other.session() as session:
                    answers.append(request_cancel(session, "queued"))
            finally:
                other.dispose()

        canceller = threading.Thread(target=cancel)
        with before_first_update(db, canceller.start), db.session() as session:
            assert claim_run(session, "queued", "bob", lease_seconds=60, resume=False).status == "RUNNING"
            time.sleep(0.3)
            assert canceller.is_alive()  # it waits for the claim's transaction
        canceller.join(30)
        assert answers == [("queued", "REQUESTED")]
        with db.session() as session:
            assert cancel_requested(session, ["queued"]) == {"queued"}  # bob's next heartbeat cancels it
    finally:
        db.dispose()


def test_reaping_fails_runs_whose_lease_expired(db: Database) -> None:
    new_run(db, "lost", owner="alice")
    running = add_step_run(db, "lost", "train", "RUNNING")
    finished = add_step_run(db, "lost", "load", "SUCCEEDED")
    new_run(db, "alive", owner="bob")
    alive_step = add_step_run(db, "alive", "train", "RUNNING")
    expire_lease(db, "lost")
    with db.session() as session:
        assert reap_expired_runs(session) == ["lost"]
    with db.session() as session:
        run = get_run(session, "lost")
        assert (run.status, run.owner, run.lease_expires_at) == ("FAILED", None, None)
        assert run.error is not None and "--resume lost" in run.error and "alice" in run.error
        states = {r.id: r.state for r in step_runs(session, "lost")}
        assert states == {running: "CRASHED", finished: "SUCCEEDED"}
        crashed = session.get(StepRunRow, running)
        assert crashed is not None and crashed.ended_at is not None and crashed.error
        assert get_run(session, "alive").status == "RUNNING"
        alive = session.get(StepRunRow, alive_step)
        assert alive is not None and alive.state == "RUNNING"
    assert events(db, "lost")[-1] == "run.lost"
    with db.session() as session:
        assert reap_expired_runs(session) == []  # nothing is reaped twice
    with db.session() as session:
        assert claim_run(session, "lost", "carol", lease_seconds=60).status == "RUNNING"  # and it can resume


def test_an_agent_claims_the_runs_queued_for_its_backend_and_records_the_one_it_uses(db: Database) -> None:
    with db.session() as session:
        for run_id, backend in (("for-local", "local"), ("for-inline", "inline"), ("for-any", None)):
            create_run(session, run_id=run_id, pipeline="p", spec={}, params={}, backend=backend, owner=None,
                       lease_seconds=0)
    new_run(db, "orphan", owner="alice", lease_seconds=60)
    with db.session() as session:
        disown_runs(session, ["orphan"], "alice")  # let go by its process: any agent adopts it
    with db.session() as session:
        assert claimable_runs(session, backend="local") == ["for-local", "for-any", "orphan"]
        assert claimable_runs(session, backend="inline") == ["for-inline", "for-any", "orphan"]
        assert claimable_runs(session) == ["for-local", "for-inline", "for-any", "orphan"]
        # Runs an agent gave up on (it could neither run them nor mark them FAILED) are not listed: they filled
        # the `limit` it asks for (the runs it has room for), and the runs behind them waited for ever.
        assert claimable_runs(session, limit=1, backend="local", exclude={"for-local"}) == ["for-any"]
        assert claimable_runs(session, limit=2, exclude={"for-local", "for-inline", "orphan"}) == ["for-any"]
        assert claim_run(session, "orphan", "bob", lease_seconds=60, backend="inline").backend == "inline"
        assert claim_run(session, "for-local", "bob", lease_seconds=60).backend == "local"
        assert claim_run(session, "for-any", "bob", lease_seconds=60, backend="ray").backend == "ray"


@pytest.mark.postgres
def test_on_postgresql_leases_go_by_the_database_clock_not_this_hosts(pg_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Agents on several hosts share one PostgreSQL: a host whose clock is ahead must not take a live run, nor
    # may a holder whose clock is behind write a lease that the others already read as expired.
    db = Database(pg_url)
    holder = "other-host:4242:abc123:1"
    try:
        new_run(db, "held", owner=holder, lease_seconds=60)
        monkeypatch.setattr(runs_module, "utcnow", lambda: datetime.now(UTC) + timedelta(minutes=10))
        with db.read() as session:
            assert "held" not in claimable_runs(session)
        with pytest.raises(Conflict, match="live process"), db.session() as session:
            claim_run(session, "held", "bob", lease_seconds=60)
        with db.session() as session:
            assert reap_expired_runs(session) == []
        monkeypatch.setattr(runs_module, "utcnow", lambda: datetime.now(UTC) - timedelta(minutes=10))
        with db.session() as session:
            assert renew_lease(session, "held", holder, lease_seconds=60)
        monkeypatch.undo()
        with db.read() as session:
            assert "held" not in claimable_runs(session)
            assert get_run(session, "held").owner == holder
    finally:
        db.dispose()


def test_reaping_leaves_a_run_submitted_to_the_queue_for_the_next_agent(db: Database) -> None:
    with db.session() as session:
        create_run(session, run_id="queued", pipeline="p", spec={"name": "p"}, params={}, backend="local",
                   owner=None, lease_seconds=60)
        claim_run(session, "queued", "dead-agent", lease_seconds=60, resume=False)
    new_run(db, "direct", owner="dead-run-command")  # `skyloop run`, then killed: failed, to be resumed
    expire_lease(db, "queued")
    expire_lease(db, "direct")
    with db.session() as session:
        assert reap_expired_runs(session) == ["direct"]
    with db.read() as session:
        assert get_run(session, "queued").status == "RUNNING"
        assert "queued" in claimable_runs(session, backend="local")
    with db.session() as session:
        assert claim_run(session, "queued", "next-agent", lease_seconds=60, resume=False).owner == "next-agent"
