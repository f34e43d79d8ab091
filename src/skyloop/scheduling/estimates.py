"""How long a step will take, learned from how long it took before (pure: the history is passed in)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Literal

__all__ = ["Estimate", "Estimator", "Sample", "rank_correlation"]

Source = Literal["default", "history", "history-scaled"]


@dataclass(frozen=True)
class Sample:
    """One earlier successful attempt of a step: its duration and, where known, the bytes it read."""

    seconds: float
    input_bytes: int | None = None


@dataclass(frozen=True)
class Estimate:
    """Expected seconds of an attempt and where the number came from."""

    seconds: float
    source: Source
    """`default` (no history), `history` (median or EWMA), `history-scaled` (fitted to input size)."""


@dataclass(frozen=True)
class Estimator:
    """Turns a step's history into an expected duration.

    `median` (the default) takes the median of the last `window` samples: one run that stalled for
    an hour moves it by one rank, not by an hour. `ewma` follows drift faster (weight `alpha` on the
    newest sample) but one outlier moves it by `alpha` times the outlier. When the query gives
    `input_bytes` and at least `min_sizes` samples in the window carry distinct sizes, spread at least
    `min_spread`-fold (largest over smallest) and ranked alike by size and by time (Spearman's
    correlation at least `min_correlation`), a line `seconds = a + b * bytes` is fitted by Theil-Sen
    (median of the pairwise slopes, then the median intercept), which tolerates up to ~29% outliers;
    a fitted slope that is not positive means size does not explain time, and the plain estimate is
    used. (A narrow range of sizes fits the noise: the slope of a 5 s step seen at sizes within 3% of
    each other, taken to a size a thousand times larger, made it 7,500 s.) Past the sizes seen, the
    line is clamped to grow at most in proportion to size (its value at the largest size seen, times
    the size over that one; likewise below the smallest): a steeper line, one with a negative intercept,
    would run away from the data.
    """

    default_seconds: float = 1.0
    method: Literal["median", "ewma"] = "median"
    alpha: float = 0.3
    window: int = 20
    min_sizes: int = 3
    min_spread: float = 2.0
    min_correlation: float = 0.6

    def __post_init__(self) -> None:
        if self.method not in ("median", "ewma"):
            raise ValueError(f"method must be 'median' or 'ewma', not {self.method!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {self.alpha}")
        if self.window < 1 or self.min_sizes < 2:
            raise ValueError("window must be >= 1 and min_sizes >= 2")
        if not (self.min_spread >= 1.0 and -1.0 <= self.min_correlation <= 1.0):
            raise ValueError("min_spread must be >= 1 and min_correlation in [-1, 1]")
        if not (self.default_seconds >= 0.0 and math.isfinite(self.default_seconds)):
            raise ValueError(f"default_seconds must be a finite number >= 0, not {self.default_seconds}")

    def estimate(self, samples: Sequence[Sample], input_bytes: int | None = None) -> Estimate:
        """Expected seconds of the next attempt; `samples` run oldest first, so the window keeps the newest."""
        recent = [s for s in samples if math.isfinite(s.seconds) and s.seconds >= 0.0][-self.window:]
        if not recent:
            return Estimate(self.default_seconds, "default")
        if input_bytes is not None:
            scaled = self._scaled(recent, input_bytes)
            if scaled is not None:
                return Estimate(scaled, "history-scaled")
        seconds = [s.seconds for s in recent]
        if self.method == "median":
            return Estimate(float(median(seconds)), "history")
        value = seconds[0]
        for x in seconds[1:]:
            value += self.alpha * (x - value)
        return Estimate(value, "history")

    def _scaled(self, recent: list[Sample], input_bytes: int) -> float | None:
        sized = [(float(s.input_bytes), s.seconds) for s in recent if s.input_bytes is not None]
        if len({x for x, _ in sized}) < self.min_sizes:
            return None
        sizes, times = [x for x, _ in sized], [y for _, y in sized]
        smallest, largest = min(sizes), max(sizes)
        if largest < self.min_spread * smallest or rank_correlation(sizes, times) < self.min_correlation:
            return None  # too narrow a range to tell a slope from noise, or size does not explain time
        slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(sized) for x2, y2 in sized[i + 1:] if x2 != x1]
        slope = median(slopes)
        if slope <= 0.0:
            return None
        intercept = median(y - slope * x for x, y in sized)
        size = float(max(0, input_bytes))
        seconds = intercept + slope * size
        if size > largest:  # past the sizes seen, growing at most in proportion to size
            seconds = min(seconds, (intercept + slope * largest) * size / largest)
        elif size < smallest:  # and below them, shrinking at most in proportion
            seconds = max(seconds, (intercept + slope * smallest) * size / smallest)
        return max(0.0, seconds)


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties take their mean rank); 0 where either
    holds a single value."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
