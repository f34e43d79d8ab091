"""When to retrain: conditions on what monitoring sees, combined with any/all, debounced, with a cooldown.

Pure: the loop measures the signals (dataset drift, live quality, new labelled rows, time) and asks
`Triggers.check` whether to fire. A condition without data is not met (no data never triggers);
`debounce` asks for that many consecutive checks with the combination met, where a check met by drift counts
only when its window of logged rows begins after the window of the last check counted (checks 5 s apart test
nearly the same rows: counting them would confirm the same noise); one whose window overlaps neither counts nor
breaks the streak. After a firing nothing fires
again for `cooldown` seconds (counted from when the loop says it finished, so a retraining and its
rollout never overlap with the next one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyloop.serving.spec import parse_duration

__all__ = ["Condition", "Firing", "Signals", "Triggers", "TriggersSpec"]


class Condition(BaseModel):
    """One condition; give exactly one field."""

    # Finite numbers only, as in `deploy.spec`: NaN passes every bound and neither survives the stored JSON.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    drift: bool | None = None
    """Dataset drift of the serving version's recent inputs against its training reference."""
    quality_below: float | None = None
    """Live quality (the loop's quality metric, from feedback) below this value."""
    labelled_rows: int | None = Field(default=None, ge=1)
    """At least this many new labelled rows since the last firing."""
    schedule: float | None = None
    """This many seconds since the last firing (`10m`, `1h`...)."""

    @field_validator("schedule", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _one(self) -> Condition:
        given = [k for k in ("drift", "quality_below", "labelled_rows", "schedule") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a trigger condition is one of {drift: true}, {quality_below: 0.8}, "
                             "{labelled_rows: 500} or {schedule: 10m}" + (f"; got {', '.join(given)}" if given else ""))
        return self

    @property
    def name(self) -> str:
        """The condition's kind."""
        return next(k for k in ("drift", "quality_below", "labelled_rows", "schedule") if getattr(self, k) is not None)


class TriggersSpec(BaseModel):
    """The `triggers` of a deployment's `loop`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    on: list[Condition] = Field(min_length=1)
    mode: Literal["any", "all"] = "any"
    cooldown: float = 60.0
    """Seconds after a loop iteration ends before the next may fire."""
    debounce: int = Field(default=1, ge=1)
    """Consecutive checks with the conditions met before firing; checks met by drift count only when their windows
    of logged rows do not overlap."""

    @field_validator("cooldown", mode="before")
    @classmethod
    def _cooldown(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _distinct(self) -> TriggersSpec:
        kinds = [c.name for c in self.on]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"triggers.on: {', '.join(twice)} appears more than once; give each kind of condition "
                             "once (the strictest threshold)")
        return self


@dataclass(frozen=True)
class Signals:
    """What monitoring measured at one check; None where there was not enough data."""

    dataset_drift: bool | None
    quality: float | None
    labelled_rows: int
    """Labelled rows since the last firing."""
    drift_detail: str = ""
    quality_samples: int = 0
    drift_window: tuple[float, float] | None = None
    """When the first and the last of the logged rows drift was measured on arrived (unix times)."""


@dataclass(frozen=True)
class Firing:
    """A decision to retrain and why."""

    at: float
    cause: dict[str, Any]
    reason: str


@dataclass
class Triggers:
    """The trigger state of one deployment's loop."""

    spec: TriggersSpec
    started: float
    last_fired: float | None = None
    idle_since: float | None = None
    """When the last loop iteration ended (cooldown counts from here)."""
    streak: int = 0
    history: list[Firing] = field(default_factory=list)
    counted_until: float | None = None
    """The end of the drift window of the last check the streak counted (a window must begin after it)."""

    def _met(self, c: Condition, s: Signals, now: float) -> tuple[bool, Any]:
        if c.drift is not None:
            return (s.dataset_drift is True) == c.drift and s.dataset_drift is not None, s.dataset_drift
        if c.quality_below is not None:
            return s.quality is not None and s.quality < c.quality_below, s.quality
        if c.labelled_rows is not None:
            return s.labelled_rows >= c.labelled_rows, s.labelled_rows
        assert c.schedule is not None
        since = now - (self.last_fired if self.last_fired is not None else self.started)
        return since >= c.schedule, round(since, 3)

    def cooling(self, now: float) -> float:
        """Seconds of cooldown left (0 when a firing may happen)."""
        if self.idle_since is None:
            return 0.0
        return max(0.0, self.spec.cooldown - (now - self.idle_since))

    def check(self, signals: Signals, now: float) -> Firing | None:
        """Fire when the conditions hold (`debounce` checks in a row) and the cooldown is over."""
        results = {c.name: self._met(c, signals, now) for c in self.spec.on}
        combine = all if self.spec.mode == "all" else any
        met = combine(ok for ok, _ in results.values())
        # A drift check counts in the streak only with a window of new rows, where the check is met by drift: with
        # `mode: any`, one that another condition meets counts as it would without drift in the conditions.
        others = any(ok for name, (ok, _) in results.items() if name != "drift")
        by_drift = results.get("drift", (False, None))[0] and not (self.spec.mode == "any" and others)
        window = signals.drift_window if by_drift else None
        if not met:
            self.streak, self.counted_until = 0, None
        elif window is None:
            self.streak, self.counted_until = self.streak + 1, None
        elif self.counted_until is None or window[0] > self.counted_until:
            self.streak, self.counted_until = self.streak + 1, window[1]
        if not met or self.streak < self.spec.debounce or self.cooling(now) > 0:
            return None
        fired = [name for name, (ok, _) in results.items() if ok]
        cause = {"mode": self.spec.mode, "checks_in_a_row": self.streak,
                 "conditions": {name: {"met": ok, "value": value,
                                       "threshold": _threshold(next(c for c in self.spec.on if c.name == name))}
                                for name, (ok, value) in results.items()},
                 "drift": signals.drift_detail, "quality_samples": signals.quality_samples}
        reason = "; ".join(_describe(name, results[name][1], signals) for name in fired)
        firing = Firing(now, cause, reason)
        self.last_fired, self.streak, self.idle_since, self.counted_until = now, 0, None, None
        self.history.append(firing)
        return firing

    def finished(self, now: float) -> None:
        """The loop iteration started by the last firing is over: the cooldown starts now."""
        self.idle_since = now


def _threshold(c: Condition) -> Any:
    return {"drift": c.drift, "quality_below": c.quality_below, "labelled_rows": c.labelled_rows,
            "schedule": c.schedule}[c.name]


def _describe(name: str, value: Any, s: Signals) -> str:
    if name == "drift":
        return f"dataset drift ({s.drift_detail})" if s.drift_detail else "dataset drift"
    if name == "quality_below":
        return f"live quality {value:.3f} over {s.quality_samples} labelled answers"
    if name == "labelled_rows":
        return f"{value} new labelled rows"
    return f"schedule ({value:g}s since the last run)"
