"""Which predictor answers a request, and which shadows see a copy: weighted splits and bandits.

Pure: no I/O, no threads, no clocks. The gateway owns one `Traffic` per deployment and calls
`choose` and `mirrors` per request, `reward` per feedback event, `fail` per answer that failed (a 5xx: it
gets no feedback, so a bandit learns of it only this way), `set_weights` when a rollout step moves.

Epsilon-greedy exploits the best mean reward among the arms that have had any (all arms, before any has);
an arm without rewards yet (a new one, or one whose feedback is still on its way) is tried by exploration,
never handed the exploiting share on trust. Thompson sampling draws an unrewarded arm from its Beta(1, 1) prior.

Sticky keys (the value of `RouterSpec.sticky_header`):

- weighted: weighted rendezvous hashing. Each live predictor scores the key with `blake2b(name, key)`
  and the best score wins, each predictor winning `weight / total` of all keys. The mapping is the
  same in every process and run. While weights do not change a key keeps its predictor. When they
  change, a predictor whose weight grows (or stays the same while others shrink) keeps every key it
  had and takes a share from the shrinking ones; keys move only away from predictors that shrink.
  So when a canary grows from 10 to 50 percent, clients already on it stay there.
- bandits: the first choice for a key is remembered in a bounded LRU (`STICKY_KEYS` keys) and reused
  until the key is evicted, its arm is removed by `set_weights`, or its arm is clearly worse than the best one
  (below, by `CLEARLY` standard deviations of both posteriors): then the key is chosen afresh. Keys handed out
  while the bandit knew nothing would otherwise stay on an arm it has since learned to avoid.

A restarted controller gives a new `Traffic` what the old one had learned with `seed` (the `arms` it saved).
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

from skyloop.deploy.spec import RouterKind, RouterSpec
from skyloop.errors import SpecError
from skyloop.serving.protocol import MAX_REWARD

__all__ = ["CLEARLY", "STICKY_KEYS", "Traffic"]

STICKY_KEYS = 100_000
"""How many sticky keys a bandit router remembers (least recently used are forgotten first)."""

CLEARLY = 3.0
"""A sticky key leaves its arm when the arm's posterior mean is this many standard deviations (of the arm's
posterior plus the best arm's) below the best arm's. Posteriors are Beta(1 + successes, 1 + failures) of the
rewards clipped to [0, 1], as Thompson sampling's: with rewards beyond [0, 1] epsilon-greedy's keys move only
when those clipped rewards tell the arms apart."""

_UNIT = 2**53 + 2  # divides a 53-bit hash into a point strictly inside (0, 1)


class _Arm:
    """Counters of one predictor (an arm, for bandits)."""

    __slots__ = ("count", "errors", "failures", "pulls", "successes", "total")

    def __init__(self) -> None:
        self.pulls = 0
        self.count = 0
        """Rewards, failed answers (`errors`) included."""
        self.errors = 0
        self.total = 0.0
        self.successes = 0.0
        self.failures = 0.0


class Traffic:
    """Chooses which predictor answers each request, and which shadows get a mirrored copy.

    `weights` are percent per live predictor (any non-negative numbers: they are normalised).
    `shadows` maps a predictor to the fraction of requests mirrored to it. Pass `rng` (a seeded
    `random.Random`) for reproducible choices; sticky weighted choices never use it.
    """

    def __init__(self, router: RouterSpec, weights: Mapping[str, float], shadows: Mapping[str, float] | None = None,
                 rng: random.Random | None = None) -> None:
        self.router = router
        self._rng = rng if rng is not None else random.Random()
        self._kind = router.type
        self._epsilon = router.epsilon
        self._arms: dict[str, _Arm] = {}
        self._names: list[str] = []
        self._weights: dict[str, float] = {}
        self._cumulative: list[float] = []
        self._positive: list[str] = []
        self._salted: list[tuple[str, bytes, float]] = []
        self._best: list[str] = []
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._losing: frozenset[str] = frozenset()
        """Arms clearly worse than the best (see `CLEARLY`): sticky keys on them are chosen afresh."""
        self._shadows: list[tuple[str, float]] = []
        self.set_weights(weights)
        self.set_shadows(shadows or {})

    # -- configuration ------------------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set the live predictors and their percent of traffic.

        Weighted router: a predictor with weight 0 gets nothing. Bandit routers: the keys are the
        arms and the values are ignored; stats of arms that stay are kept, new arms start fresh.
        Raises SpecError for no predictors, a negative or non-finite weight, or (weighted) all zeros.
        """
        if not weights:
            raise SpecError("traffic: no predictors to route to; give at least one live predictor")
        bad = sorted(name for name, w in weights.items() if not math.isfinite(w) or w < 0)
        if bad:
            raise SpecError(f"traffic: weight of {bad[0]!r} is {weights[bad[0]]}; weights are percent, 0 or more")
        names = sorted(weights)
        positive = [name for name in names if weights[name] > 0]
        if self._kind is RouterKind.WEIGHTED and not positive:
            raise SpecError(f"traffic: every weight is 0 ({', '.join(names)}); one predictor needs traffic above 0")
        self._names = names
        self._weights = {name: float(weights[name]) for name in names}
        self._positive = positive
        self._cumulative = list(accumulate(self._weights[name] for name in positive))
        self._salted = [(name, name.encode() + b"\x00", self._weights[name]) for name in positive]
        self._arms = {name: self._arms.get(name) or _Arm() for name in names}
        self._update_best()
        self._update_losing()

    def set_shadows(self, shadows: Mapping[str, float]) -> None:
        """Set the shadows: predictor -> fraction of requests, in [0, 1], mirrored to it."""
        bad = sorted(name for name, f in shadows.items() if not 0 <= f <= 1)
        if bad:
            raise SpecError(f"traffic: shadow fraction of {bad[0]!r} is {shadows[bad[0]]}; it must be in [0, 1]")
        self._shadows = [(name, float(shadows[name])) for name in sorted(shadows) if shadows[name] > 0]

    # -- per request --------------------------------------------------------------------------------

    def choose(self, sticky: str | None = None) -> str:
        """The predictor that answers one request; `sticky` (a client key) keeps a client on one predictor."""
        if self._kind is RouterKind.WEIGHTED:
            name = self._weighted() if sticky is None else self._rendezvous(sticky)
        elif sticky is None:
            name = self._bandit()
        else:
            name = self._sticky_bandit(sticky)
        self._arms[name].pulls += 1
        return name

    def mirrors(self) -> list[str]:
        """The shadows that get a copy of one request: each independently, with probability its fraction."""
        if not self._shadows:
            return []
        rand = self._rng.random
        return [name for name, fraction in self._shadows if rand() < fraction]

    def reward(self, predictor: str, value: float) -> None:
        """Feedback for an answer of `predictor`.

        Ignored for unknown predictors, values beyond `MAX_REWARD` (and NaN) and the weighted router. Thompson
        sampling treats a reward as the probability the answer was a success: it is clipped to
        [0, 1] and adds `value` to the arm's successes and `1 - value` to its failures.
        """
        arm = self._arms.get(predictor)
        if arm is None or self._kind is RouterKind.WEIGHTED or not abs(value) <= MAX_REWARD:
            return
        self._add(arm, value)

    def fail(self, predictor: str) -> None:
        """An answer of `predictor` failed (a server error): for bandits a reward of 0, counted in its `errors`.

        A failed answer gets no feedback: without this, an arm that fails every request is never rewarded,
        and the bandit never learns to avoid it. Ignored for unknown predictors and the weighted router.
        """
        arm = self._arms.get(predictor)
        if arm is None or self._kind is RouterKind.WEIGHTED:
            return
        arm.errors += 1
        self._add(arm, 0.0)

    def seed(self, arms: Mapping[str, Any]) -> None:
        """Take up what a bandit had learned: `arms` as `arms()` gave it (the `arms` a controller saved).

        Each live predictor's arm gets the saved pulls, feedback, errors and mean reward (and Thompson's alpha
        and beta); without them (saved by another router type) Thompson's posterior comes from the mean reward.
        Arms not live now, and values that are missing, negative or not finite, are ignored: a saved state is
        a hint, never a reason to fail. Ignored by the weighted router, which learns nothing.
        """
        if self._kind is RouterKind.WEIGHTED:
            return
        for name, saved in arms.items():
            arm = self._arms.get(name)
            if arm is None or not isinstance(saved, Mapping):
                continue
            pulls, feedback, errors = (_count(saved.get(k)) for k in ("pulls", "feedback", "errors"))
            mean = _number(saved.get("mean_reward"))
            count = feedback + errors
            if not count or mean is None or not abs(mean) <= MAX_REWARD:
                arm.pulls = max(arm.pulls, pulls)
                continue
            alpha, beta = _number(saved.get("alpha")), _number(saved.get("beta"))
            if alpha is not None and beta is not None and alpha >= 1 and beta >= 1:
                successes, failures = alpha - 1.0, beta - 1.0
            else:
                successes = min(1.0, max(0.0, mean)) * count
                failures = count - successes
            arm.pulls, arm.count, arm.errors = pulls, count, errors
            arm.total, arm.successes, arm.failures = mean * count, successes, failures
        self._update_best()
        self._update_losing()

    def _add(self, arm: _Arm, value: float) -> None:
        arm.count += 1
        arm.total += value
        clipped = min(1.0, max(0.0, value))
        arm.successes += clipped
        arm.failures += 1.0 - clipped
        if self._kind is RouterKind.EPSILON_GREEDY:
            self._update_best()
        self._update_losing()

    def arms(self) -> dict[str, dict[str, float | None]]:
        """Per predictor, for status JSON: pulls, weight (weighted) or feedback, errors and mean reward (bandits).

        `errors` are failed answers, each counted as a reward of 0 in `mean_reward` (and in Thompson's
        Beta posterior `alpha` and `beta`, which its arms also show). `mean_reward` is None for an arm
        with neither feedback nor errors.
        """
        out: dict[str, dict[str, float | None]] = {}
        for name in self._names:
            arm = self._arms[name]
            if self._kind is RouterKind.WEIGHTED:
                out[name] = {"pulls": arm.pulls, "weight": self._weights[name]}
                continue
            stats: dict[str, float | None] = {"pulls": arm.pulls, "feedback": arm.count - arm.errors,
                                              "errors": arm.errors,
                                              "mean_reward": arm.total / arm.count if arm.count else None}
            if self._kind is RouterKind.THOMPSON:
                stats["alpha"] = 1.0 + arm.successes
                stats["beta"] = 1.0 + arm.failures
            out[name] = stats
        return out

    # -- strategies ---------------------------------------------------------------------------------

    def _weighted(self) -> str:
        point = self._rng.random() * self._cumulative[-1]
        index = bisect_right(self._cumulative, point)
        # random() < 1, but a product can round up to the total
        return self._positive[min(index, len(self._positive) - 1)]

    def _rendezvous(self, key: str) -> str:
        # Weighted rendezvous hashing: -ln(u)/w is Exp(w)-distributed for uniform u, so the smallest
        # wins with probability w / total, and growing w only ever lowers that predictor's score.
        raw = key.encode()
        best, best_score = self._salted[0][0], math.inf
        for name, salt, weight in self._salted:
            digest = hashlib.blake2b(salt + raw, digest_size=8).digest()
            u = ((int.from_bytes(digest, "big") >> 11) + 1) / _UNIT
            score = -math.log(u) / weight
            if score < best_score:
                best, best_score = name, score
        return best

    def _bandit(self) -> str:
        if self._kind is RouterKind.THOMPSON:
            beta = self._rng.betavariate
            best, best_draw = self._names[0], -1.0
            for name in self._names:
                arm = self._arms[name]
                draw = beta(1.0 + arm.successes, 1.0 + arm.failures)
                if draw > best_draw:
                    best, best_draw = name, draw
            return best
        if self._epsilon and self._rng.random() < self._epsilon:
            return self._rng.choice(self._names)
        return self._rng.choice(self._best)

    def _sticky_bandit(self, key: str) -> str:
        cached = self._sticky.get(key)
        if cached is not None and cached in self._arms and cached not in self._losing:
            self._sticky.move_to_end(key)
            return cached
        name = self._bandit()
        self._sticky[key] = name
        self._sticky.move_to_end(key)
        if len(self._sticky) > STICKY_KEYS:
            self._sticky.popitem(last=False)
        return name

    def _update_best(self) -> None:
        """Epsilon-greedy's exploit set: the rewarded arms with the best mean (every arm while none is rewarded).

        An unrewarded arm is left to exploration: its feedback may be late or never come, and trusting it
        meanwhile would hand it all the exploiting traffic, however bad it is.
        """
        means = {name: arm.total / arm.count for name in self._names if (arm := self._arms[name]).count}
        if not means:
            self._best = list(self._names)
            return
        top = max(means.values())
        self._best = [name for name in means if means[name] == top]

    def _update_losing(self) -> None:
        """The arms whose posterior mean is `CLEARLY` below the best arm's (none for the weighted router)."""
        if self._kind is RouterKind.WEIGHTED:
            return
        posteriors = {}
        for name in self._names:
            arm = self._arms[name]
            a, b = 1.0 + arm.successes, 1.0 + arm.failures
            mean = a / (a + b)
            posteriors[name] = (mean, mean * (1.0 - mean) / (a + b + 1.0))  # the Beta's mean and variance
        best = max(posteriors.values(), key=lambda p: p[0])
        self._losing = frozenset(name for name, (mean, var) in posteriors.items()
                                 if best[0] - mean > CLEARLY * math.sqrt(var + best[1]))


def _number(value: Any) -> float | None:
    """A saved number: finite, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _count(value: Any) -> int:
    """A saved count: a non-negative whole number, else 0."""
    number = _number(value)
    return int(number) if number is not None and number >= 0 else 0
