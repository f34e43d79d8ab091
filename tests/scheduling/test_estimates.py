"""Durations learned from history: default, median, EWMA, scaling by input size."""

from __future__ import annotations

import pytest

from skyloop.scheduling.estimates import Estimate, Estimator, Sample, rank_correlation


def _s(*seconds: float) -> list[Sample]:
    return [Sample(x) for x in seconds]


def test_no_history_gives_the_default() -> None:
    assert Estimator(default_seconds=7).estimate([]) == Estimate(7, "default")
    assert Estimator().estimate([], input_bytes=10**9) == Estimate(1.0, "default")


def test_median_shrugs_off_one_outlier_a_hundred_times_longer() -> None:
    found = Estimator().estimate(_s(10, 11, 9, 1000, 10, 12))
    assert found.source == "history" and 10 <= found.seconds <= 11


def test_the_window_keeps_the_newest_samples() -> None:
    assert Estimator(window=5).estimate(_s(*[100] * 30, *[10] * 5)).seconds == 10


def test_ewma_follows_the_newest_samples() -> None:
    assert Estimator(method="ewma", alpha=0.5).estimate(_s(10, 20)).seconds == 15
    drift = _s(*[10] * 10, *[20] * 3)
    assert Estimator(method="ewma").estimate(drift).seconds > Estimator().estimate(drift).seconds


def test_scaling_by_input_size() -> None:
    samples = [Sample(2 + size / 100, size) for size in (100, 200, 400, 800)]
    samples.append(Sample(500, 300))  # one stall among them
    found = Estimator().estimate(samples, input_bytes=1600)
    assert found.source == "history-scaled" and found.seconds == pytest.approx(18, rel=0.05)


def test_scaling_needs_three_distinct_sizes_and_a_query_size() -> None:
    samples = [Sample(3, 100), Sample(5, 300), Sample(4, 100)]
    assert Estimator().estimate(samples, input_bytes=10_000) == Estimate(4, "history")
    samples.append(Sample(6, 500))
    assert Estimator().estimate(samples).source == "history"
    assert Estimator().estimate(samples, input_bytes=10_000).source == "history-scaled"


def test_size_that_does_not_explain_time_is_ignored() -> None:
    samples = [Sample(10, 100), Sample(9, 200), Sample(8, 400)]
    assert Estimator().estimate(samples, input_bytes=800) == Estimate(9, "history")


def test_bad_samples_are_skipped() -> None:
    assert Estimator().estimate(_s(float("nan"), -1, 4)).seconds == 4


@pytest.mark.parametrize("kwargs", [{"method": "mean"}, {"alpha": 0}, {"window": 0}, {"default_seconds": -1}])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Estimator(**kwargs)  # type: ignore[arg-type]


def test_a_narrow_range_of_sizes_is_not_extrapolated() -> None:
    # A 5 s step seen at sizes within 3% of each other: the noise lines up into a slope of 0.01 s per byte,
    # which a 1 MB input took to 10,000 s.
    samples = [Sample(seconds, size) for seconds, size in ((4.9, 990), (5.0, 1000), (5.1, 1010), (5.2, 1020))]
    assert Estimator().estimate(samples, input_bytes=10**6) == Estimate(5.05, "history")
    assert Estimator(min_spread=1.0).estimate(samples, input_bytes=10**6).source == "history-scaled"


def test_sizes_that_do_not_order_the_times_are_not_fitted() -> None:
    # The median slope is positive, but time goes up and down as size grows (rank correlation 0.2).
    samples = [Sample(seconds, size) for seconds, size in zip((5, 1, 6, 2, 7, 3), range(100, 700, 100), strict=True)]
    assert Estimator().estimate(samples, input_bytes=6_000) == Estimate(4, "history")
    assert Estimator(min_correlation=0.0).estimate(samples, input_bytes=6_000).source == "history-scaled"


def test_the_fitted_line_grows_past_the_sizes_seen_at_most_in_proportion_to_size() -> None:
    # seconds = -1 + 0.02 * bytes: steeper than proportional, it would run away from the data.
    samples = [Sample(-1 + 0.02 * size, size) for size in (100, 200, 400)]
    assert Estimator().estimate(samples, input_bytes=300) == Estimate(pytest.approx(5), "history-scaled")
    assert Estimator().estimate(samples, input_bytes=4_000) == Estimate(pytest.approx(70), "history-scaled")  # not 79
    assert Estimator().estimate(samples, input_bytes=50) == Estimate(pytest.approx(0.5), "history-scaled")  # not 0


def test_rank_correlation() -> None:
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2], [5, 6, 7]) == pytest.approx(0.866, abs=1e-3)  # a tie takes the mean rank
    assert rank_correlation([1, 2, 3], [4, 4, 4]) == 0.0
