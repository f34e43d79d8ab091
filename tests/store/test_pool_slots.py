"""Concurrency pools held in the DB: a pool's slots, who holds them, and the slots of processes gone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from tests_support import before_first_update, dead_process_owner

from skyloop.execution.poolslots import PoolSlots
from skyloop.scheduling.policy import Candidate, PolicyConfig
from skyloop.spec.resources import Resources
from skyloop.store.db import Database
from skyloop.store.models import PoolSlotRow, RunRow
from skyloop.store.pools import free_slots, held_elsewhere, take_slot
from skyloop.store.runs import create_run, release_run, utcnow

ALICE, BOB = "otherhost:101:aaaaaa", "otherhost:102:bbbbbb"
"""Owners on another host: only their leases say whether they live."""


def held_run(db: Database, run_id: str, owner: str) -> None:
    with db.session() as session:
        create_run(session, run_id=run_id, pipeline="p", spec={"name": "p"}, params={}, backend="local",
                   owner=owner, lease_seconds=60)


def take(db: Database, owner: str, run_id: str, attempt: int, pool: str = "gpu", limit: int = 2) -> bool:
    with db.session() as session:
        return take_slot(session, pool, limit, owner=owner, run_id=run_id, attempt=attempt)


def slots(db: Database) -> list[tuple[str, int, str, int]]:
    with db.read() as session:
        rows = session.scalars(select(PoolSlotRow).order_by(PoolSlotRow.pool, PoolSlotRow.slot))
        return [(r.pool, r.slot, r.owner, r.attempt) for r in rows]


def test_a_pool_gives_out_its_limit_of_slots_across_owners_and_takes_them_back(db: Database) -> None:
    held_run(db, "ra", ALICE)
    held_run(db, "rb", BOB)
    assert take(db, ALICE, "ra", 1)
    assert take(db, BOB, "rb", 7)
    assert not take(db, BOB, "rb", 8)  # both of the pool's 2 slots are held
    assert take(db, BOB, "rb", 9, pool="cpu")  # another pool has its own slots
    assert slots(db) == [("cpu", 0, BOB, 9), ("gpu", 0, ALICE, 1), ("gpu", 1, BOB, 7)]
    with db.read() as session:
        assert held_elsewhere(session, ["gpu", "cpu"], ALICE) == {"gpu": 1, "cpu": 1}
        assert held_elsewhere(session, ["gpu"], BOB) == {"gpu": 1}
    with db.session() as session:
        free_slots(session, ALICE, [1])
    assert take(db, BOB, "rb", 8)
    assert slots(db) == [("cpu", 0, BOB, 9), ("gpu", 0, BOB, 8), ("gpu", 1, BOB, 7)]
    with db.session() as session:
        free_slots(session, BOB)
    assert slots(db) == []


@pytest.mark.parametrize("gone", ["lease expired", "run ended", "run adopted"])
def test_the_slots_of_a_process_that_lost_its_run_are_taken_back_by_the_next_taker(db: Database, gone: str) -> None:
    held_run(db, "ra", ALICE)
    held_run(db, "rb", BOB)
    assert take(db, ALICE, "ra", 1, limit=1)
    assert not take(db, BOB, "rb", 1, limit=1)
    with db.session() as session:
        if gone == "lease expired":  # Alice crashed and renews nothing
            session.execute(update(RunRow).where(RunRow.id == "ra")
                            .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        elif gone == "run ended":  # ended without freeing its slot (the DB was away at the time)
            release_run(session, "ra", ALICE, "SUCCEEDED")
        else:
            session.execute(update(RunRow).where(RunRow.id == "ra").values(owner=BOB))
    with db.read() as session:
        assert held_elsewhere(session, ["gpu"], BOB) == {}
    assert take(db, BOB, "rb", 1, limit=1)
    assert slots(db) == [("gpu", 0, BOB, 1)]


def test_a_dead_process_on_this_host_holds_no_slot_even_before_its_lease_ends(db: Database) -> None:
    dead = dead_process_owner()
    held_run(db, "ra", dead)
    held_run(db, "rb", BOB)
    assert take(db, dead, "ra", 1, limit=1)
    assert take(db, BOB, "rb", 1, limit=1)


def candidate(key: int, run_id: str) -> Candidate:
    return Candidate(key=key, resources=Resources(cpus=0), run_id=run_id, pool="gpu")


# PostgreSQL only: on SQLite every write transaction takes the lock at BEGIN, so no write fits in between.
@pytest.mark.postgres
def test_two_processes_racing_for_a_pools_last_slot_get_it_once(pg_url: str) -> None:
    db, other = Database(pg_url), Database(pg_url)
    try:
        held_run(db, "ra", ALICE)
        held_run(db, "rb", BOB)
        alice = PoolSlots(db, ALICE, PolicyConfig(pools={"gpu": 1}))

        def bob_takes_it() -> None:
            assert take(other, BOB, "rb", 5, limit=1)

        # Alice read the slot free; Bob takes and commits it before her INSERT.
        with before_first_update(db, bob_takes_it, verb="INSERT"):
            assert not alice.take(candidate(3, "ra"))
        assert slots(db) == [("gpu", 0, BOB, 5)]
        assert alice.held == {}
        assert alice.config.pools_held_elsewhere == {"gpu": 1}  # and the policy counts it at once
        assert alice.waiting
    finally:
        db.dispose()
        other.dispose()
