"""The simulator: it never over-commits, never beats the lower bound, and skyloop's policy earns its keep."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from skyloop.scheduling import (
    FAMILIES,
    PolicyConfig,
    ReadyQueue,
    SimResult,
    SimRun,
    SimTask,
    downstream_weights,
    layered_dag,
    lower_bound,
    plan_pools,
    realize,
    simulate,
)
from skyloop.spec.resources import Resources

POLICIES = ["skyloop", "fifo", "fifo-hol", "airflow"]
CAPACITY = Resources(cpus=16, memory=64 * 2**30, gpus=2, custom={"license": 2})


def _t(name: str, deps: Sequence[str] = (), cpus: float = 1, duration: float = 1.0, pool: str | None = None) -> SimTask:
    return SimTask(name, tuple(deps), Resources(cpus=cpus), duration, pool=pool)


def _usage_from_spans(runs: Sequence[SimRun], result: SimResult, pools: dict[str, int]) -> None:
    """Recompute what ran at once from the recorded spans and requests, and check it against capacity."""
    tasks = {(run.run_id, t.name): t for run in runs for t in run.tasks}
    for (run_id, name), (start, end) in result.spans.items():
        for dep in tasks[(run_id, name)].deps:
            assert result.spans[(run_id, dep)][1] <= start + 1e-9, f"{name} started before {dep} ended"
        assert end - start == pytest.approx(tasks[(run_id, name)].duration)
    for at, _ in result.spans.values():
        live = [tasks[key] for key, (s, e) in result.spans.items() if s <= at < e]
        total = Resources(cpus=0)
        for t in live:
            total = total + t.resources
        assert total.fits(CAPACITY), f"over-committed at {at}: {total}"
        for pool, limit in pools.items():
            assert sum(t.pool == pool for t in live) <= limit


def _random_runs(rng: random.Random) -> tuple[SimRun, ...]:
    runs = [layered_dag(rng, f"r{i}", priority=rng.choice([0, 0, 1]), submit_at=rng.uniform(0, 50)) for i in range(2)]
    wide = tuple(SimTask(f"w{i}", (), Resources(cpus=rng.choice([1, 2, 4]), gpus=rng.choice([0, 0, 1])),
                         rng.uniform(1, 30), pool=rng.choice([None, "gpu-train"])) for i in range(20))
    return (*runs, SimRun("wide", wide))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(4))
def test_never_over_commits_and_never_beats_the_bound(policy: str, seed: int) -> None:
    runs = _random_runs(random.Random(seed))
    pools = {"gpu-train": 1}
    result = simulate(runs, CAPACITY, policy, config=PolicyConfig(pools=dict(pools), aging_seconds=20))
    assert result.peak.fits(CAPACITY)
    assert result.peak_pools.get("gpu-train", 0) <= 1
    assert len(result.spans) == sum(len(r.tasks) for r in runs)
    _usage_from_spans(runs, result, pools)
    assert result.makespan >= lower_bound(runs, CAPACITY, pools, tight=True) - 1e-6
    assert lower_bound(runs, CAPACITY, pools, tight=True) >= lower_bound(runs, CAPACITY, pools)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_simulate_within_bounds(family: str) -> None:
    scenario = FAMILIES[family](0)
    runs = realize(scenario.runs, 0)
    bound = lower_bound(runs, scenario.capacity, scenario.pools, tight=True)
    for policy in ("skyloop", "fifo"):
        result = simulate(runs, scenario.capacity, policy, config=PolicyConfig(pools=dict(scenario.pools)))
        assert result.peak.fits(scenario.capacity)
        assert bound - 1e-6 <= result.makespan < 3 * bound
        assert result.decisions > 0 and result.decision_seconds >= 0


def test_skyloop_beats_fifo_when_the_critical_path_is_not_the_widest_branch() -> None:
    # root -> 8 short tasks (the wide branch, made ready first) and root -> one long task.
    tasks = (_t("root"), *(_t(f"short{i}", ["root"], duration=10) for i in range(8)),
             _t("long", ["root"], duration=100))
    runs = [SimRun("r", tasks)]
    capacity = Resources(cpus=2)
    fifo = simulate(runs, capacity, "fifo")
    sky = simulate(runs, capacity, "skyloop")
    assert sky.makespan == pytest.approx(101) and fifo.makespan == pytest.approx(141)
    assert sky.makespan == pytest.approx(lower_bound(runs, capacity))
    # Learned estimates that only know the long step is long are enough.
    learned = simulate(runs, capacity, "skyloop", estimates={("r", "long"): 90.0})
    assert learned.makespan == pytest.approx(101)


def test_runs_feed_a_shared_pool_in_the_order_that_keeps_it_busy() -> None:
    # Two runs: feed (1 CPU) -> train (the GPU pool of 1) -> post, on one CPU. Per-run ranks would
    # feed B first (its path is longer) and leave the pool idle for 50 s; the pool plan feeds A first.
    def run(run_id: str, feed: float) -> SimRun:
        return SimRun(run_id, (_t("feed", duration=feed),
                               SimTask("train", ("feed",), Resources(cpus=0), 100.0, pool="gpu"),
                               SimTask("post", ("train",), Resources(cpus=0), 5.0)))
    runs = [run("a", 10.0), run("b", 50.0)]
    result = simulate(runs, Resources(cpus=1), "skyloop", config=PolicyConfig(pools={"gpu": 1}))
    assert result.spans[("a", "train")] == (10.0, 110.0) and result.spans[("b", "train")] == (110.0, 210.0)
    assert result.makespan == pytest.approx(215.0)


def _contended(extra: int = 0) -> tuple[SimRun, ...]:
    """Runs `a` and `b` feed a pool of one; a high-priority run holds half of the 4 CPUs throughout.

    `a`'s feed is 80 CPU-seconds that the whole machine would do in 20 s, `b`'s a 30 s GPU task, so
    Schrage's plan serves `a` first; but `a` gets 2 CPUs at most (40 s), and feeding `b` first keeps
    the pool busy from 30 s on while `a`'s fan-out runs beside it. `extra` runs of a 50 s feed and a
    5 s pool task each make the group too large to try every order.
    """
    one = Resources(cpus=1)
    return (
        SimRun("busy", (SimTask("long", (), Resources(cpus=2), 200.0),), priority=1),
        SimRun("a", (*(SimTask(f"fan{i}", (), one, 10.0) for i in range(8)),
                     SimTask("train", tuple(f"fan{i}" for i in range(8)), one, 100.0, pool="p"))),
        SimRun("b", (SimTask("gpu", (), Resources(cpus=1, gpus=1), 30.0),
                     SimTask("train", ("gpu",), one, 100.0, pool="p"))),
        *(SimRun(f"c{i}", (SimTask("feed", (), one, 50.0 + i), SimTask("train", ("feed",), one, 5.0, pool="p")))
          for i in range(extra)),
    )


def test_the_pool_order_is_planned_by_simulating_the_candidates() -> None:
    runs, capacity, config = _contended(), Resources(cpus=4, gpus=1), PolicyConfig(pools={"p": 1})
    schrage = simulate(runs, capacity, "skyloop", config=config, plan_budget=0)
    assert schrage.spans[("a", "train")] == (40.0, 140.0) and schrage.makespan == 240.0
    assert plan_pools(runs, capacity, config) == {("p", 0): [(2, "train"), (1, "train")]}
    planned = simulate(runs, capacity, "skyloop", config=config)
    assert planned.spans[("b", "train")] == (30.0, 130.0) and planned.spans[("a", "train")] == (130.0, 230.0)
    assert planned.makespan == 230.0 and planned.plan_seconds > 0
    # A fixed order is followed as given.
    fixed = simulate(runs, capacity, "skyloop", config=config, orders={("p", 0): [(1, "train"), (2, "train")]})
    assert fixed.makespan == 240.0


def test_a_large_pool_group_is_planned_by_swapping_neighbours_within_the_budget() -> None:
    runs, capacity, config = _contended(extra=3), Resources(cpus=4, gpus=1), PolicyConfig(pools={"p": 1})
    schrage = [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (5, "train")]
    assert plan_pools(runs, capacity, config, budget=1) == {("p", 0): schrage}  # the one simulation is Schrage's
    swapped = [(2, "train"), (1, "train"), *schrage[2:]]
    assert plan_pools(runs, capacity, config) == {("p", 0): swapped}
    assert simulate(runs, capacity, "skyloop", config=config).makespan == 245.0
    assert simulate(runs, capacity, "skyloop", config=config, plan_budget=0).makespan == 255.0


def test_a_high_priority_run_submitted_later_starts_first() -> None:
    low = SimRun("low", tuple(_t(f"l{i}", duration=10) for i in range(5)), submit_at=0)
    high = SimRun("high", tuple(_t(f"h{i}", duration=10) for i in range(3)), priority=1, submit_at=1)
    result = simulate([low, high], Resources(cpus=1), "skyloop")
    starts = sorted((start, run) for (run, _), (start, _) in result.spans.items())
    assert [run for _, run in starts] == ["low", "high", "high", "high", "low", "low", "low", "low"]


def test_strict_fifo_blocks_behind_the_head() -> None:
    tasks = (_t("big", cpus=4, duration=10), _t("small", cpus=1, duration=10))
    first = (_t("hold", cpus=1, duration=5),)
    runs = [SimRun("a", first), SimRun("b", tasks, submit_at=0.5)]
    capacity = Resources(cpus=4)
    assert simulate(runs, capacity, "fifo-hol").spans[("b", "small")][0] == pytest.approx(15)
    assert simulate(runs, capacity, "fifo").spans[("b", "small")][0] == pytest.approx(0.5)


def test_a_callable_policy_and_unknown_names() -> None:
    runs = [SimRun("r", (_t("a"), _t("b", ["a"])))]
    assert simulate(runs, Resources(cpus=1), ReadyQueue).makespan == pytest.approx(2)
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(runs, Resources(cpus=1), "lifo")


def test_impossible_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="more than the capacity"):
        simulate([SimRun("r", (_t("a", cpus=8),))], Resources(cpus=4))
    with pytest.raises(ValueError, match="unknown"):
        simulate([SimRun("r", (_t("a", ["nope"]),))], Resources(cpus=4))


def test_downstream_weights_count_descendants_once() -> None:
    run = SimRun("r", (_t("a"), _t("b", ["a"]), _t("c", ["a"]), _t("d", ["b", "c"])))
    assert downstream_weights(run) == {"a": 4, "b": 2, "c": 2, "d": 1}


def test_lower_bound_parts() -> None:
    chain = SimRun("chain", (_t("a", duration=3), _t("b", ["a"], duration=4)), submit_at=2)
    assert lower_bound([chain], Resources(cpus=8)) == 9
    wide = SimRun("wide", tuple(_t(f"w{i}", cpus=2, duration=10) for i in range(8)))
    assert lower_bound([wide], Resources(cpus=4)) == 40
    pooled = SimRun("p", tuple(_t(f"p{i}", duration=10, pool="one") for i in range(3)))
    assert lower_bound([pooled], Resources(cpus=8), {"one": 1}) == 30
    gated = SimRun("g", (_t("before", duration=5),
                         *(_t(f"p{i}", ["before"], duration=10, pool="one") for i in range(3)),
                         _t("after", [f"p{i}" for i in range(3)], duration=5)))
    assert lower_bound([gated], Resources(cpus=8), {"one": 1}) == 30
    assert lower_bound([gated], Resources(cpus=8), {"one": 1}, tight=True) == 40


def test_realize_is_seeded_and_keeps_the_shape() -> None:
    runs = FAMILIES["ml"](3).runs
    a, b, c = realize(runs, 1), realize(runs, 1), realize(runs, 2)
    assert a == b and a != c
    assert [t.name for t in a[0].tasks] == [t.name for t in runs[0].tasks]
    assert sum(t.step == "hpo" for t in runs[0].tasks) == 32
