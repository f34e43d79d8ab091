"""Upward ranks: the longest path from each task to the end of its run."""

from __future__ import annotations

import time

import pytest

from skyloop.scheduling.ranks import upward_ranks


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


def test_long_chains_and_wide_fans_are_linear() -> None:
    n = 20_000
    chain = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(n)}
    fan = {"root": [], **{f"leaf{i}": ["root"] for i in range(n)}}
    started = time.perf_counter()
    assert upward_ranks(chain, dict.fromkeys(chain, 1.0))["t0"] == n
    assert upward_ranks(fan, {"root": 1.0, "leaf7": 9.0})["root"] == 10.0
    assert time.perf_counter() - started < 1.0
