"""Judging a rollout's target: what each predictor did in a window, and a verdict against the checks.

Pure: no I/O, no threads, no clocks. The gateway fills one `Window` per predictor for each rollout
step or analysis interval, then calls `analyse(checks, target_window, stable_window, min_samples)`.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from skyloop.deploy.spec import MetricCheck
from skyloop.serving.protocol import MAX_REWARD

__all__ = ["MAX_LATENCIES", "SLACK", "Analysis", "MetricResult", "Verdict", "Window", "analyse", "same_answer"]

MAX_LATENCIES = 20_000
"""Latencies a window keeps (a uniform reservoir sample of all its requests)."""

SLACK = 1e-9
"""Bounds are compared with this slack, so that e.g. 0.90 >= 0.92 - 0.02 holds despite float rounding."""

_UNITS = {"error_rate": "requests", "latency_p99": "requests", "accuracy": "labelled answers",
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

    Pass `rng=random.Random(seed)` for a reproducible latency reservoir.
    """

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    labelled: int = 0
    correct: int = 0
    rewarded: int = 0
    reward_sum: float = 0.0
    max_latencies: int = MAX_LATENCIES
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def add_request(self, seconds: float, ok: bool) -> None:
        """Count one answered (or failed) request and how long it took."""
        self.requests += 1
        if not ok:
            self.errors += 1
        if len(self.latencies) < self.max_latencies:
            self.latencies.append(seconds)
            return
        # Algorithm R: the n-th latency replaces a random kept one with probability max/n.
        slot = self.rng.randrange(self.requests)
        if slot < self.max_latencies:
            self.latencies[slot] = seconds

    def add_feedback(self, correct: bool | None = None, reward: float | None = None) -> None:
        """Count one feedback event: whether an answer was correct, and/or its reward (ignored beyond `MAX_REWARD`
        and when NaN)."""
        if correct is not None:
            self.labelled += 1
            self.correct += int(correct)
        if reward is not None and abs(reward) <= MAX_REWARD:
            self.rewarded += 1
            self.reward_sum += reward

    def value(self, metric: str) -> tuple[float | None, int]:
        """The metric's value and how many samples it rests on; the value is None without samples.

        error_rate and latency_p99 (seconds, 99th percentile) count requests, accuracy labelled
        answers, mean_reward rewarded answers.
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (None where there are no samples)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
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
    not enough samples to tell.
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
    value, samples = target.value(name)
    base, base_samples = stable.value(name) if stable is not None else (None, 0)
    relative = check.max_ratio is not None or check.max_drop is not None
    have_base = base is not None and base_samples >= min_samples

    bounds: list[str] = []
    failures: list[str] = []
    if check.max is not None:
        bounds.append(f"<= {_num(check.max)}")
        if value is not None and value > check.max + SLACK:
            failures.append(f"> max {_num(check.max)}")
    if check.min is not None:
        bounds.append(f">= {_num(check.min)}")
        if value is not None and value < check.min - SLACK:
            failures.append(f"< min {_num(check.min)}")
    if check.max_ratio is not None:
        if base is None or not have_base:
            bounds.append(f"<= {_num(check.max_ratio)}x stable")
        else:
            # With a stable value of 0 the limit is 0: only a target at 0 too passes.
            limit = check.max_ratio * base
            bounds.append(f"<= {_num(check.max_ratio)}x stable ({_num(limit)})")
            if value is not None and value > limit + SLACK:
                failures.append(f"> {_num(check.max_ratio)}x stable {_num(base)} ({_num(limit)})")
    if check.max_drop is not None:
        if base is None or not have_base:
            bounds.append(f">= stable - {_num(check.max_drop)}")
        else:
            limit = base - check.max_drop
            bounds.append(f">= stable - {_num(check.max_drop)} ({_num(limit)})")
            if value is not None and value < limit - SLACK:
                failures.append(f"< stable {_num(base)} - {_num(check.max_drop)} ({_num(limit)})")

    def result(passed: bool | None) -> MetricResult:
        return MetricResult(name=name, value=value, stable=base, samples=samples, bound=" and ".join(bounds),
                            passed=passed)

    if value is None or samples < min_samples:
        # Too few samples: not even a breached absolute bound counts yet.
        return result(None), f"{name}: {samples} {unit}, {min_samples} needed"
    if failures:
        return result(False), f"{name} {_num(value)} {' and '.join(failures)} over {samples} {unit}"
    if relative and not have_base:
        if stable is None:
            why = "no stable predictor to compare with"
        else:
            why = f"the stable predictor has {base_samples} {unit}, {min_samples} needed"
        return result(None), f"{name}: {why}"
    return result(True), f"{name} {_num(value)} within {' and '.join(bounds)}"


def analyse(checks: list[MetricCheck], target: Window, stable: Window | None, min_samples: int) -> Analysis:
    """Judge the target's window against the checks, relative bounds against the stable window.

    A metric is inconclusive when the target has fewer than `min_samples` samples for it, or
    when a relative bound (max_ratio, max_drop) has no stable window with `min_samples` samples
    to compare with; a breached absolute bound still fails it then. All bounds of a check must
    hold. Any failed metric fails the analysis; else any inconclusive one makes it Inconclusive.
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
