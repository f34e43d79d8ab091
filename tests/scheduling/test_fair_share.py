"""Fair share over time: a run kept below its weighted share by higher-ranked work gets that share."""

from __future__ import annotations

import pytest

from skyloop.scheduling.policy import Candidate, PolicyConfig, ReadyQueue
from skyloop.spec.resources import Resources


def cpu_shares(weights: dict[str, float], ranks: dict[str, float], patience: float, horizon: float,
               cpus: int = 4, duration: float = 5.0) -> dict[str, float]:
    """Each run keeps `2 * cpus` one-CPU tasks ready (a finished one is replaced); returns the share of the
    CPU-seconds each run got over `horizon` seconds. Durations are staggered so that ends do not coincide."""
    queue = ReadyQueue(PolicyConfig(run_weights=dict(weights), fair_share_seconds=patience, aging_seconds=1e9))
    key = 0
    running: list[tuple[float, int, str]] = []
    used = dict.fromkeys(weights, 0.0)

    def ready(run_id: str, now: float) -> None:
        nonlocal key
        key += 1
        queue.push(Candidate(key=key, resources=Resources(cpus=1), seq=key, run_id=run_id, rank=ranks[run_id],
                             estimate=duration, ready_at=now))

    for run_id in weights:
        for _ in range(2 * cpus):
            ready(run_id, 0.0)
    now, step = 0.0, 0.25
    while now < horizon:
        for end in [r for r in running if r[0] <= now]:
            running.remove(end)
            queue.done(end[1])
            ready(end[2], now)
        for cand in queue.take(Resources(cpus=cpus - len(running)), now=now):
            running.append((now + duration * (1 + 0.1 * (cand.key % 5)), cand.key, cand.run_id))
        for _, _, run_id in running:
            used[run_id] += step
        now += step
    total = sum(used.values())
    return {run_id: seconds / total for run_id, seconds in used.items()}


@pytest.mark.parametrize(("weights", "patience"), [({"low": 1, "high": 1}, 20.0), ({"low": 3, "high": 1}, 20.0),
                                                   ({"low": 1, "high": 1}, 300.0)])
def test_a_run_short_of_its_share_gets_it_over_time(weights: dict[str, float], patience: float) -> None:
    # `high` heads the longer path: rank alone gives it the whole machine. Once `low` has been short for the
    # patience, it must get its weighted share, not that share for one step in every period (the clock used
    # to start again each time one of its tasks ended and it dipped below: 1% of the machine instead of 50%).
    horizon = 20 * patience
    shares = cpu_shares(weights, {"low": 5.0, "high": 10.0}, patience, horizon)
    entitled = weights["low"] / sum(weights.values())
    waited = patience / horizon  # the first period it is rightly short: rank decides until then
    assert shares["low"] == pytest.approx(entitled * (1 - waited), abs=0.05), shares


def test_without_fair_share_rank_alone_decides() -> None:
    queue_shares = cpu_shares({"low": 1, "high": 1}, {"low": 5.0, "high": 10.0}, patience=1e9, horizon=400.0)
    assert queue_shares["low"] < 0.05
