"""Retraining triggers: condition validation, any/all, no data, debounce, cooldown, the firing's cause."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from skyloop.monitoring.triggers import Condition, Firing, Signals, Triggers, TriggersSpec


def _signals(drift: bool | None = None, quality: float | None = None, labelled: int = 0,
             detail: str = "", samples: int = 0) -> Signals:
    return Signals(dataset_drift=drift, quality=quality, labelled_rows=labelled, drift_detail=detail,
                   quality_samples=samples)


def _triggers(*on: dict[str, Any], mode: str = "any", cooldown: Any = 0, debounce: int = 1,
              started: float = 0.0) -> Triggers:
    spec = TriggersSpec.model_validate({"on": list(on), "mode": mode, "cooldown": cooldown, "debounce": debounce})
    return Triggers(spec, started=started)


# -- Condition -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "name", "field", "value"), [
    ({"drift": True}, "drift", "drift", True),
    ({"drift": False}, "drift", "drift", False),
    ({"quality_below": 0.8}, "quality_below", "quality_below", 0.8),
    ({"labelled_rows": 500}, "labelled_rows", "labelled_rows", 500),
    ({"schedule": "10m"}, "schedule", "schedule", 600.0),
    ({"schedule": "1h"}, "schedule", "schedule", 3600.0),
    ({"schedule": "1.5s"}, "schedule", "schedule", 1.5),
    ({"schedule": 30}, "schedule", "schedule", 30.0),
])
def test_condition_accepts_one_field(given: dict[str, Any], name: str, field: str, value: Any) -> None:
    condition = Condition.model_validate(given)
    assert condition.name == name
    assert getattr(condition, field) == value


@pytest.mark.parametrize(("given", "got"), [
    ({}, None),
    ({"drift": True, "quality_below": 0.8}, "got drift, quality_below"),
    ({"labelled_rows": 10, "schedule": "1h"}, "got labelled_rows, schedule"),
])
def test_condition_needs_exactly_one_field_and_names_the_forms(given: dict[str, Any], got: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        Condition.model_validate(given)
    message = str(info.value)
    for form in ("{drift: true}", "{quality_below: 0.8}", "{labelled_rows: 500}", "{schedule: 10m}"):
        assert form in message
    if got is None:
        assert "got" not in message
    else:
        assert got in message


@pytest.mark.parametrize(("given", "fragment"), [
    ({"schedule": "soon"}, "'soon' is not a duration; write e.g. 2ms, 1.5s, 5m or 1h"),
    ({"schedule": "10 minutes"}, "is not a duration"),
    ({"labelled_rows": 0}, "greater than or equal to 1"),
    ({"drift": True, "every": "1h"}, "Extra inputs are not permitted"),
])
def test_condition_rejects_bad_values(given: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        Condition.model_validate(given)
    assert fragment in str(info.value)


# -- TriggersSpec ----------------------------------------------------------------------------------------------

def test_spec_defaults() -> None:
    spec = TriggersSpec.model_validate({"on": [{"drift": True}]})
    assert (spec.mode, spec.cooldown, spec.debounce) == ("any", 60.0, 1)


@pytest.mark.parametrize(("cooldown", "seconds"), [("2m", 120.0), ("1h", 3600.0), ("500ms", 0.5), (15, 15.0),
                                                   (0, 0.0)])
def test_spec_parses_cooldown(cooldown: Any, seconds: float) -> None:
    assert TriggersSpec.model_validate({"on": [{"drift": True}], "cooldown": cooldown}).cooldown == seconds


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"on": []}, "at least 1 item"),
    ({"debounce": 0}, "greater than or equal to 1"),
    ({"cooldown": "later"}, "'later' is not a duration"),
    ({"mode": "most"}, "'any' or 'all'"),
])
def test_spec_rejects_bad_values(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        TriggersSpec.model_validate({"on": [{"drift": True}], **extra})
    assert fragment in str(info.value)


def test_spec_needs_on() -> None:
    with pytest.raises(ValidationError, match="on"):
        TriggersSpec.model_validate({"mode": "any"})


# -- any / all -------------------------------------------------------------------------------------------------

def test_any_fires_when_one_condition_holds_and_names_only_it() -> None:
    triggers = _triggers({"drift": True}, {"quality_below": 0.8})
    firing = triggers.check(_signals(drift=True, quality=0.9), now=5.0)
    assert firing is not None
    assert firing.reason == "dataset drift"
    assert firing.cause["conditions"]["drift"]["met"] is True
    assert firing.cause["conditions"]["quality_below"]["met"] is False


def test_any_does_not_fire_when_nothing_holds() -> None:
    triggers = _triggers({"drift": True}, {"quality_below": 0.8})
    assert triggers.check(_signals(drift=False, quality=0.9), now=5.0) is None
    assert triggers.history == []


def test_all_needs_every_condition() -> None:
    triggers = _triggers({"drift": True}, {"quality_below": 0.8}, mode="all")
    assert triggers.check(_signals(drift=True, quality=0.9), now=1.0) is None
    assert triggers.check(_signals(drift=False, quality=0.5), now=2.0) is None
    firing = triggers.check(_signals(drift=True, quality=0.5, samples=20), now=3.0)
    assert firing is not None
    assert firing.reason == "dataset drift; live quality 0.500 over 20 labelled answers"


# -- no data means no trigger ----------------------------------------------------------------------------------

@pytest.mark.parametrize("condition", [{"drift": True}, {"drift": False}, {"quality_below": 0.8}])
def test_a_condition_without_data_is_never_met(condition: dict[str, Any]) -> None:
    triggers = _triggers(condition)
    for t in range(5):
        assert triggers.check(_signals(drift=None, quality=None), now=float(t)) is None
    assert triggers.streak == 0


def test_no_data_blocks_all_even_when_the_rest_holds() -> None:
    triggers = _triggers({"drift": True}, {"labelled_rows": 10}, mode="all")
    assert triggers.check(_signals(drift=None, labelled=1_000), now=1.0) is None


def test_no_data_condition_reports_none_as_its_value() -> None:
    triggers = _triggers({"quality_below": 0.8}, {"labelled_rows": 10})
    firing = triggers.check(_signals(quality=None, labelled=10), now=1.0)
    assert firing is not None
    assert firing.cause["conditions"]["quality_below"] == {"met": False, "value": None, "threshold": 0.8}


def test_drift_false_condition_fires_on_measured_absence_of_drift() -> None:
    # `drift: false` means "measured and not drifting"; unmeasured is still no trigger.
    triggers = _triggers({"drift": False})
    assert triggers.check(_signals(drift=True), now=1.0) is None
    assert triggers.check(_signals(drift=False), now=2.0) is not None


# -- thresholds --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("quality", "fires"), [(0.79, True), (0.8, False), (0.81, False), (0.0, True)])
def test_quality_below_is_strict(quality: float, fires: bool) -> None:
    triggers = _triggers({"quality_below": 0.8})
    assert (triggers.check(_signals(quality=quality), now=1.0) is not None) is fires


@pytest.mark.parametrize(("rows", "fires"), [(0, False), (99, False), (100, True), (101, True)])
def test_labelled_rows_is_at_least(rows: int, fires: bool) -> None:
    triggers = _triggers({"labelled_rows": 100})
    assert (triggers.check(_signals(labelled=rows), now=1.0) is not None) is fires


def test_schedule_counts_from_start_then_from_the_last_firing() -> None:
    triggers = _triggers({"schedule": "1m"}, started=1_000.0)
    assert triggers.check(_signals(), now=1_059.0) is None
    first = triggers.check(_signals(), now=1_060.0)
    assert first is not None
    assert first.cause["conditions"]["schedule"] == {"met": True, "value": 60.0, "threshold": 60.0}
    assert first.reason == "schedule (60s since the last run)"
    triggers.finished(1_061.0)
    assert triggers.check(_signals(), now=1_100.0) is None  # 40 s after the firing, not 100 s after start
    assert triggers.check(_signals(), now=1_119.5) is None
    second = triggers.check(_signals(), now=1_120.25)
    assert second is not None
    assert second.cause["conditions"]["schedule"]["value"] == 60.25
    assert triggers.last_fired == 1_120.25


# -- debounce ----------------------------------------------------------------------------------------------------

def test_debounce_needs_consecutive_met_checks_and_resets_on_a_miss() -> None:
    triggers = _triggers({"labelled_rows": 10}, debounce=3)
    met, miss = _signals(labelled=10), _signals(labelled=9)
    assert triggers.check(met, now=1.0) is None
    assert triggers.check(met, now=2.0) is None
    assert triggers.streak == 2
    assert triggers.check(miss, now=3.0) is None
    assert triggers.streak == 0
    assert triggers.check(met, now=4.0) is None
    assert triggers.check(met, now=5.0) is None
    firing = triggers.check(met, now=6.0)
    assert firing is not None
    assert firing.cause["checks_in_a_row"] == 3
    assert triggers.streak == 0  # a firing starts a new streak
    triggers.finished(6.0)
    assert triggers.check(met, now=7.0) is None
    assert triggers.check(met, now=8.0) is None
    assert triggers.check(met, now=9.0) is not None


def test_debounce_streak_keeps_growing_during_the_cooldown() -> None:
    # The streak is counted on every check, cooling or not: once the cooldown is over a long-held
    # condition fires at the first check, without waiting `debounce` more checks.
    triggers = _triggers({"labelled_rows": 1}, debounce=2, cooldown=10)
    met = _signals(labelled=1)
    triggers.check(met, now=0.0)
    assert triggers.check(met, now=1.0) is not None
    triggers.finished(2.0)
    for t in (3.0, 4.0, 5.0):
        assert triggers.check(met, now=t) is None
    assert triggers.streak == 3
    firing = triggers.check(met, now=12.0)
    assert firing is not None
    assert firing.cause["checks_in_a_row"] == 4


# -- cooldown ----------------------------------------------------------------------------------------------------

def test_cooldown_counts_from_finished_not_from_the_firing() -> None:
    triggers = _triggers({"drift": True}, cooldown="100s")
    drift = _signals(drift=True)
    assert triggers.check(drift, now=10.0) is not None
    triggers.finished(50.0)
    assert triggers.cooling(50.0) == 100.0
    assert triggers.check(drift, now=110.0) is None  # 100 s after the firing, 60 s after the end
    assert triggers.check(drift, now=149.0) is None
    assert triggers.cooling(149.0) == pytest.approx(1.0)
    assert triggers.cooling(150.0) == 0.0
    assert triggers.check(drift, now=150.0) is not None
    assert [f.at for f in triggers.history] == [10.0, 150.0]


def test_no_cooldown_before_the_first_firing() -> None:
    triggers = _triggers({"drift": True}, cooldown="1h")
    assert triggers.cooling(0.0) == 0.0
    assert triggers.check(_signals(drift=True), now=0.0) is not None


def test_cooling_is_zero_while_an_iteration_is_in_progress_so_check_fires_again() -> None:
    # Documented behaviour: the class itself does not block a second firing between `check` and
    # `finished` (idle_since is reset to None, so cooling() is 0); it relies on the loop only calling
    # `check` while it is watching.
    triggers = _triggers({"drift": True}, cooldown="1h")
    drift = _signals(drift=True)
    assert triggers.check(drift, now=10.0) is not None
    assert triggers.idle_since is None
    assert triggers.cooling(11.0) == 0.0
    assert triggers.check(drift, now=11.0) is not None
    assert len(triggers.history) == 2


def test_a_firing_clears_a_previous_cooldown() -> None:
    triggers = _triggers({"drift": True}, cooldown=5)
    triggers.check(_signals(drift=True), now=0.0)
    triggers.finished(1.0)
    assert triggers.cooling(2.0) == 4.0
    assert triggers.check(_signals(drift=True), now=6.0) is not None
    assert triggers.idle_since is None


# -- cause, reason, history ----------------------------------------------------------------------------------------

def test_cause_lists_every_condition_with_value_and_threshold() -> None:
    triggers = _triggers({"drift": True}, {"quality_below": 0.9}, {"labelled_rows": 100}, {"schedule": "10m"},
                         started=0.0)
    firing = triggers.check(_signals(drift=True, quality=0.7, labelled=120, detail="3 of 5 features drift",
                                     samples=40), now=600.0)
    assert firing is not None
    assert firing.at == 600.0
    assert firing.cause == {
        "mode": "any",
        "checks_in_a_row": 1,
        "conditions": {
            "drift": {"met": True, "value": True, "threshold": True},
            "quality_below": {"met": True, "value": 0.7, "threshold": 0.9},
            "labelled_rows": {"met": True, "value": 120, "threshold": 100},
            "schedule": {"met": True, "value": 600.0, "threshold": 600.0},
        },
        "drift": "3 of 5 features drift",
        "quality_samples": 40,
    }
    assert firing.reason == ("dataset drift (3 of 5 features drift); live quality 0.700 over 40 labelled answers; "
                             "120 new labelled rows; schedule (600s since the last run)")


def test_reason_names_only_what_fired() -> None:
    triggers = _triggers({"drift": True}, {"labelled_rows": 100})
    firing = triggers.check(_signals(drift=False, labelled=250), now=1.0)
    assert firing is not None
    assert firing.reason == "250 new labelled rows"
    assert firing.cause["conditions"]["drift"] == {"met": False, "value": False, "threshold": True}


def test_history_records_each_firing_in_order() -> None:
    triggers = _triggers({"labelled_rows": 1})
    fired: list[Firing] = []
    for t in (1.0, 2.0, 3.0):
        firing = triggers.check(_signals(labelled=1), now=t)
        assert firing is not None
        fired.append(firing)
        triggers.check(_signals(labelled=0), now=t + 0.5)
        triggers.finished(t + 0.5)
    assert triggers.history == fired
    assert [f.at for f in triggers.history] == [1.0, 2.0, 3.0]


def test_two_conditions_of_one_kind_are_refused() -> None:
    with pytest.raises(ValidationError, match="labelled_rows appears more than once"):
        _triggers({"labelled_rows": 100}, {"labelled_rows": 10}, mode="all")


def test_debounce_counts_only_drift_checks_whose_windows_do_not_overlap() -> None:
    # Checks 5 s apart test nearly the same logged rows: a second one confirms the same noise, not a new window.
    triggers = _triggers({"drift": True}, debounce=2)

    def drift(first: float, last: float) -> Signals:
        return Signals(dataset_drift=True, quality=None, labelled_rows=0, drift_window=(first, last))

    assert triggers.check(drift(0.0, 60.0), now=60.0) is None
    assert triggers.check(drift(5.0, 65.0), now=65.0) is None  # overlaps: neither counts nor breaks the streak
    assert triggers.check(drift(30.0, 90.0), now=90.0) is None
    assert triggers.streak == 1
    firing = triggers.check(drift(61.0, 121.0), now=121.0)  # the first window of rows all new
    assert firing is not None and firing.cause["checks_in_a_row"] == 2
    # A check without drift still breaks the streak, and the next window counts from scratch.
    assert triggers.check(drift(122.0, 180.0), now=180.0) is None
    assert triggers.check(Signals(dataset_drift=False, quality=None, labelled_rows=0, drift_window=(150.0, 200.0)),
                          now=200.0) is None
    assert triggers.streak == 0
    assert triggers.check(drift(170.0, 230.0), now=230.0) is None
    assert triggers.check(drift(231.0, 290.0), now=290.0) is not None
    # Conditions other than drift count every check, as before.
    rows = _triggers({"labelled_rows": 1}, debounce=2)
    assert rows.check(_signals(labelled=1), now=1.0) is None
    assert rows.check(_signals(labelled=1), now=2.0) is not None


@pytest.mark.parametrize("mode", ["any", "all"])
def test_with_mode_any_a_check_another_condition_meets_counts_whatever_the_drift_window(mode: str) -> None:
    # With slow traffic the drift window hardly moves: adding a drift condition to `mode: any` held back a
    # quality of 0.3 under a bar of 0.8 for good (the checks counted only as drift checks of overlapping windows).
    # With `mode: all`, drift is needed, so its window must be new for a check to count.
    triggers = _triggers({"drift": True}, {"quality_below": 0.8}, mode=mode, debounce=2)
    slow = [Signals(dataset_drift=True, quality=0.3, labelled_rows=0, drift_window=(float(i), 100.0 + i),
                    quality_samples=200) for i in range(5)]
    fired = [triggers.check(signals, now=100.0 + i) is not None for i, signals in enumerate(slow)]
    assert fired == ([False, True, False, True, False] if mode == "any" else [False] * 5)
