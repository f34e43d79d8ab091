"""The launch policy: classes, aging, fair share, rank, pools, best fit, backfill with a reservation."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any

import pytest

import skyloop.scheduling
from skyloop.scheduling.policy import BACKFILL_SCAN, Candidate, PolicyConfig, ReadyQueue, select
from skyloop.spec.resources import Resources

GiB = 2**30


def _c(key: int, cpus: float = 1, priority: int = 0, memory: int = 0, gpus: int = 0, run: str = "",
       rank: float = 0.0, estimate: float = 0.0, pool: str | None = None, ready_at: float = 0.0,
       custom: dict[str, float] | None = None) -> Candidate:
    return Candidate(key=key, resources=Resources(cpus=cpus, memory=memory, gpus=gpus, custom=custom or {}),
                     priority=priority, seq=key, run_id=run, rank=rank, estimate=estimate, pool=pool,
                     ready_at=ready_at)


def _keys(chosen: list[Candidate]) -> list[int]:
    return [c.key for c in chosen]


def test_priority_then_arrival_order() -> None:
    chosen = select([_c(1), _c(2, priority=5), _c(3), _c(4, priority=5)], Resources(cpus=3))
    assert _keys(chosen) == [2, 4, 1]


def test_class_comes_before_rank() -> None:
    chosen = select([_c(1, rank=1000), _c(2, priority=1, rank=1)], Resources(cpus=1))
    assert _keys(chosen) == [2]


def test_longest_rank_first_then_arrival() -> None:
    chosen = select([_c(1, rank=5), _c(2, rank=50), _c(3, rank=20), _c(4, rank=50)], Resources(cpus=4))
    assert _keys(chosen) == [2, 4, 3, 1]


def test_backfill_takes_smaller_requests_behind_a_large_one() -> None:
    chosen = select([_c(1, cpus=4), _c(2, cpus=1), _c(3, gpus=1), _c(4, cpus=1)], Resources(cpus=2))
    assert _keys(chosen) == [2, 4]


def test_what_does_not_fit_stays_queued_in_order() -> None:
    queue = ReadyQueue()
    for i in range(1, 6):
        queue.push(_c(i))
    assert _keys(queue.take(Resources(cpus=2))) == [1, 2]
    assert len(queue) == 3
    assert _keys(queue.take(Resources(cpus=0.5))) == []
    assert _keys(queue.take(Resources(cpus=8))) == [3, 4, 5]
    assert len(queue) == 0


def test_backfill_scan_is_bounded() -> None:
    # A head that waits for memory gets the reservation; what fits now but would take memory the head needs
    # when it starts is looked at (popped) and passed over, one bucket each: a turn stops after `backfill_scan`.
    def queue_of(misses: int, config: PolicyConfig | None = None) -> ReadyQueue:
        queue = ReadyQueue(config)
        queue.occupy(_c(0, memory=10, estimate=10, run="running"), 0.0)
        queue.push(_c(1, memory=100, rank=1000, estimate=10, run="head"))
        for i in range(misses):  # each of its own run: each bucket must be looked at
            queue.push(_c(2 + i, memory=1 + i, rank=100 - i / 1000, estimate=100, run=f"miss{i}"))
        queue.push(_c(10_000, rank=1, estimate=100, run="fits"))  # fits beside the head: may backfill
        return queue

    free = Resources(cpus=8, memory=90)
    assert _keys(queue_of(10).take(free, now=0.0)) == [10_000]
    queue = queue_of(BACKFILL_SCAN + 10)
    assert queue.take(free, now=0.0) == []  # it sits behind more misses than a turn looks past
    assert len(queue) == BACKFILL_SCAN + 12
    queue = queue_of(5, PolicyConfig(backfill_scan=3))
    assert queue.take(free, now=0.0) == []
    queue.config.backfill_scan = 10
    assert _keys(queue.take(free, now=0.0)) == [10_000]


@pytest.mark.parametrize(("blocked", "run"), [({"pool": "gpu-train"}, "sweep"), ({"gpus": 1}, "sweep"),
                                              ({"custom": {"license": 1}}, "sweep"), ({"memory": 6}, "other")])
def test_a_fan_out_waiting_on_a_pool_or_a_resource_does_not_hold_back_work_that_fits(blocked: dict[str, Any],
                                                                                     run: str) -> None:
    # Hundreds of units waiting on one pool slot (or on the GPU, memory or license that one of them holds)
    # were popped a few at a time until the call's scan ran out: a step that fitted in the idle CPUs waited
    # until fewer than 64 of them were left (20 s on a real run, hours for a sweep of long trials). (Memory
    # is not part of a bucket's key: behind a run's own memory-bound units, a step of that run still waits.)
    queue = ReadyQueue(PolicyConfig(pools={"gpu-train": 1}))
    queue.occupy(_c(0, run="sweep", rank=10, estimate=5, **blocked), 0.0)
    for key in range(1, 301):
        queue.push(_c(key, run="sweep", rank=10, estimate=5, **blocked))
    queue.push(_c(10_000, run=run, rank=1, estimate=1))
    free = Resources(cpus=7, memory=4, gpus=0, custom={"license": 0.0})
    assert _keys(queue.take(free, now=0.0)) == [10_000]
    assert len(queue) == 300
    queue.done(0)  # the slot (or the resource) frees up: the next unit of the sweep takes it
    assert _keys(queue.take(Resources(cpus=6, memory=10, gpus=1, custom={"license": 1.0}), now=1.0)) == [1]


def test_remove_and_replace() -> None:
    queue = ReadyQueue()
    for i in range(3):
        queue.push(_c(i))
    assert queue.remove(1) and not queue.remove(1)
    queue.push(_c(0, priority=-1))  # the same key again replaces the queued one
    assert len(queue) == 2
    assert _keys(queue.take(Resources(cpus=8))) == [2, 0]


def test_aging_lifts_a_starved_low_priority_task() -> None:
    queue = ReadyQueue(PolicyConfig(aging_seconds=10, fair_share_seconds=0))
    queue.push(_c(1, priority=0, run="batch", rank=1, ready_at=0))
    for key in range(2, 12):
        queue.push(_c(key, priority=2, run="urgent", rank=100, ready_at=5))
    queue.occupy(_c(100, priority=2, run="urgent"), started_at=0)  # the urgent run holds the other CPU
    assert _keys(queue.take(Resources(cpus=1), now=9)) == [2]
    assert queue.done(2)
    assert _keys(queue.take(Resources(cpus=1), now=15)) == [3]  # one class up is not enough
    assert queue.done(3)
    assert _keys(queue.take(Resources(cpus=1), now=21)) == [1]  # two are: fair share serves it


def test_aging_counts_only_the_time_its_run_launched_nothing() -> None:
    # A run that was served is not starving: lifting its candidates over urgent work would only
    # delay that work's critical path (the mixed workload's makespan grew 2% from it).
    queue = ReadyQueue(PolicyConfig(aging_seconds=10, fair_share_seconds=0))
    queue.push(_c(1, run="batch", rank=1, ready_at=0))
    queue.push(_c(2, run="batch", rank=1, ready_at=0))
    assert _keys(queue.take(Resources(cpus=1), now=8)) == [1]  # nothing urgent yet: batch is served at 8
    assert queue.done(1)
    for key in range(10, 14):
        queue.push(_c(key, priority=1, run="urgent", rank=100, ready_at=9))
    queue.occupy(_c(100, priority=1, run="urgent"), started_at=9)  # the urgent run holds the other CPU
    assert _keys(queue.take(Resources(cpus=1), now=12)) == [10]  # 2 waited 12 s, its run only 4 s
    assert queue.done(10)
    assert _keys(queue.take(Resources(cpus=1), now=17.5)) == [11]
    assert queue.done(11)
    assert _keys(queue.take(Resources(cpus=1), now=18)) == [2]  # 10 s since its run's last launch


def test_aging_lifts_one_step_of_a_waiting_run_per_period() -> None:
    # Lifting every waiting step of a run at once put whole runs into the urgent class after one
    # period: the urgent run then got only its fair share of the machine and could finish last.
    queue = ReadyQueue(PolicyConfig(aging_seconds=10, fair_share_seconds=0))
    for key in (1, 2, 3):
        queue.push(_c(key, run="batch", rank=1, ready_at=0))
    for key in range(10, 20):
        queue.push(_c(key, priority=1, run="urgent", rank=100, ready_at=0))
    queue.occupy(_c(100, priority=1, run="urgent"), started_at=0)  # the urgent run holds the other CPU
    assert _keys(queue.take(Resources(cpus=1), now=5)) == [10]
    assert queue.done(10)
    assert _keys(queue.take(Resources(cpus=1), now=10)) == [1]  # the oldest rose, and went first
    assert queue.done(1)
    assert _keys(queue.take(Resources(cpus=1), now=15)) == [11]  # 2 and 3 stayed in their class
    assert queue.done(11)
    assert _keys(queue.take(Resources(cpus=1), now=20)) == [2]  # a period after the last launch


def test_a_step_pushed_again_keeps_what_aging_gave_it() -> None:
    # The orchestrator pushes waiting steps again when their ranks change (runs sharing a pool came or
    # went); a step that rose must not start over, or steady re-ranking would keep it waiting forever.
    queue = ReadyQueue(PolicyConfig(aging_seconds=10, fair_share_seconds=0))
    queue.push(_c(1, run="batch", rank=1, ready_at=0))
    for key in range(10, 30):
        queue.push(_c(key, priority=2, run="urgent", rank=100, ready_at=0))
    queue.occupy(_c(100, priority=2, run="urgent"), started_at=0)  # the urgent run holds the other CPU
    assert _keys(queue.take(Resources(cpus=1), now=10)) == [10]  # 1 rose to class 1 of 2
    assert queue.done(10)
    queue.push(_c(1, run="batch", rank=2, ready_at=0))  # re-ranked
    assert _keys(queue.take(Resources(cpus=1), now=15)) == [11]
    assert queue.done(11)
    assert _keys(queue.take(Resources(cpus=1), now=20)) == [1]  # a second period: class 2, and served first


def test_a_pool_member_whose_slot_is_refused_waits_on_with_what_aging_gave_it() -> None:
    # Another process can take a pool's last slot between the read of the DB and the launch: the step
    # must wait on as it was. Launched, ended and pushed anew, it started over in its own class, behind the
    # urgent stream, and its run counted as served (its other step, 2, waits too).
    queue = ReadyQueue(PolicyConfig(aging_seconds=10, fair_share_seconds=0, pools={"p": 1}))
    queue.push(_c(1, run="batch", rank=1, ready_at=0, pool="p"))
    queue.push(_c(2, cpus=2, run="batch", rank=1, ready_at=19))  # never fits here
    for key in range(10, 30):
        queue.push(_c(key, priority=2, run="urgent", rank=100, ready_at=0))
    queue.occupy(_c(100, priority=2, run="urgent"), started_at=0)  # the urgent run holds the other CPU
    asked: list[int] = []

    def refuse(cand: Candidate) -> bool:
        asked.append(cand.key)
        return False

    assert _keys(queue.take(Resources(cpus=1), now=10, claim=refuse)) == [10]  # 1 rose to class 1 of 2
    assert queue.done(10)
    assert _keys(queue.take(Resources(cpus=1), now=15, claim=refuse)) == [11]
    assert queue.done(11)
    # A second period: 1 is in class 2 and served first, but its slot is taken; the CPU goes to the next.
    assert _keys(queue.take(Resources(cpus=1), now=20, claim=refuse)) == [12]
    assert asked == [1]  # only pool members are asked, and only when they would launch
    assert len(queue) == 19 and 1 not in _keys(queue.running)
    assert queue.done(12)
    assert _keys(queue.take(Resources(cpus=1), now=21, claim=lambda cand: True)) == [1]


def test_a_refused_claim_holds_nothing_and_the_call_goes_on() -> None:
    queue = ReadyQueue(PolicyConfig(pools={"p": 2}))
    queue.push(_c(1, cpus=2, rank=10, pool="p"))
    queue.push(_c(2, cpus=2, rank=5, pool="p"))
    queue.push(_c(3, cpus=2, rank=1))
    assert _keys(queue.take(Resources(cpus=4), claim=lambda cand: cand.key != 1)) == [2, 3]
    assert _keys(queue.running) == [2, 3] and len(queue) == 1
    assert queue.done(2) and queue.done(3)
    assert _keys(queue.take(Resources(cpus=4), claim=lambda cand: True)) == [1]


def test_aging_off_keeps_classes() -> None:
    queue = ReadyQueue(PolicyConfig(aging_seconds=0))
    queue.push(_c(1, priority=0, run="batch"))
    queue.push(_c(2, priority=1, run="urgent"))
    assert _keys(queue.take(Resources(cpus=1), now=1e9)) == [2]


def test_aging_does_not_reorder_one_class() -> None:
    queue = ReadyQueue(PolicyConfig(aging_seconds=1))
    queue.push(_c(1, rank=1, ready_at=0))
    queue.push(_c(2, rank=50, ready_at=100))
    assert _keys(queue.take(Resources(cpus=1), now=101)) == [2]  # waited longer, but nobody is above it


STRICT = PolicyConfig(fair_share_seconds=0)


def test_strict_fair_share_guarantees_each_run_its_share_and_rank_orders_inside_it() -> None:
    cands = [_c(i, run="a", rank=100 - i) for i in range(4)] + [_c(10 + i, run="b", rank=10 - i) for i in range(4)]
    assert _keys(select(cands, Resources(cpus=6), STRICT)) == [0, 1, 2, 10, 11, 12]


def test_fair_share_counts_what_runs() -> None:
    cands = [_c(i, run="a", rank=100) for i in range(4)] + [_c(10 + i, run="b", rank=1) for i in range(4)]
    running = [_c(50, cpus=2, run="a")]  # of 5 CPUs each run is owed 2.5: a gets one more, then b
    assert _keys(select(cands, Resources(cpus=3), STRICT, running=running)) == [0, 10, 11]


def test_fair_share_waits_fair_share_seconds_before_overriding_rank() -> None:
    queue = ReadyQueue(PolicyConfig(fair_share_seconds=300))
    for i in range(6):
        queue.push(_c(i, run="long", rank=1000 - i))
    queue.push(_c(10, run="short", rank=5))
    first = queue.take(Resources(cpus=2), now=0)
    assert _keys(first) == [0, 1]  # rank alone: the short run is not yet owed anything
    assert queue.done(1)
    assert _keys(queue.take(Resources(cpus=1), now=299)) == [2]
    assert queue.done(1) is False  # ended already
    assert _keys(queue.take(Resources(cpus=1), now=301)) == [10]  # short for 301 s: it goes first


def test_a_run_that_comes_back_waits_fair_share_seconds_anew() -> None:
    queue = ReadyQueue(PolicyConfig(fair_share_seconds=300))
    for i in range(6):
        queue.push(_c(i, run="long", rank=1000 - i))
    queue.push(_c(10, run="short", rank=5))
    assert _keys(queue.take(Resources(cpus=1), now=0)) == [0]  # "short" is short of its share from 0 s
    assert queue.remove(10)  # ...until it has nothing waiting
    queue.push(_c(11, run="short", rank=5, ready_at=1000))
    assert _keys(queue.take(Resources(cpus=1), now=1000)) == [1]  # short again since 1000 s, not since 0
    queue.push(_c(11, run="short", rank=6, ready_at=1000))  # re-ranked: replaced, but it never left
    assert _keys(queue.take(Resources(cpus=1), now=1300)) == [11]
    queue.push(_c(12, run="short", rank=6, ready_at=1300))
    assert _keys(queue.take(Resources(cpus=0), now=1301)) == []
    queue.push(_c(12, run="long", rank=6, ready_at=1301))  # the same key, now another run's: "short" left
    queue.push(_c(13, run="short", rank=5, ready_at=2000))
    assert _keys(queue.take(Resources(cpus=1), now=2000)) == [2]  # short since 2000 s, not since 1301


def test_fair_share_weighs_a_run_by_its_dominant_resource() -> None:
    # Of 4 CPUs and 1 GPU, run a holds the GPU (and 1 CPU): its dominant share is all the GPUs, more than
    # its half, so it is owed nothing. By CPUs alone (1 of 4) it would be starved and go before b's third.
    cands = [_c(i, run="a", rank=1) for i in range(3)] + [_c(10 + i, run="b", rank=100 - i) for i in range(3)]
    running = [_c(50, cpus=1, gpus=1, run="a")]
    assert _keys(select(cands, Resources(cpus=3), STRICT, running=running)) == [10, 11, 12]
    # Memory counts too: 6 of 8 GiB is a's dominant share, though it holds 1 CPU of 4.
    running = [_c(50, cpus=1, memory=6 * GiB, run="a")]
    assert _keys(select(cands, Resources(cpus=3, memory=2 * GiB), STRICT, running=running)) == [10, 11, 12]


def test_fair_share_does_not_reorder_the_tasks_of_one_run() -> None:
    # The starved run goes first, but its longer critical path still before its shorter one.
    cands = [_c(1, run="a", rank=5), _c(2, run="a", rank=50), _c(3, run="b", rank=500)]
    running = [_c(9, cpus=4, run="b")]
    assert _keys(select(cands, Resources(cpus=2), STRICT, running=running)) == [2, 1]


def test_fair_share_follows_weights_changed_between_calls() -> None:
    config = PolicyConfig(fair_share_seconds=0)
    queue = ReadyQueue(config)
    for i in range(8):
        queue.push(_c(i, run="a", rank=100 - i))
        queue.push(_c(10 + i, run="b", rank=10 - i))
    assert _keys(queue.take(Resources(cpus=4))) == [0, 1, 10, 11]  # equal weights: 2 CPUs each
    config.run_weights["b"] = 3.0  # of 8 CPUs, b is now owed 6: it takes all 4 that free up
    assert _keys(queue.take(Resources(cpus=4))) == [12, 13, 14, 15]


def test_fair_share_honours_weights() -> None:
    config = PolicyConfig(run_weights={"a": 2.0}, fair_share_seconds=0)
    cands = [_c(i, run="a") for i in range(6)] + [_c(10 + i, run="b") for i in range(6)]
    chosen = select(cands, Resources(cpus=6), config)
    assert sum(c.run_id == "a" for c in chosen) == 4 and sum(c.run_id == "b" for c in chosen) == 2


def test_fair_share_off_orders_runs_by_rank() -> None:
    config = PolicyConfig(fair_share=False)
    cands = [_c(i, run="a", rank=100 - i) for i in range(4)] + [_c(10 + i, run="b", rank=10 - i) for i in range(4)]
    assert _keys(select(cands, Resources(cpus=4), config)) == [0, 1, 2, 3]


def test_pools_hold_across_runs() -> None:
    config = PolicyConfig(pools={"gpu-train": 1})
    cands = [_c(1, run="a", pool="gpu-train"), _c(2, run="b", pool="gpu-train"), _c(3, run="b", pool="other")]
    assert _keys(select(cands, Resources(cpus=8), config)) == [1, 3]  # an unknown pool has no limit
    busy = [_c(9, run="c", pool="gpu-train")]
    assert _keys(select(cands, Resources(cpus=8), config, running=busy)) == [3]
    config.pools["gpu-train"] = 2
    assert _keys(select(cands, Resources(cpus=8), config)) == [1, 2, 3]


def test_pool_slots_held_by_other_processes_count_against_the_limit() -> None:
    config = PolicyConfig(pools={"gpu-train": 2}, pools_held_elsewhere={"gpu-train": 1})
    cands = [_c(1, run="a", pool="gpu-train"), _c(2, run="b", pool="gpu-train"), _c(3, run="b", pool="other")]
    assert _keys(select(cands, Resources(cpus=8), config)) == [1, 3]
    config.pools_held_elsewhere["gpu-train"] = 2
    assert _keys(select(cands, Resources(cpus=8), config)) == [3]


def test_best_fit_among_equals_fills_the_scarcest_resource() -> None:
    # Same class, run and rank: the 4-CPU request fills the 4 free CPUs exactly; the 3-CPU one would strand one.
    assert _keys(select([_c(1, cpus=3), _c(2, cpus=4)], Resources(cpus=4))) == [2]
    # Memory is what is tight for the first: it takes 90% of the free memory, the second 50% of the CPUs.
    chosen = select([_c(1, cpus=2, memory=1 * GiB), _c(2, cpus=1, memory=9 * GiB)], Resources(cpus=4, memory=10 * GiB))
    assert _keys(chosen) == [2, 1]


def test_best_fit_does_not_override_rank_unless_within_the_window() -> None:
    cands = [_c(1, cpus=3, rank=100), _c(2, cpus=4, rank=95)]
    assert _keys(select(cands, Resources(cpus=4))) == [1]
    assert _keys(select(cands, Resources(cpus=4), PolicyConfig(fit_window=0.1))) == [2]


def test_a_blocked_head_shares_its_standing_with_its_runs_other_cpu_requests() -> None:
    # The head (2 CPUs, 1 free) cannot launch; key 3, of its run and rank, stands with it and goes
    # before key 2 of another run, although 2 arrived first.
    cands = [_c(1, cpus=2, run="r", rank=10), _c(2, run="s", rank=10), _c(3, run="r", rank=10)]
    assert _keys(select(cands, Resources(cpus=1), PolicyConfig(fair_share=False))) == [3]


def test_reservation_keeps_the_blocked_head_on_time() -> None:
    # 3 of 4 CPUs run a task expected to end in 10 s; the head needs all 4.
    running = [_c(99, cpus=3, estimate=10)]
    head = _c(1, cpus=4, rank=1000)
    short, long = _c(2, rank=10, estimate=5), _c(3, rank=20, estimate=100)
    assert _keys(select([head, short, long], Resources(cpus=1), running=running)) == [2]


def test_reservation_lets_long_work_use_what_the_head_leaves_spare() -> None:
    # 8 CPUs, 3 busy until t=10; the head needs 6, so 2 stay spare after it starts.
    running = [_c(99, cpus=3, estimate=10)]
    cands = [_c(1, cpus=6, rank=1000)] + [_c(i, rank=10 - i, estimate=100) for i in range(2, 6)]
    assert _keys(select(cands, Resources(cpus=5), running=running)) == [2, 3]


def test_reservation_uses_when_this_queue_launched_what_runs() -> None:
    queue = ReadyQueue()
    queue.push(_c(99, cpus=3, estimate=10))
    assert _keys(queue.take(Resources(cpus=3), now=0)) == [99]
    queue.push(_c(1, cpus=4, rank=1000))
    queue.push(_c(2, estimate=4))
    assert queue.take(Resources(cpus=1), now=7) == []  # started at 0: ends at 10, 7 + 4 > 10
    queue.push(_c(3, estimate=2))
    assert _keys(queue.take(Resources(cpus=1), now=7)) == [3]
    assert [c.key for c in queue.running] == [3, 99]  # by expected end: 9, 10
    assert queue.done(99) and queue.done(3)
    assert _keys(queue.take(Resources(cpus=4), now=8)) == [1]  # nothing runs: no reservation holds 2 back
    assert queue.running[0].key == 1


def test_the_reservation_counts_overdue_attempts_longest_overdue_first() -> None:
    # At t=10 both running attempts are overdue. The head (2 CPUs, 1 free) is promised the one that
    # should have ended first (1 CPU): nothing is left spare for a long task, whichever started first.
    small, big = _c(1, estimate=1), _c(2, cpus=4, estimate=5)
    for first, second in ((small, big), (big, small)):
        queue = ReadyQueue(PolicyConfig(fair_share=False))
        queue.occupy(first, started_at=0)
        queue.occupy(second, started_at=0)
        queue.push(_c(10, cpus=2, rank=1000, estimate=1))
        queue.push(_c(11, rank=1, estimate=100))
        assert queue.take(Resources(cpus=1), now=10) == []


def test_attempts_asking_for_no_cpu_end_cleanly() -> None:
    queue = ReadyQueue(PolicyConfig(pools={"p": 1}))
    queue.push(_c(1, run="a"))
    queue.push(_c(2, cpus=0, memory=1, run="a", pool="p"))
    queue.push(_c(3, cpus=0, memory=1, run="a", pool="p"))
    assert _keys(queue.take(Resources(cpus=2, memory=10))) == [1, 2]  # the pool holds one
    assert queue.done(1) and queue.done(2)
    assert _keys(queue.take(Resources(cpus=2, memory=10))) == [3]  # its slot freed


def test_occupy_takes_a_queued_attempt_off_the_queue() -> None:
    queue = ReadyQueue()
    queue.push(_c(7, run="a"))
    queue.occupy(_c(7, run="a"), started_at=0)
    assert len(queue) == 0 and _keys(queue.running) == [7]
    assert queue.take(Resources(cpus=4)) == []


def test_a_key_launched_again_takes_the_place_of_its_running_attempt() -> None:
    # Pushed again before the end of its first launch was reported (as a retry may be): one attempt runs.
    queue = ReadyQueue()
    queue.push(_c(1, run="r", estimate=5))
    assert _keys(queue.take(Resources(cpus=2), now=0)) == [1]
    queue.push(_c(1, run="r", estimate=5))
    assert _keys(queue.take(Resources(cpus=1), now=1)) == [1]
    assert _keys(queue.running) == [1]
    assert queue.done(1) and queue.running == []
    queue.push(_c(2, cpus=4, rank=10))
    queue.push(_c(3))
    assert _keys(queue.take(Resources(cpus=1), now=2)) == [3]  # nothing runs to hold a reservation on


_TIES = """
from skyloop.scheduling.policy import Candidate, PolicyConfig, select
from skyloop.spec.resources import Resources
cands = [Candidate(key=k, resources=Resources(cpus=k), seq=k, run_id="r", rank=10.0) for k in (1, 2, 3)]
print([c.key for c in select(cands, Resources(cpus=4), PolicyConfig(fit_scan=2, fair_share=False))])
"""


def test_ties_beyond_fit_scan_are_chosen_by_order_whatever_the_hash_seed() -> None:
    # Three CPU requests of one run tie; fit_scan=2 compares the first two in order (keys 1 and 2), and
    # key 2 fills the 4 free CPUs tighter. Which buckets tie once came from a set's order: seeds 3-5 gave [3, 1].
    seen = {subprocess.run([sys.executable, "-c", _TIES], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout.strip() for seed in (0, 3, 4, 5)}
    assert seen == {"[2, 1]"}


def test_without_estimates_backfill_is_greedy() -> None:
    running = [_c(99, cpus=3)]
    assert _keys(select([_c(1, cpus=4, rank=9), _c(2), _c(3)], Resources(cpus=1), running=running)) == [2]


def test_custom_resources_are_packed_too() -> None:
    cands = [_c(1, custom={"license": 1}), _c(2, custom={"license": 1}), _c(3)]
    assert _keys(select(cands, Resources(cpus=8, custom={"license": 1}))) == [1, 3]
    assert _keys(select(cands, Resources(cpus=8))) == [3]


def test_nothing_is_lost_across_many_turns() -> None:
    queue = ReadyQueue(PolicyConfig(aging_seconds=3, pools={"p": 1}))
    for i in range(200):
        queue.push(_c(i, cpus=1 + i % 3, priority=i % 2, run=f"r{i % 5}", rank=i % 17, estimate=i % 7,
                      pool="p" if i % 11 == 0 else None, ready_at=i / 10))
    launched: list[int] = []
    now = 0.0
    while len(queue):
        now += 1
        taken = _keys(queue.take(Resources(cpus=3), now=now))
        assert [queue.done(key) for key in taken] == [True] * len(taken)
        launched += taken
    assert sorted(launched) == list(range(200))
    assert queue.running == []


@pytest.mark.parametrize("seed", range(10))
def test_queued_and_running_stay_exact_under_any_sequence_of_calls(seed: int) -> None:
    # A model of what the queue must hold, driven through every public call in random order: keys pushed
    # again while queued or running, removed, occupied, launched, ended (some twice).
    rng = random.Random(seed)
    queue = ReadyQueue(PolicyConfig(aging_seconds=rng.choice([0, 2]), pools={"p": 2}, fit_scan=rng.choice([1, 3, 8]),
                                    fit_window=rng.choice([0.0, 0.2]), fair_share_seconds=rng.choice([0, 5])))
    queued: set[int] = set()
    running: set[int] = set()
    for step in range(400):
        key, now = rng.randrange(30), step / 4
        cand = _c(key, cpus=rng.choice([0, 1, 2, 4]), memory=rng.randint(0, 4) * GiB, priority=rng.choice([0, 1]),
                  run=f"r{rng.randrange(3)}", rank=float(rng.randrange(5)), estimate=rng.uniform(0, 3),
                  pool="p" if rng.random() < 0.2 else None, ready_at=now)
        action = rng.random()
        if action < 0.4:
            queue.push(cand)
            queued.add(key)
        elif action < 0.5:
            assert queue.remove(key) == (key in queued)
            queued.discard(key)
        elif action < 0.55:
            queue.occupy(cand, started_at=now)
            queued.discard(key)
            running.add(key)
        elif action < 0.8:
            taken = _keys(queue.take(Resources(cpus=rng.choice([0, 1, 4, 8]), memory=8 * GiB), now=now))
            assert len(set(taken)) == len(taken) and set(taken) <= queued
            queued -= set(taken)
            running |= set(taken)
        else:
            assert queue.done(key) == (key in running)
            running.discard(key)
        assert len(queue) == len(queued)
        assert sorted(_keys(queue.running)) == sorted(running)


def _reference(queued: dict[int, Candidate], free: Resources) -> list[int]:
    """Greedy list scheduling in the documented order, by brute force: sort everything, launch what fits."""
    order = sorted(queued.values(), key=lambda c: (-c.priority, -c.rank, c.seq))
    chosen = []
    for cand in order:
        if cand.resources.fits(free):
            chosen.append(cand.key)
            free = free - cand.resources
    return chosen


@pytest.mark.parametrize("seed", range(20))
def test_incremental_take_matches_a_brute_force_reference(seed: int) -> None:
    # Without fair share, running work (so no reservation) or ties (so no best fit), take() is greedy
    # list scheduling; the incremental buckets must give the same launches over many pushes and takes.
    rng = random.Random(seed)
    queue = ReadyQueue(PolicyConfig(fair_share=False, aging_seconds=0, backfill_scan=10**6))
    queued: dict[int, Candidate] = {}
    keys = iter(range(10**6))
    for turn in range(30):
        for _ in range(rng.randint(0, 40)):
            key = next(keys)
            cand = _c(key, cpus=rng.choice([1, 2, 4, 8]), memory=rng.randint(1, 8) * GiB,
                      priority=rng.choice([0, 0, 1]), run=f"r{rng.randint(0, 3)}", rank=rng.random() * 100,
                      gpus=int(rng.random() < 0.1))
            queue.push(cand)
            queued[key] = cand
        if queued and rng.random() < 0.3:
            gone = rng.choice(sorted(queued))
            assert queue.remove(gone)
            del queued[gone]
        free = Resources(cpus=rng.choice([0, 1, 3, 8, 16]), memory=rng.randint(0, 40) * GiB, gpus=rng.randint(0, 1))
        expected = _reference(queued, free)
        assert _keys(queue.take(free, now=float(turn))) == expected
        for key in expected:
            del queued[key]
        assert len(queue) == len(queued)


def test_package_exports_resolve() -> None:
    for name in skyloop.scheduling.__all__:
        assert getattr(skyloop.scheduling, name) is not None
