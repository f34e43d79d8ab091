"""An orchestrator's side of the concurrency pools held in the DB (`skyloop.store.pools`).

The policy applies a pool's limit to what it launches, counting the slots other processes hold
(`PolicyConfig.pools_held_elsewhere`, read from the DB at most every `POLL_SECONDS` while members of a
pool wait). Each launch of a member then takes a slot in the DB before it starts: one another process
took in between is not launched, but queued again. Its slot is freed when the attempt ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from sqlalchemy.exc import IntegrityError

from skyloop.errors import StoreError
from skyloop.scheduling.policy import Candidate, PolicyConfig
from skyloop.store.db import Database
from skyloop.store.pools import free_slots, held_elsewhere, take_slot

__all__ = ["POLL_SECONDS", "PoolSlots"]

POLL_SECONDS = 0.5
"""How often the slots other processes hold are read while members of a pool wait: how soon one they free is
taken here."""


class PoolSlots:
    """The DB slots of the limited pools that this orchestrator's attempts hold."""

    def __init__(self, db: Database, owner: str, config: PolicyConfig) -> None:
        self.db, self.owner, self.config = db, owner, config
        self.held: dict[int, str] = {}
        """Candidate key -> the pool whose slot it holds."""
        self._read_at = -POLL_SECONDS
        self.waiting = False
        """Members of a pool wait for slots other processes hold: nothing here will free them, so the
        orchestrator looks again within `POLL_SECONDS` (and does not take it for a deadlock)."""

    def limited(self, pool: str | None) -> bool:
        return pool is not None and pool in self.config.pools

    def refresh(self, waiting: Iterable[str | None]) -> None:
        """Read the slots held elsewhere of the limited pools among `waiting` (the pools of queued attempts),
        at most every `POLL_SECONDS`; with none of them waiting, forget them."""
        pools = {pool for pool in waiting if pool is not None and pool in self.config.pools}
        if not pools:
            self.config.pools_held_elsewhere.clear()
            self.waiting = False
            return
        now = time.monotonic()
        if now - self._read_at < POLL_SECONDS:
            return
        self._read_at = now
        with self.db.read() as session:
            elsewhere = held_elsewhere(session, pools, self.owner)
        self.config.pools_held_elsewhere.clear()
        self.config.pools_held_elsewhere.update(elsewhere)
        self.waiting = bool(elsewhere)

    def take(self, cand: Candidate) -> bool:
        """Take a slot for a launch of `cand` (a member of a limited pool); False if another process holds the
        last one (its slots count as held elsewhere until they are read again)."""
        assert cand.pool is not None
        try:
            with self.db.session() as session:
                taken = take_slot(session, cand.pool, self.config.pools[cand.pool], owner=self.owner,
                                  run_id=cand.run_id, attempt=cand.key)
        except StoreError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            taken = False  # another process inserted that slot first
        if taken:
            self.held[cand.key] = cand.pool
        else:
            elsewhere = self.config.pools_held_elsewhere
            elsewhere[cand.pool] = elsewhere.get(cand.pool, 0) + 1
            self.waiting = True
            self._read_at = time.monotonic()
        return taken

    def free(self, keys: Iterable[int]) -> None:
        """The attempts of `keys` ended (or never started): free the slots they hold."""
        mine = [key for key in keys if self.held.pop(key, None) is not None]
        if mine:
            with self.db.session() as session:
                free_slots(session, self.owner, mine)

    def free_all(self) -> None:
        """Free every slot held (this orchestrator stops; where the DB is away, they go stale with its runs)."""
        if self.held:
            self.held.clear()
            with contextlib.suppress(Exception), self.db.session() as session:
                free_slots(session, self.owner)
