"""Judging a rollout's target: what each predictor did in a window, and a verdict against the checks.

Pure: no I/O, no threads, no clocks. The gateway fills one `Window` per predictor for each rollout
step or analysis interval, then calls `analyse(checks, target_window, stable_window, min_samples)`.

A bound fails only when the target is beyond it by more than sampling noise (`Z` standard errors): a window
is a sample, and it is judged at every interval from `min_samples` on. Judged as measured, a canary identical
to its stable predictor with an error rate of 0.2% was rolled back in 20-35% of rollouts by `error_rate <= 1%`
(one error in its first 50-99 requests is already over 1%), and one as accurate as a stable at 92% failed
`accuracy` with `max_drop: 0.02` in 42% of steps judged every 50 labels up to 500. A breach within the noise is
Inconclusive: more samples tell, and a step that ends on it pauses rather than passes (analysis goes on
in the pause, and rolls back once the breach is beyond the noise). error_rate and accuracy take Wilson score
intervals, mean_reward a normal one from the rewards' variance, and a relative bound adds the stable window's
own noise (the MOVER method of Zou and Donner). latency_p99 is compared as measured: below about 1,100
samples the upper confidence limit of a 99th percentile is the largest sample, so an interval would leave
nearly every latency breach Inconclusive (an identical canary with lognormal latencies, sigma 0.8, was rolled
back by `max_ratio: 2` in 1.5-4.5% of rollouts; with sigma 0.3, never).
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from skyloop.deploy.spec import MetricCheck
from skyloop.serving.protocol import MAX_REWARD

__all__ = ["MAX_LATENCIES", "SLACK", "Analysis", "MetricResult", "Verdict", "Window", "Z", "analyse", "same_answer"]

MAX_LATENCIES = 20_000
"""Latencies a window keeps (a uniform reservoir sample of all its requests)."""

SLACK = 1e-9
"""Bounds are compared with this slack, so that e.g. 0.90 >= 0.92 - 0.02 holds despite float rounding."""

Z = 3.0
"""Standard errors by which a value must be beyond a bound to fail it (one-sided, about 0.13% per check, so that
checking at every interval of a step rarely fails a target that meets its bounds)."""

_UNITS = {"error_rate": "requests", "latency_p99": "requests", "accuracy": "labelled rows",
          "mean_reward": "rewarded answers"}


def _is_number(value: Any) -> bool:
    # A bool is an int to Python, but true is not the answer 1 (nor 1.0): booleans compare as text.
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def same_answer(answer: Any, truth: Any) -> bool:
    """Whether an answer matches its label: numbers by value (`0` is `0.0`), lists element by element, anything
    else as text (`"setosa"`, and a label `"0"` for the answer `0`)."""
    if isinstance(answer, list | tuple) and isinstance(truth, list | tuple):
        return len(answer) == len(truth) and all(same_answer(a, t) for a, t in zip(answer, truth, strict=True))
    if _is_number(answer) and _is_number(truth):
        return bool(answer == truth)
    return str(answer) == str(truth)


@dataclass
class Window:
    """What one predictor did since the window opened (a rollout step or an analysis interval).

    `errors` are the requests the predictor failed, and so `error_rate`: its server errors, and its client errors
    (`client_errors`, also counted apart): a replica's 4xx answer to a request the gateway had already checked and
    accepted is the predictor's fault (a new model whose signature refuses what clients send, with 422), not the
    client's. A client whose requests no model takes raises every predictor's error rate alike: bound error_rate
    with `max_ratio` against the stable predictor then. `labelled` and `correct` count rows: a truth gives one
    value per row of the answer, and accuracy is the share of rows answered correctly (its interval takes the rows
    as independent, which rows of one client's request need not be). Pass `rng=random.Random(seed)` for a
    reproducible latency reservoir.
    """

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    """The requests among `errors` that the predictor refused with a 4xx."""
    latencies: list[float] = field(default_factory=list)
    labelled: int = 0
    correct: int = 0
    rewarded: int = 0
    reward_sum: float = 0.0
    reward_m2: float = 0.0
    """The rewards' sum of squared deviations from their mean (Welford's), for mean_reward's noise."""
    max_latencies: int = MAX_LATENCIES
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def add_request(self, seconds: float, ok: bool, client_error: bool = False) -> None:
        """Count one answered (or failed) request and how long it took; `client_error`: it failed with a 4xx
        (an error, counted in `client_errors` too, whatever `ok` says)."""
        self.requests += 1
        if client_error:
            self.client_errors += 1
        if client_error or not ok:
            self.errors += 1
        if len(self.latencies) < self.max_latencies:
            self.latencies.append(seconds)
            return
        # Algorithm R: the n-th latency replaces a random kept one with probability max/n.
        slot = self.rng.randrange(self.requests)
        if slot < self.max_latencies:
            self.latencies[slot] = seconds

    def add_feedback(self, correct: bool | int | None = None, reward: float | None = None, rows: int = 1) -> None:
        """Count one feedback event: how many of an answer's `rows` were correct (a bool for one row), and/or its
        reward (ignored beyond `MAX_REWARD` and when NaN)."""
        if correct is not None:
            if not 0 <= int(correct) <= rows:
                raise ValueError(f"correct: {int(correct)} of {rows} rows; give 0 to {rows} correct rows")
            self.labelled += rows
            self.correct += int(correct)
        if reward is not None and abs(reward) <= MAX_REWARD:
            before = self.reward_sum / self.rewarded if self.rewarded else 0.0
            self.rewarded += 1
            self.reward_sum += reward
            self.reward_m2 += (reward - before) * (reward - self.reward_sum / self.rewarded)

    def value(self, metric: str) -> tuple[float | None, int]:
        """The metric's value and how many samples it rests on; the value is None without samples.

        error_rate and latency_p99 (seconds, 99th percentile) count requests, accuracy labelled
        rows, mean_reward rewarded answers.
        """
        if metric == "error_rate":
            return (self.errors / self.requests if self.requests else None), self.requests
        if metric == "latency_p99":
            return (self._percentile(99), self.requests) if self.latencies else (None, 0)
        if metric == "accuracy":
            return (self.correct / self.labelled if self.labelled else None), self.labelled
        if metric == "mean_reward":
            return (self.reward_sum / self.rewarded if self.rewarded else None), self.rewarded
        raise ValueError(f"unknown metric {metric!r}; metrics are {', '.join(_UNITS)}")

    def interval(self, metric: str, z: float = Z) -> tuple[float, float] | None:
        """Where the metric's true value lies, `z` standard errors either side (None without samples).

        error_rate and accuracy: the Wilson score interval of a proportion (sound at 0 errors and few
        samples); mean_reward: mean +- z standard errors (unbounded with one reward); latency_p99: the
        value itself (see the module's docstring).
        """
        value, samples = self.value(metric)
        if value is None:
            return None
        if metric in ("error_rate", "accuracy"):
            return _wilson(value, samples, z)
        if metric == "mean_reward":
            if samples < 2:
                return -math.inf, math.inf
            half = z * math.sqrt(max(0.0, self.reward_m2) / (samples - 1) / samples)
            return value - half, value + half
        return value, value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (None where there are no samples)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "error_rate": self.value("error_rate")[0],
            "latency_p50": self._percentile(50) if self.latencies else None,
            "latency_p99": self.value("latency_p99")[0],
            "labelled": self.labelled,
            "accuracy": self.value("accuracy")[0],
            "rewarded": self.rewarded,
            "mean_reward": self.value("mean_reward")[0],
        }

    def _percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies, dtype=float), q))


def _wilson(p: float, n: int, z: float) -> tuple[float, float]:
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Verdict(StrEnum):
    """The outcome of one analysis."""

    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


@dataclass(frozen=True)
class MetricResult:
    """One check of the target: its value, the stable predictor's, and whether the bounds held.

    `bound` reads like `<= 0.01`, `<= 1.5x stable (0.004)` or `>= stable - 0.02 (0.91)` (the
    resolved threshold in brackets), bounds joined by `and`. `passed` is None when there were
    not enough samples to tell (too few, or a breach within sampling noise).
    """

    name: str
    value: float | None
    stable: float | None
    samples: int
    bound: str
    passed: bool | None


@dataclass(frozen=True)
class Analysis:
    """The verdict on the target, each metric's result, and one sentence saying what decided it."""

    verdict: Verdict
    metrics: list[MetricResult]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (the verdict as its string)."""
        return {"verdict": str(self.verdict), "reason": self.reason, "metrics": [asdict(m) for m in self.metrics]}


def _num(x: float) -> str:
    return f"{x:.4g}"


def _check(check: MetricCheck, target: Window, stable: Window | None, min_samples: int) -> tuple[MetricResult, str]:
    """One metric's result and a sentence about it (why it failed or was inconclusive)."""
    name, unit = check.name, _UNITS[check.name]
    # Latencies are seconds (as the spec gives them): said so, where the status tables show milliseconds.
    sec = " s" if name.startswith("latency") else ""

    def num(x: float) -> str:
        return _num(x) + sec
    value, samples = target.value(name)
    base, base_samples = stable.value(name) if stable is not None else (None, 0)
    relative = check.max_ratio is not None or check.max_drop is not None
    have_base = base is not None and base_samples >= min_samples
    # How far the target's (and the stable's) true value may lie from the measured one: a breach within
    # that distance may be noise, and is not yet a failure.
    low, high = target.interval(name, Z) or (math.nan, math.nan)  # NaN: unused, as value is None then
    base_low, base_high = (stable.interval(name, Z) if stable is not None else None) or (math.nan, math.nan)

    bounds: list[str] = []
    failures: list[str] = []
    noise: list[str] = []

    def breach(measured: bool, beyond_noise: bool, why: str) -> None:
        if measured:
            (failures if beyond_noise else noise).append(why)

    if check.max is not None:
        bounds.append(f"<= {num(check.max)}")
        if value is not None:
            breach(value > check.max + SLACK, low > check.max + SLACK, f"> max {num(check.max)}")
    if check.min is not None:
        bounds.append(f">= {num(check.min)}")
        if value is not None:
            breach(value < check.min - SLACK, high < check.min - SLACK, f"< min {num(check.min)}")
    if check.max_ratio is not None:
        if base is None or not have_base:
            bounds.append(f"<= {_num(check.max_ratio)}x stable")
        else:
            # With a stable value of 0 the limit is 0: only a target at 0 too passes.
            ratio = check.max_ratio
            limit = ratio * base
            bounds.append(f"<= {_num(ratio)}x stable ({num(limit)})")
            if value is not None:
                # target - ratio x stable > 0, beyond the noise of both (MOVER).
                spread = math.hypot(value - low, ratio * (base_high - base))
                breach(value > limit + SLACK, value - limit - spread > SLACK,
                       f"> {_num(ratio)}x stable {num(base)} ({num(limit)})")
    if check.max_drop is not None:
        if base is None or not have_base:
            bounds.append(f">= stable - {num(check.max_drop)}")
        else:
            limit = base - check.max_drop
            bounds.append(f">= stable - {num(check.max_drop)} ({num(limit)})")
            if value is not None:
                # target - (stable - max_drop) < 0, beyond the noise of both (MOVER).
                spread = math.hypot(high - value, base - base_low)
                breach(value < limit - SLACK, value - limit + spread < -SLACK,
                       f"< stable {num(base)} - {num(check.max_drop)} ({num(limit)})")

    def result(passed: bool | None) -> MetricResult:
        return MetricResult(name=name, value=value, stable=base, samples=samples, bound=" and ".join(bounds),
                            passed=passed)

    if value is None or samples < min_samples:
        # Too few samples: not even a breached absolute bound counts yet.
        return result(None), f"{name}: {samples} {unit}, {min_samples} needed"
    if failures:
        return result(False), f"{name} {num(value)} {' and '.join(failures)} over {samples} {unit}"
    if noise:
        return result(None), (f"{name} {num(value)} {' and '.join(noise)} over {samples} {unit}, within sampling "
                              f"noise: more {unit} will tell")
    if relative and not have_base:
        if stable is None:
            why = "no stable predictor to compare with"
        else:
            why = f"the stable predictor has {base_samples} {unit}, {min_samples} needed"
        return result(None), f"{name}: {why}"
    return result(True), f"{name} {num(value)} within {' and '.join(bounds)}"


def analyse(checks: list[MetricCheck], target: Window, stable: Window | None, min_samples: int) -> Analysis:
    """Judge the target's window against the checks, relative bounds against the stable window.

    A metric is inconclusive when the target has fewer than `min_samples` samples for it, when a
    bound is breached by no more than sampling noise (`Z` standard errors), or when a relative bound
    (max_ratio, max_drop) has no stable window with `min_samples` samples to compare with; a breached
    absolute bound still fails it then. All bounds of a check must hold. Any failed metric fails the
    analysis; else any inconclusive one makes it Inconclusive.
    """
    judged = [_check(check, target, stable, min_samples) for check in checks]
    results = [r for r, _ in judged]
    failed = [why for r, why in judged if r.passed is False]
    unsure = [why for r, why in judged if r.passed is None]
    if failed:
        more = f" (and {len(failed) - 1} more failed)" if len(failed) > 1 else ""
        return Analysis(Verdict.FAILED, results, failed[0] + more)
    if unsure:
        more = f" (and {len(unsure) - 1} more inconclusive)" if len(unsure) > 1 else ""
        return Analysis(Verdict.INCONCLUSIVE, results, unsure[0] + more)
    if not results:
        return Analysis(Verdict.SUCCESSFUL, results, "no metrics to check")
    if len(results) == 1:
        return Analysis(Verdict.SUCCESSFUL, results, judged[0][1])
    return Analysis(Verdict.SUCCESSFUL, results, f"all {len(results)} metrics passed")
