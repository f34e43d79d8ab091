"""Upward ranks: how long the rest of a run takes from each task on, if nothing ever waits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["upward_ranks"]


def upward_ranks(deps: Mapping[str, Iterable[str]], estimates: Mapping[str, float]) -> dict[str, float]:
    """The upward rank of every task: its estimate plus the largest rank among the tasks that wait on it.

    `deps` maps each task to the tasks it waits for. A task named only as a dependency counts too;
    a task without an estimate counts as 0 seconds. The rank is the length of the longest path from
    the task to the end of the run (HEFT's upward rank), so the task with the largest rank heads the
    critical path. Linear in tasks plus edges; raises `ValueError` on a cycle.
    """
    parents: dict[str, list[str]] = {}
    waiting: dict[str, int] = {}
    for task, ups in deps.items():
        unique = list(dict.fromkeys(ups))
        parents[task] = unique
        waiting.setdefault(task, 0)
        for up in unique:
            waiting[up] = waiting.get(up, 0) + 1
            parents.setdefault(up, [])
    # Walk from the sinks up: a task is ranked once every task waiting on it is.
    longest_below = dict.fromkeys(waiting, 0.0)
    ranks: dict[str, float] = {}
    stack = [task for task, n in waiting.items() if n == 0]
    while stack:
        task = stack.pop()
        rank = ranks[task] = float(estimates.get(task, 0.0)) + longest_below[task]
        for up in parents[task]:
            if rank > longest_below[up]:
                longest_below[up] = rank
            waiting[up] -= 1
            if waiting[up] == 0:
                stack.append(up)
    if len(ranks) != len(waiting):
        stuck = sorted(task for task in waiting if task not in ranks)
        raise ValueError(f"the dependencies have a cycle: {stuck[:5]} are on it or feed it")
    return ranks
