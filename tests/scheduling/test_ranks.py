"""Upward ranks: the longest path from each task to the end of its run."""

from __future__ import annotations

import pytest

from skyloop.scheduling.ranks import RankedRun, pooled_ranks, upward_ranks


def test_diamond() -> None:
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    ranks = upward_ranks(deps, {"a": 1, "b": 2, "c": 5, "d": 1})
    assert ranks == {"d": 1, "b": 3, "c": 6, "a": 7}


def test_tasks_named_only_as_dependencies_and_missing_estimates() -> None:
    ranks = upward_ranks({"b": ["a", "a"], "c": ("a",)}, {"a": 2, "b": 3})
    assert ranks == {"a": 5, "b": 3, "c": 0}


def test_a_cycle_is_refused() -> None:
    with pytest.raises(ValueError, match="cycle"):
        upward_ranks({"a": ["c"], "b": ["a"], "c": ["b"], "d": []}, {})


def test_long_chains_and_wide_fans_need_no_recursion() -> None:
    n = 20_000
    chain = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(n)}
    fan = {"root": [], **{f"leaf{i}": ["root"] for i in range(n)}}
    assert upward_ranks(chain, dict.fromkeys(chain, 1.0))["t0"] == n
    assert upward_ranks(fan, {"root": 1.0, "leaf7": 9.0})["root"] == 10.0


def _fed(feed: float, train: float = 100.0, pool: str = "gpu", release: float = 0.0, klass: int = 0) -> RankedRun:
    """feed -> train (in `pool`) -> post."""
    return RankedRun({"feed": [], "train": ["feed"], "post": ["train"]},
                     {"feed": feed, "train": train, "post": 5.0}, {"train": pool}, release, klass)


def test_a_shared_pool_of_one_puts_the_run_that_reaches_it_first_ahead() -> None:
    # Per run, B's feed heads the longer path (155 against 115), but A reaches the pool at 10 and B at
    # 50: the plan is A then B, so A's train carries B's queued behind it and A's feed goes first.
    a, b = pooled_ranks([_fed(10.0), _fed(50.0)], {"gpu": 1})
    assert a == {"feed": 215.0, "train": 205.0, "post": 5.0}
    assert b == {"feed": 155.0, "train": 105.0, "post": 5.0}  # last in the plan: its own ranks
    # A later release moves A behind B.
    a, b = pooled_ranks([_fed(10.0, release=100.0), _fed(50.0)], {"gpu": 1})
    assert (a["feed"], b["feed"]) == (115.0, 255.0)


def test_ranks_stay_per_run_where_no_pool_queues() -> None:
    runs = [_fed(10.0), _fed(50.0)]
    plain = [upward_ranks(r.deps, r.estimates) for r in runs]
    assert pooled_ranks(runs, {}) == plain  # unlimited pool
    assert pooled_ranks(runs, {"gpu": 2}) == plain  # as many slots as members
    assert pooled_ranks([_fed(10.0), _fed(50.0, pool="other")], {"gpu": 1, "other": 1}) == plain
    assert pooled_ranks([_fed(10.0), _fed(50.0, klass=1)], {"gpu": 1}) == plain  # classes never queue together


def test_a_pool_of_two_plans_two_lanes() -> None:
    # Four runs reach the pool at 10, 20, 30, 40: lanes (10, 30) and (20, 40).
    ranks = pooled_ranks([_fed(float(f)) for f in (10, 20, 30, 40)], {"gpu": 2})
    assert [r["train"] for r in ranks] == [205.0, 205.0, 105.0, 105.0]


def test_ancestors_cpu_work_delays_a_pool_member() -> None:
    # A's train waits on 8 one-CPU tasks of 10 s (80 CPU-seconds): on 2 CPUs it cannot start before 40,
    # so B, whose feed is one 30 s task, reaches the pool first.
    fan = RankedRun({**{f"f{i}": [] for i in range(8)}, "train": [f"f{i}" for i in range(8)]},
                    {**{f"f{i}": 10.0 for i in range(8)}, "train": 100.0}, {"train": "gpu"},
                    cpus={f"f{i}": 1.0 for i in range(8)})
    one = RankedRun({"feed": [], "train": ["feed"]}, {"feed": 30.0, "train": 100.0}, {"train": "gpu"},
                    cpus={"feed": 1.0})
    a, b = pooled_ranks([fan, one], {"gpu": 1}, cpus=2.0)
    assert b["train"] == 200.0 and a["train"] == 100.0
    a, b = pooled_ranks([fan, one], {"gpu": 1})  # without a capacity, only paths count: A at 10
    assert a["train"] == 200.0 and b["train"] == 100.0
