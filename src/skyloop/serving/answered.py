"""Which inference ids a server has answered, shared by its worker processes, so that feedback names an answer.

With several workers on one port an answer and its feedback may reach different processes, so an id is not
looked up in the answering process's memory alone. Each worker records the ids it answers in its own part
of a table in shared memory (an anonymous mapping made before the fork), and any worker looks an id up in
every part. A worker that dies and is started again gets its part back, with what its predecessor answered.

A part is a hash table of 64-bit hashes of (model, id) in buckets of 8, each bucket overwriting its oldest
entry, with the rows of each answer beside its hash (feedback's truth is checked against them in any worker):
3 MiB that hold at least a worker's last 20,000 answers (an id is forgotten sooner only when 8 newer
ones land in its bucket: for 20,000 newer answers, about one chance in 3.6 million) and about 99% of its
last 100,000. One writer per part, on its event loop: no lock. A false match needs two ids of one model
whose 64-bit hashes agree.
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["REMEMBERED", "AnsweredIds"]

_WAYS = 8
_BUCKETS = 1 << 15
REMEMBERED = 20_000
"""Answers per worker process remembered for sure (see the module docstring for the odds)."""


def _hash(model: str, inference_id: str) -> int:
    # Python's own (salted) hash: every process that sees the table forked from the one that made it, so all
    # share the salt; it costs a tenth of a hashlib digest on the hot path.
    return hash((model, inference_id)) & 0xFFFF_FFFF_FFFF_FFFF or 1  # 0 marks an empty slot


class AnsweredIds:
    """Recent (model, inference id) pairs answered by any of `parts` worker processes of one server."""

    def __init__(self, parts: int = 1) -> None:
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        slots = parts * _BUCKETS * _WAYS
        # Anonymous and MAP_SHARED (mmap's default): forked workers write to the same pages as their parent.
        self._map = mmap.mmap(-1, slots * 12 + parts * _BUCKETS)
        self._table = np.frombuffer(self._map, np.uint64, slots).reshape(parts, _BUCKETS, _WAYS)
        self._rows_table = np.frombuffer(self._map, np.uint32, slots, slots * 8).reshape(parts, _BUCKETS, _WAYS)
        # The same memory as flat views for `add`: a memoryview item is ~10x quicker than a numpy scalar.
        self._slots = memoryview(self._map)[:slots * 8].cast("Q")
        self._rows = memoryview(self._map)[slots * 8:slots * 12].cast("I")
        self._next = memoryview(self._map)[slots * 12:].cast("B")
        self.part = 0
        """The part this process writes (its worker's index)."""

    def use_part(self, index: int) -> None:
        """Write to part `index` from now on (call in a forked worker, with its index)."""
        if not 0 <= index < self._table.shape[0]:
            raise ValueError(f"part {index} out of range: this table has {self._table.shape[0]}")
        self.part = index

    def add(self, model: str, inference_id: str, rows: int = 0) -> None:
        """Record that `model` answered `inference_id` with `rows` rows (0: not known; hot path: a hash and three
        stores). The rows go in before the hash, so that a reader that finds the hash finds them."""
        h = _hash(model, inference_id)
        bucket = self.part * _BUCKETS + h % _BUCKETS
        way = self._next[bucket]
        self._rows[bucket * _WAYS + way] = min(max(rows, 0), 0xFFFF_FFFF)
        self._slots[bucket * _WAYS + way] = h
        self._next[bucket] = (way + 1) % _WAYS

    def has(self, model: str, inference_id: str) -> bool:
        """Whether some worker of this server recorded that `model` answered `inference_id`."""
        return self.rows(model, inference_id) is not None

    def rows(self, model: str, inference_id: str) -> int | None:
        """The rows of the answer some worker recorded for `model` and `inference_id` (0: not known), or None
        when none did."""
        found = self.answer(model, inference_id)
        return None if found is None else found[1]

    def answer(self, model: str, inference_id: str) -> tuple[int, int] | None:
        """(the part of the worker that recorded it, its rows) for `model` and `inference_id`, or None when no
        worker did (the latest part, were it ever two)."""
        h = _hash(model, inference_id)
        found = np.flatnonzero(self._table[:, h % _BUCKETS, :] == h)
        if not found.size:
            return None
        at = int(found[-1])
        return at // _WAYS, int(self._rows_table[:, h % _BUCKETS, :].reshape(-1)[at])
