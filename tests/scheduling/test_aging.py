"""Aging's clocks: one lift per run and period, served runs wait, nothing piles up."""

from __future__ import annotations

from skyloop.scheduling.aging import STARVED_PERIODS, Aging


class _Queue:
    """What `Aging` asks of the queue: (class now, own class) of each live candidate."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[int, int]] = {}

    def standing(self, key: int, token: int) -> tuple[int, int] | None:
        return self.live.get(key)

    def lift(self, lifts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for key, klass in lifts:
            self.live[key] = (klass, self.live[key][1])
        return lifts


def test_a_run_lifts_its_oldest_candidate_once_a_period_it_launched_nothing() -> None:
    queue = _Queue()
    aging = Aging(10, queue.standing)
    for key, ready_at in ((1, 3), (2, 0), (3, 5)):  # 2 is the oldest, though pushed second
        queue.live[key] = (0, 0)
        aging.add("r", ready_at, key, key)
    aging.served("r", 8)
    assert queue.lift(aging.lifts(12, 2)) == []  # served at 8: not a period yet
    assert queue.lift(aging.lifts(18, 2)) == [(2, 1)]
    assert queue.lift(aging.lifts(27.9, 2)) == []  # the lift started the clock again
    # Three periods in one call: one lift each, oldest first (2's clock restarted when it rose).
    assert sorted(queue.lift(aging.lifts(48, 2))) == [(1, 1), (2, 2), (3, 1)]


def test_several_periods_in_one_call_lift_one_candidate_several_classes() -> None:
    queue = _Queue()
    aging = Aging(10, queue.standing)
    queue.live[1] = (0, 0)
    aging.add("r", 0, 1, 1)
    assert queue.lift(aging.lifts(35, 5)) == [(1, 3)]


def test_a_served_run_still_lifts_a_candidate_that_waited_long_enough() -> None:
    # Its run launches other work all along (CPU steps), while this one waits for what urgent work holds.
    queue = _Queue()
    aging = Aging(10, queue.standing)
    queue.live[1] = (0, 0)
    aging.add("r", 0, 1, 1)
    for now in range(1, 10 * STARVED_PERIODS):
        aging.served("r", now)
        assert aging.lifts(now, 1) == []
    assert queue.lift(aging.lifts(10 * STARVED_PERIODS, 1)) == [(1, 1)]


def test_candidates_that_left_do_not_pile_up() -> None:
    queue = _Queue()
    aging = Aging(1, queue.standing)
    # One class for days: every candidate that waited a period sits at the top; once gone, it must go.
    for key in range(5_000):
        queue.live[key] = (0, 0)
        aging.add(f"r{key % 7}", key, key, key)
        aging.lifts(key + 2, 0)
        del queue.live[key]
    assert len(aging._capped) < 200
    # A run whose oldest candidate waits while it launches thousands of others behind it.
    queue.live[-1] = (0, 0)
    aging.add("busy", 0, -1, -1)
    for key in range(10_000, 15_000):
        queue.live[key] = (0, 0)
        aging.add("busy", key, key, key)
        del queue.live[key]
        aging.served("busy", key)
    assert len(aging._runs["busy"]) < 200
    aging.forget("busy")
    aging.served("busy", 1e9)  # a launch after it has nothing waiting keeps nothing
    assert "busy" not in aging._served


def test_off_lifts_nothing() -> None:
    for seconds in (0, float("inf")):
        aging = Aging(seconds, lambda key, token: (0, 0))
        aging.add("r", 0, 1, 1)
        assert aging.lifts(1e9, 5) == []
