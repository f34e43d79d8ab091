"""The table of answered ids: per model, kept for a worker's recent answers, each worker in its own part."""

from __future__ import annotations

import pytest

from skyloop.serving.answered import REMEMBERED, AnsweredIds

RECENT = REMEMBERED // 4
"""Answers that must all be there. The hash is salted per process, so each run is a new draw: at REMEMBERED
itself a run would lose one of a part's with a chance of ~7e-4, at a quarter of it ~4e-9."""


def test_an_id_is_known_for_the_model_that_answered_it_only() -> None:
    table = AnsweredIds()
    table.add("iris", "a")
    assert table.has("iris", "a")
    assert not table.has("iris", "b") and not table.has("wine", "a") and not table.has("a", "iris")


def test_the_last_answers_of_every_part_are_remembered() -> None:
    table = AnsweredIds(parts=3)
    for part in range(3):
        table.use_part(part)
        for i in range(RECENT):
            table.add("iris", f"{part}-{i}")
    assert all(table.has("iris", f"{part}-{i}") for part in range(3) for i in range(RECENT))
    table.use_part(0)  # a part overwrites its own oldest answers only
    for i in range(20 * REMEMBERED):
        table.add("iris", f"later-{i}")
    assert sum(table.has("iris", f"0-{i}") for i in range(RECENT)) < RECENT // 10  # ~7% are left
    assert all(table.has("iris", f"{part}-{i}") for part in (1, 2) for i in range(RECENT))
    assert all(table.has("iris", f"later-{i}") for i in range(20 * REMEMBERED - RECENT, 20 * REMEMBERED))


def test_a_part_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="part 2 out of range: this table has 2"):
        AnsweredIds(parts=2).use_part(2)
    with pytest.raises(ValueError, match="parts must be at least 1"):
        AnsweredIds(parts=0)
