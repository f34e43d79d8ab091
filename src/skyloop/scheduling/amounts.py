"""A mutable amount of every resource, kept as plain numbers: the policy's free pool while it decides."""

from __future__ import annotations

from skyloop.spec.resources import Resources

__all__ = ["EPS", "Amounts"]

EPS = 1e-9
"""Slack on CPU and custom-resource comparisons, which are floats."""


class Amounts:
    """Amounts of CPUs, memory, GPUs and custom resources."""

    __slots__ = ("cpus", "custom", "gpus", "memory")

    def __init__(self, cpus: float, memory: int, gpus: int, custom: dict[str, float]) -> None:
        self.cpus, self.memory, self.gpus, self.custom = cpus, memory, gpus, custom

    @classmethod
    def of(cls, res: Resources) -> Amounts:
        return cls(res.cpus, res.memory, res.gpus, dict(res.custom))

    def copy(self) -> Amounts:
        return Amounts(self.cpus, self.memory, self.gpus, dict(self.custom))

    def fits(self, res: Resources) -> bool:
        if res.cpus > self.cpus + EPS or res.memory > self.memory or res.gpus > self.gpus:
            return False
        if res.custom:
            for name, amount in res.custom.items():
                if amount > self.custom.get(name, 0.0) + EPS:
                    return False
        return True

    def add(self, res: Resources, sign: int = 1) -> None:
        self.cpus += sign * res.cpus
        self.memory += sign * res.memory
        self.gpus += sign * res.gpus
        if res.custom:
            for name, amount in res.custom.items():
                self.custom[name] = self.custom.get(name, 0.0) + sign * amount

    def tightness(self, res: Resources) -> float:
        """The largest fraction of a free resource that `res` would take (1.0: fills it exactly)."""
        best = 0.0
        if res.cpus > 0:
            best = res.cpus / max(self.cpus, EPS)
        if res.memory > 0:
            best = max(best, res.memory / max(self.memory, 1))
        if res.gpus > 0:
            best = max(best, res.gpus / max(self.gpus, 1))
        for name, amount in res.custom.items():
            if amount > 0:
                best = max(best, amount / max(self.custom.get(name, 0.0), EPS))
        return best

    def raise_to(self, other: Amounts) -> None:
        """Raise every amount to at least `other`'s."""
        self.cpus, self.memory, self.gpus = max(self.cpus, other.cpus), max(self.memory, other.memory), \
            max(self.gpus, other.gpus)
        for name, amount in other.custom.items():
            self.custom[name] = max(self.custom.get(name, 0.0), amount)

    def resources(self) -> Resources:
        """These amounts as `Resources` (unvalidated: they come from valid ones)."""
        return Resources.model_construct(cpus=self.cpus, memory=self.memory, gpus=self.gpus, custom=dict(self.custom))
