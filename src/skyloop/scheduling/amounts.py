"""A mutable amount of every resource, kept as plain numbers: the policy's free pool while it decides."""

from __future__ import annotations

from collections import Counter

from skyloop.spec.resources import Resources

__all__ = ["EPS", "Amounts", "Holdings"]

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

    def add(self, res: Resources | Amounts, sign: int = 1) -> None:
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


class Holdings:
    """What running attempts hold, per run and in all, and each run's dominant share of the machine (fair share)."""

    __slots__ = ("_shares", "all", "attempts", "machine", "runs")

    def __init__(self) -> None:
        self.runs: dict[str, Amounts] = {}
        self.attempts: Counter[str] = Counter()
        """Run -> how many of its attempts run."""
        self.all = Amounts(0.0, 0, 0, {})
        self.machine = Amounts(0.0, 0, 0, {})
        """What the shares are of (`measure`)."""
        self._shares: dict[str, float] = {}
        """Run -> its dominant share, for runs whose holdings and machine did not change since it was worked out."""

    def hold(self, run_id: str, res: Resources) -> None:
        held = self.runs.get(run_id)
        if held is None:
            held = self.runs[run_id] = Amounts(0.0, 0, 0, {})
        held.add(res)
        self.attempts[run_id] += 1
        self.all.add(res)
        self._shares.pop(run_id, None)

    def release(self, run_id: str, res: Resources) -> None:
        left = self.attempts[run_id] - 1
        if left > 0:
            self.attempts[run_id] = left
            self.runs[run_id].add(res, -1)
        else:  # dropped rather than left at about zero (float sums)
            del self.attempts[run_id], self.runs[run_id]
        if self.attempts:
            self.all.add(res, -1)
        else:
            self.all = Amounts(0.0, 0, 0, {})
        self._shares.pop(run_id, None)

    def measure(self, free: Resources) -> None:
        """Take the machine as what is `free` plus what is held (the shares are worked out anew if it changed)."""
        machine = Amounts.of(free)
        machine.add(self.all)
        old = self.machine
        if (machine.cpus, machine.memory, machine.gpus, machine.custom) != (old.cpus, old.memory, old.gpus, old.custom):
            self.machine = machine
            self._shares.clear()

    def dominant(self, run_id: str) -> float:
        """The run's dominant share: the largest fraction of the machine it holds of any one resource."""
        share = self._shares.get(run_id)
        if share is not None:
            return share
        held, machine = self.runs.get(run_id), self.machine
        share = 0.0
        if held is not None:
            if held.cpus > 0:
                share = held.cpus / machine.cpus
            if held.memory > 0:
                share = max(share, held.memory / machine.memory)
            if held.gpus > 0:
                share = max(share, held.gpus / machine.gpus)
            for name, amount in held.custom.items():
                if amount > EPS:
                    share = max(share, amount / machine.custom[name])
        self._shares[run_id] = share
        return share
