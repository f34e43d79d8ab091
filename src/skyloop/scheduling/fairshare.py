"""Fair share between the runs of one class (pure: time is passed in).

Each waiting run is entitled to its weight over the weights of the runs waiting in its class, of its
dominant resource (Dominant Resource Fairness). A run short of that for `patience` seconds
(`fair_share_seconds`) is starved,
and `ReadyQueue` serves it first whenever it is below its entitlement, until it has held its entitlement
for `patience` seconds without a break. Being back at its share for a moment is not enough: a run whose
attempts keep ending dips below it at every end, and if that started its clock afresh it would get its
share for one step in every period (a run of weight 3 got 12% of the machine, not 75%).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

__all__ = ["Patience", "entitlements"]


def entitlements(run_classes: Mapping[str, Counter[int]], weights: Mapping[str, float], top: int) -> dict[str, float]:
    """Run -> its weight over the weights of the waiting runs of its class (its best aged class, up to `top`)."""
    tier: dict[str, tuple[int, float]] = {}
    sums: dict[int, float] = {}
    for run_id, counts in run_classes.items():
        klass = min(max(counts), top)
        weight = max(weights.get(run_id, 1.0), 0.0)
        tier[run_id] = (klass, weight)
        sums[klass] = sums.get(klass, 0.0) + weight
    return {run_id: weight / sums[klass] if sums[klass] > 0 else 0.0 for run_id, (klass, weight) in tier.items()}


class Patience:
    """Per run, since when it has been short of its share and since when it is back at it."""

    __slots__ = ("even_since", "short_since")

    def __init__(self) -> None:
        self.short_since: dict[str, float] = {}
        """Run -> since when it has been short of its share (kept until it is made good, see the module)."""
        self.even_since: dict[str, float] = {}
        """Run of `short_since` -> since when it has held its share without a break."""

    def starved(self, run_id: str, at_share: bool, now: float, patience: float) -> bool:
        """Whether the run is to be served first now, given whether it holds its share (`at_share`)."""
        if at_share:
            self.even(run_id, now, patience)
            return False
        self.even_since.pop(run_id, None)
        return now - self.short_since.setdefault(run_id, now) >= patience

    def even(self, run_id: str, now: float, patience: float) -> None:
        """The run holds its share (again): once it has for `patience` seconds, it is made good."""
        if run_id in self.short_since and now - self.even_since.setdefault(run_id, now) >= patience:
            del self.short_since[run_id], self.even_since[run_id]

    def forget(self, run_id: str) -> None:
        """The run waits for nothing: its clocks start afresh when it comes back."""
        self.short_since.pop(run_id, None)
        self.even_since.pop(run_id, None)
