"""`summarize_task`: one step's attempt rows folded into what `runs show` and `--json` report."""

from __future__ import annotations

from datetime import datetime, timedelta

from skyloop.execution.run import summarize_task
from skyloop.store.models import StepRunRow

T0 = datetime(2024, 1, 1, 12, 0, 0)


def _unit(index: int, estimate: float | None, source: str | None, state: str = "SUCCEEDED") -> StepRunRow:
    return StepRunRow(task="unit", map_index=index, attempt=1, state=state, estimate_seconds=estimate,
                      estimate_source=source, started_at=T0, ended_at=T0 + timedelta(seconds=index + 1))


def test_units_with_different_estimate_sources_report_mixed() -> None:
    rows = [_unit(0, 60.0, "default"), _unit(1, 60.0, "default"), _unit(2, 60.0, "default"),
            _unit(3, 2.0, "siblings")]
    info = summarize_task("unit", rows)
    assert info.units == 4
    assert info.estimate == 45.5  # the mean over the units, whatever each estimate's source
    assert info.estimate_source == "mixed"


def test_units_that_agree_keep_their_source() -> None:
    info = summarize_task("unit", [_unit(0, 3.0, "history"), _unit(1, 5.0, "history")])
    assert info.estimate == 4.0 and info.estimate_source == "history"


def test_units_without_an_estimate_do_not_make_it_mixed() -> None:
    info = summarize_task("unit", [_unit(0, 3.0, "siblings"), _unit(1, None, None, state="CACHED")])
    assert info.estimate == 3.0 and info.estimate_source == "siblings"
    assert summarize_task("unit", [_unit(0, None, None)]).estimate_source is None


def test_only_the_latest_attempt_of_a_unit_counts() -> None:
    retried = _unit(0, 7.0, "history")
    retried.attempt = 2
    info = summarize_task("unit", [_unit(0, 60.0, "default", state="FAILED"), retried, _unit(1, 7.0, "history")])
    assert info.attempts == 3 and info.units == 2
    assert info.estimate == 7.0 and info.estimate_source == "history"
