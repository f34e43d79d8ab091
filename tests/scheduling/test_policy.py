"""The launch policy: priority, arrival order, fitting and backfill."""

from __future__ import annotations

from skyloop.scheduling.policy import BACKFILL_SCAN, Candidate, ReadyQueue, select
from skyloop.spec.resources import Resources


def _c(key: int, cpus: float = 1, priority: int = 0, memory: int = 0, gpus: int = 0) -> Candidate:
    return Candidate(key=key, resources=Resources(cpus=cpus, memory=memory, gpus=gpus), priority=priority, seq=key)


def test_priority_then_arrival_order() -> None:
    chosen = select([_c(1), _c(2, priority=5), _c(3), _c(4, priority=5)], Resources(cpus=3))
    assert [c.key for c in chosen] == [2, 4, 1]


def test_backfill_takes_smaller_requests_behind_a_large_one() -> None:
    chosen = select([_c(1, cpus=4), _c(2, cpus=1), _c(3, gpus=1), _c(4, cpus=1)], Resources(cpus=2))
    assert [c.key for c in chosen] == [2, 4]


def test_what_does_not_fit_stays_queued_in_order() -> None:
    queue = ReadyQueue()
    for i in range(1, 6):
        queue.push(_c(i))
    assert [c.key for c in queue.take(Resources(cpus=2))] == [1, 2]
    assert len(queue) == 3
    assert [c.key for c in queue.take(Resources(cpus=0.5))] == []
    assert [c.key for c in queue.take(Resources(cpus=8))] == [3, 4, 5]
    assert len(queue) == 0


def test_backfill_scan_is_bounded() -> None:
    queue = ReadyQueue()
    for i in range(BACKFILL_SCAN + 10):
        queue.push(_c(i, cpus=1, memory=10))
    queue.push(_c(10_000, cpus=1))  # fits, but sits behind more misses than a turn looks past
    assert queue.take(Resources(cpus=4, memory=5)) == []
    assert len(queue) == BACKFILL_SCAN + 11
