"""Concurrency pools held in the metadata DB, so that a pool's limit holds across every process on it.

A pool of limit n has n slots (rows keyed by pool and slot number, 0..n-1). An orchestrator takes a
free slot before it launches a member of the pool and frees it when the attempt ends; the primary key
lets two processes that race for one slot have it once. A slot lives while its owner holds the run
it was taken for (`RunRow.owner` and an unexpired lease, the owner not a dead process on this host):
a process that crashed, stopped or lost the run to another leaves stale slots, which the next taker
of the pool deletes. So a crash never holds a slot for longer than a run's lease.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from sqlalchemy import and_, delete, insert, select
from sqlalchemy.orm import Session

from skyloop.store.models import PoolSlotRow, RunRow
from skyloop.store.runs import db_now, owner_is_dead, utcnow

__all__ = ["free_slots", "held_elsewhere", "take_slot"]


def _live_slots(session: Session, pools: Collection[str]) -> tuple[list[PoolSlotRow], list[PoolSlotRow]]:
    """The slots of `pools` split into (live, stale)."""
    now = db_now(session)
    rows = session.execute(
        select(PoolSlotRow, RunRow.id)
        .outerjoin(RunRow, and_(RunRow.id == PoolSlotRow.run_id, RunRow.owner == PoolSlotRow.owner,
                                RunRow.status == "RUNNING", RunRow.lease_expires_at > now))
        .where(PoolSlotRow.pool.in_(list(pools)))
    ).all()
    live, stale = [], []
    dead: dict[str, bool] = {}
    for slot, held_run in rows:
        if held_run is not None and not dead.setdefault(slot.owner, owner_is_dead(slot.owner)):
            live.append(slot)
        else:
            stale.append(slot)
    return live, stale


def held_elsewhere(session: Session, pools: Collection[str], owner: str) -> Counter[str]:
    """How many live slots of each of `pools` processes other than `owner` hold."""
    live, _ = _live_slots(session, pools)
    return Counter(slot.pool for slot in live if slot.owner != owner)


def take_slot(session: Session, pool: str, limit: int, *, owner: str, run_id: str, attempt: int) -> bool:
    """Take a free slot of `pool` for an attempt of `run_id`; False when all `limit` are held. Stale slots of
    the pool are deleted first. Two processes taking the last slot at once both insert it: the one whose
    commit comes second fails with an integrity error (its caller takes that as False)."""
    live, stale = _live_slots(session, [pool])
    for slot in stale:  # on the row as read: one another process took over since stays theirs
        session.execute(delete(PoolSlotRow).where(
            PoolSlotRow.pool == pool, PoolSlotRow.slot == slot.slot, PoolSlotRow.owner == slot.owner,
            PoolSlotRow.attempt == slot.attempt, PoolSlotRow.run_id == slot.run_id))
    used = {slot.slot for slot in live}
    free = next((n for n in range(limit) if n not in used), None)
    if free is None:
        return False
    session.execute(insert(PoolSlotRow).values(pool=pool, slot=free, owner=owner, run_id=run_id, attempt=attempt,
                                                taken_at=utcnow()))
    return True


def free_slots(session: Session, owner: str, attempts: Sequence[int] | None = None) -> None:
    """Free the slots `owner` holds for `attempts` (None: all of them)."""
    query = delete(PoolSlotRow).where(PoolSlotRow.owner == owner)
    if attempts is not None:
        if not attempts:
            return
        query = query.where(PoolSlotRow.attempt.in_(list(attempts)))
    session.execute(query)
