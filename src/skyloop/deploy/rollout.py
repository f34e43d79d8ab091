"""The rollout state machine: walks a canary or blue-green rollout, judging the target at each interval.

Pure: the controller feeds it the time, the per-predictor windows the gateway filled since the current
step began, and user commands; it answers with transitions (each becomes a `deployment_events` row before
the controller applies its weights). Semantics follow Argo Rollouts, with the gaps closed:

- at each `analysis.interval` the target is compared with the stable predictor (`analysis.analyse`);
  a failed check counts, over the whole rollout (as Argo's `failureLimit` and Flagger's `threshold`: a
  new step does not forgive the failures of the last), and one more than `failure_limit` rolls back: the
  target goes to 0%, the status is Degraded and the reason names the metric; a tolerated failure opens
  fresh windows (the step's clock goes on), so that the next checks judge what came after it, not the
  same errors again;
- a step ends after its duration: it passes only on a Successful analysis; too few samples (or a breach
  within sampling noise) is Inconclusive and **pauses** the rollout (Flagger passes it;
  fluxcd/flagger#1098); the analysis goes on in the pause, and the rollout resumes by itself at the first
  Successful check, rolls back at a failed one, or follows a user's promote or rollback;
- `{pause: {}}` waits for `promote`; `{pause: {duration: D}}` waits D, analysis still running;
- after the last step the target takes 100% (Healthy), and the controller moves the registry alias;
- blue_green mirrors every request to the target for `preview` (answers discarded, metrics kept),
  then switches all traffic at once.

A controller can be restarted at any moment: `saved()` is what it stores of a rollout (the step, the time
spent in it, the failed checks, a pause), and `Rollout.resume` goes on from there instead of step 1. A spec
applied again with the same target carries the rollout over (`Rollout.carry`): one in progress goes on,
judged by the new analysis; a finished one keeps its result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from skyloop.deploy.analysis import Analysis, Verdict, Window, analyse
from skyloop.deploy.spec import DeploymentSpec, Strategy

__all__ = ["Phase", "Rollout", "Transition"]


class Phase(StrEnum):
    """Where a deployment stands."""

    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    HEALTHY = "Healthy"
    DEGRADED = "Degraded"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Transition:
    """A change the controller records, then applies."""

    kind: str
    """step, paused, resumed, analysis.failed, rolled_back, promoted."""
    status: Phase
    step: int | None
    weights: dict[str, float]
    mirrors: dict[str, float]
    reason: str
    metrics: dict[str, Any] | None = None
    new_window: bool = False
    """The gateway must open fresh windows (a new step starts, or a failed check was tolerated)."""


@dataclass
class Rollout:
    """One rollout of `spec.rollout.target` against the stable predictors."""

    spec: DeploymentSpec
    started: float
    phase: Phase = Phase.PROGRESSING
    step: int = -1
    step_started: float = 0.0
    last_check: float = 0.0
    failures: int = 0
    """Failed checks since the rollout began (not since the step began)."""
    waiting: bool = False
    """Paused until a `promote` command (an untimed pause step, or an Inconclusive one)."""
    weights: dict[str, float] = field(default_factory=dict)
    mirrors: dict[str, float] = field(default_factory=dict)
    last: Analysis | None = None
    end_checked: bool = False
    """The step's end has been judged once (a failed end is judged again only at the next interval)."""
    served: str = ""
    """What the target serves (the controller's digest of its pinned graph): a spec applied again carries the
    rollout over only while its target serves the same."""

    def __post_init__(self) -> None:
        self.target = self.spec.rollout.target or ""
        live = {p.name: p.traffic for p in self.spec.predictors if not p.shadow and p.name != self.target}
        total = sum(live.values()) or float(len(live))
        self.stable_weights = {n: (w / total if sum(live.values()) else 1 / total) for n, w in live.items()}
        """Stable predictors' shares of what the target does not take (sum 1)."""
        self.stable = max(live, key=lambda n: live[n])
        """The stable predictor the target is compared with."""
        self.weights = self._split(0.0)

    @property
    def done(self) -> bool:
        """Whether the rollout has finished (promoted or rolled back)."""
        return self.phase in (Phase.HEALTHY, Phase.DEGRADED)

    def _split(self, target: float) -> dict[str, float]:
        return {self.target: target, **{n: (100.0 - target) * s for n, s in self.stable_weights.items()}}

    def _move(self, kind: str, now: float, reason: str, target_weight: float | None = None,
              metrics: dict[str, Any] | None = None, new_window: bool = False) -> Transition:
        if target_weight is not None:
            self.weights = self._split(target_weight)
        if new_window:
            self.step_started = self.last_check = now
        return Transition(kind, self.phase, self.step, dict(self.weights), dict(self.mirrors), reason, metrics,
                          new_window)

    def saved(self, now: float) -> dict[str, Any]:
        """Where the rollout stands, JSON-able, for `Rollout.resume` in a controller started later."""
        return {"strategy": self.spec.rollout.strategy.value, "target": self.target, "stable": self.stable,
                "phase": self.phase.value, "step": self.step, "failures": self.failures, "waiting": self.waiting,
                "weights": dict(self.weights), "mirrors": dict(self.mirrors), "served": self.served,
                "elapsed": max(0.0, now - self.step_started) if self.step >= 0 else 0.0}

    @classmethod
    def resume(cls, spec: DeploymentSpec, saved: Mapping[str, Any], now: float) -> Rollout | None:
        """The rollout of `spec` as `saved()` left it, going on from `now` (None if it is not one of `spec`'s).

        The step keeps the time it had run (a restart does not lengthen it, nor does the downtime count), its
        failed checks and its pause. The windows it was judged on are gone with the controller that filled
        them: it is judged on fresh ones, and so the step has at least one `analysis.interval` left.
        """
        rollout = cls(spec, now)
        if not rollout._fits(saved):
            return None
        rollout.phase, rollout.step = Phase(saved["phase"]), int(saved["step"])
        rollout.failures, rollout.waiting = int(saved.get("failures") or 0), bool(saved.get("waiting"))
        rollout.weights = {n: float(w) for n, w in saved["weights"].items()}
        rollout.mirrors = {n: float(f) for n, f in (saved.get("mirrors") or {}).items()}
        rollout.served = str(saved.get("served") or "")
        elapsed = float(saved.get("elapsed") or 0.0)
        end = rollout._step_end()
        if end is not None and not rollout.done:
            elapsed = min(elapsed, end - spec.analysis.interval)
        rollout.step_started, rollout.last_check = now - max(0.0, elapsed), now
        return rollout

    @classmethod
    def carry(cls, spec: DeploymentSpec, previous: Rollout, now: float) -> Rollout | None:
        """`previous`, the rollout of an earlier spec version, as a rollout of `spec` (None: start afresh).

        Only a rollout of the same target over the same live predictors is carried over (the caller checks that
        the target still serves the same). One in progress needs the same `rollout:` section too: it goes on
        at its step, with its failed checks, judged by `spec`'s analysis from now on, and the stable predictors
        share what the target does not take as `spec` says. A finished one keeps its result whatever its
        steps: promoted, the target keeps 100%; rolled back, it keeps 0%.
        """
        rollout = cls(spec, now)
        if spec.rollout.strategy is Strategy.ROLLING or rollout.target != previous.target \
                or set(rollout.weights) != set(previous.weights) or previous.step < 0:
            return None
        target = previous.weights.get(previous.target, 0.0)
        if previous.done:
            rollout.phase, rollout.last, rollout.failures = previous.phase, previous.last, previous.failures
            steps = 1 if spec.rollout.strategy is Strategy.BLUE_GREEN else len(spec.rollout.steps)
            rollout.step, rollout.step_started, rollout.last_check = steps - 1, now, now
        elif spec.rollout != previous.spec.rollout:
            return None
        else:
            resumed = cls.resume(spec, previous.saved(now), now)
            if resumed is None:
                return None
            rollout = resumed
            rollout.last = previous.last
        rollout.weights, rollout.served = rollout._split(target), previous.served
        return rollout

    def _fits(self, saved: Mapping[str, Any]) -> bool:
        """Whether `saved` is a state of this rollout: the same strategy and target, a step it has, its weights."""
        step, elapsed, weights, mirrors = (saved.get(k) for k in ("step", "elapsed", "weights", "mirrors"))
        steps = 1 if self.spec.rollout.strategy is Strategy.BLUE_GREEN else len(self.spec.rollout.steps)
        mirrors = {} if mirrors is None else mirrors
        return (saved.get("strategy") == self.spec.rollout.strategy.value and saved.get("target") == self.target
                and saved.get("phase") in {p.value for p in Phase} and type(step) is int and 0 <= step < steps
                and (elapsed is None or _finite(elapsed))  # None: saved before `elapsed` was (at the step's start)
                and isinstance(weights, dict) and set(weights) == set(self.weights)
                and isinstance(mirrors, dict) and set(mirrors) <= {self.target}
                and all(_finite(v) for v in (*weights.values(), *mirrors.values())))

    def start(self, now: float) -> list[Transition]:
        """The first transitions: the first canary step, or the blue-green preview."""
        if self.spec.rollout.strategy is Strategy.BLUE_GREEN:
            self.step = 0
            self.mirrors = {self.target: 1.0}
            return [self._move("preview", now, f"{self.target} previewed on mirrored traffic for "
                               f"{self.spec.rollout.preview:g}s before the switch", 0.0, new_window=True)]
        return self._enter(0, now, None)

    def _enter(self, index: int, now: float, passed: Analysis | None) -> list[Transition]:
        metrics = passed.to_dict() if passed else None
        steps = self.spec.rollout.steps
        if index >= len(steps):
            return [self._promote(now, "all steps passed", metrics)]
        self.step, self.last, self.end_checked = index, None, False  # failures count over the whole rollout
        step = steps[index]
        label = f"step {index + 1}/{len(steps)}"
        if step.pause is not None:
            self.waiting = step.pause_seconds is None
            self.phase = Phase.PAUSED if self.waiting else Phase.PROGRESSING
            how = "until promoted" if self.waiting else f"for {step.pause_seconds:g}s"
            return [self._move("paused" if self.waiting else "step", now, f"{label}: pause {how}", metrics=metrics,
                               new_window=True)]
        self.waiting, self.phase = False, Phase.PROGRESSING
        weight = float(step.weight or 0.0)
        return [self._move("step", now, f"{label}: {self.target} at {weight:g}% for {step.duration:g}s", weight,
                           metrics, new_window=True)]

    def _promote(self, now: float, why: str, metrics: dict[str, Any] | None) -> Transition:
        self.phase, self.waiting, self.mirrors = Phase.HEALTHY, False, {}
        return self._move("promoted", now, f"{self.target} promoted to 100%: {why}", 100.0, metrics)

    def _rollback(self, now: float, why: str, metrics: dict[str, Any] | None) -> Transition:
        self.phase, self.waiting, self.mirrors = Phase.DEGRADED, False, {}
        return self._move("rolled_back", now, f"{self.target} rolled back to 0%: {why}", 0.0, metrics)

    def _judge(self, windows: dict[str, Window]) -> Analysis:
        analysis = self.spec.analysis
        self.last = analyse(analysis.metrics, windows.get(self.target, Window()), windows.get(self.stable),
                            analysis.min_samples)
        return self.last

    def tick(self, now: float, windows: dict[str, Window]) -> list[Transition]:
        """Advance with time; `windows` hold what each predictor did since the current step began."""
        if self.done or self.step < 0:
            return []
        end = self._step_end()
        ended = end is not None and now - self.step_started >= end
        exposed = self.weights.get(self.target, 0.0) > 0 or self.target in self.mirrors
        due = now - self.last_check >= self.spec.analysis.interval
        closing = ended and not self.waiting and not self.end_checked
        result: Analysis | None = None
        if exposed and (due or closing):
            self.last_check = now
            self.end_checked = self.end_checked or ended
            result = self._judge(windows)
            if result.verdict is Verdict.FAILED:
                self.failures += 1
                limit = self.spec.analysis.failure_limit
                if self.failures > limit:
                    return [self._rollback(now, f"{result.reason} (failed check {self.failures}, "
                                                f"{limit} tolerated)", result.to_dict())]
                # Fresh windows, not the step's clock: judged on the same window, the errors that failed this
                # check would fail the next ones too, and a single burst would use up every tolerated failure.
                failed = self._move("analysis.failed", now, f"failed check {self.failures} of {limit} tolerated: "
                                    f"{result.reason}", metrics=result.to_dict())
                return [replace(failed, new_window=True)]
        if self.waiting and result is not None and result.verdict is Verdict.SUCCESSFUL and not self._pausing():
            # Paused on an Inconclusive end (too few samples, or a breach within sampling noise): the analysis
            # went on, and now tells. Waiting for a person here would hold a closed loop's rollout for good.
            self.waiting, self.phase = False, Phase.PROGRESSING
            resumed = self._move("resumed", now, f"step {self.step + 1} judged Successful in its pause: "
                                 f"{result.reason}", metrics=result.to_dict())
            return [resumed, *self._next(now, result)]
        if self.waiting or not ended:
            return []
        if self._pausing() or not exposed:
            return self._enter(self.step + 1, now, None)
        if result is None:
            return []  # the end was judged already (and failed): judge again at the next interval
        if result.verdict is Verdict.INCONCLUSIVE:
            self.phase, self.waiting = Phase.PAUSED, True
            return [self._move("paused", now, f"Inconclusive: {result.reason}; waiting for "
                               "`skyloop deploy promote` or `rollback`", metrics=result.to_dict())]
        return self._next(now, result)

    def _pausing(self) -> bool:
        return self.spec.rollout.strategy is not Strategy.BLUE_GREEN and \
            self.spec.rollout.steps[self.step].pause is not None

    def _step_end(self) -> float | None:
        if self.spec.rollout.strategy is Strategy.BLUE_GREEN:
            return self.spec.rollout.preview
        step = self.spec.rollout.steps[self.step]
        return step.duration if step.pause is None else step.pause_seconds

    def _next(self, now: float, passed: Analysis) -> list[Transition]:
        if self.spec.rollout.strategy is Strategy.BLUE_GREEN:
            return [self._promote(now, f"preview passed: {passed.reason}", passed.to_dict())]
        return self._enter(self.step + 1, now, passed)

    def command(self, command: str, now: float) -> list[Transition]:
        """Apply a user's `promote` (resume from a pause), `promote_full` (straight to 100%) or `rollback`."""
        if self.done:
            return []
        metrics = self.last.to_dict() if self.last else None
        if command == "rollback":
            return [self._rollback(now, "rollback requested", metrics)]
        if command == "promote_full":
            return [self._promote(now, "full promotion requested", metrics)]
        if self.spec.rollout.strategy is Strategy.BLUE_GREEN:
            return [self._promote(now, "promotion requested", metrics)]
        resumed = self._move("resumed", now, f"step {self.step + 1} promoted by request", metrics=metrics)
        return [resumed, *self._enter(self.step + 1, now, None)]
