"""Aging's clocks: one lift per run and period, served runs wait, nothing piles up."""

from __future__ import annotations

from skyloop.scheduling.aging import Aging


def test_a_run_lifts_its_oldest_candidate_once_a_period_it_launched_nothing() -> None:
    aging = Aging(10)
    live = {1: (0, 0), 2: (0, 0), 3: (0, 0)}

    def standing(key: int, token: int) -> tuple[int, int] | None:
        return live.get(key)

    aging.add("r", 3, 1, 1)
    aging.add("r", 0, 2, 2)  # the oldest, though pushed second
    aging.add("r", 5, 3, 3)
    aging.served("r", 8)
    assert aging.lifts(12, 2, standing) == []  # served at 8: not a period yet
    assert aging.lifts(18, 2, standing) == [(2, 1)]
    live[2] = (1, 0)
    assert aging.lifts(27.9, 2, standing) == []  # the lift started the clock again
    assert aging.lifts(48, 2, standing) == [(1, 1), (3, 1), (2, 2)]  # three periods: one each, oldest first


def test_candidates_that_left_do_not_pile_up() -> None:
    # One class for days: every candidate that waited a period sits at the top; once gone, it must go.
    aging = Aging(1)
    live: dict[int, tuple[int, int]] = {}

    def standing(key: int, token: int) -> tuple[int, int] | None:
        return live.get(key)

    for key in range(5_000):
        live[key] = (0, 0)
        aging.add(f"r{key % 7}", key, key, key)
        aging.lifts(key + 2, 0, standing)
        del live[key]
    assert len(aging._capped) < 200
    assert sum(len(heap) for heap in aging._runs.values()) < 200


def test_off_lifts_nothing() -> None:
    for seconds in (0, float("inf")):
        aging = Aging(seconds)
        aging.add("r", 0, 1, 1)
        assert aging.lifts(1e9, 5, lambda key, token: (0, 0)) == []
