"""A deployment's history as a picture: live quality and traffic per model version, drift, and the events.

`skyloop deploy history NAME --picture DIR` writes `DIR/NAME-history.png` and `.html` with the same
renderer as the demo's report (`monitoring.report`), from what the DB holds: the transitions (each with
the weights and versions it set) and the drift reports (which carry the live quality measured with them).
Drift is drawn as one score per feature, whatever its test, with the line at 1 where features start to drift.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from skyloop.monitoring.report import LoopReport, render_report
from skyloop.store import deployments as store
from skyloop.store.models import DriftReportRow
from skyloop.store.workspace import Workspace

__all__ = ["EVENT_KINDS", "MAX_POINTS", "SCORE_CAP", "drift_score", "drift_series", "history_report",
           "write_history_picture"]

MAX_POINTS = 2_000
"""The most drift checks a picture draws (a month of checks every 5 s is 518,400)."""
SCORE_CAP = 10.0
"""The highest drift score drawn (p = 0 would be infinite)."""
_P_VALUE_TESTS = {"ks", "chisquare", "z"}

EVENT_KINDS = {"loop.fired": "drift", "loop.retraining": "retrain", "loop.blessed": "blessed",
           "loop.rejected": "rejected", "promoted": "promoted", "rolled_back": "rolled_back", "step": "canary"}
"""Deployment event kinds -> the kinds the report marks on its time axis."""


def drift_score(feature: dict[str, Any]) -> float | None:
    """One feature's drift as a score that reads the same for every test: 1 at its threshold, above when it
    drifts. A distance over its threshold; a p-value test's `log p / log threshold` (p = threshold is 1, p = 1 is
    0). Capped at `SCORE_CAP`; a feature with no current values scores the cap, one not testable None."""
    if feature.get("testable") is False:
        return None
    statistic, p_value, threshold = feature.get("statistic"), feature.get("p_value"), feature.get("threshold")
    if statistic is None or (feature.get("test") in _P_VALUE_TESTS and p_value is None):  # NaN: no values
        return SCORE_CAP
    if not isinstance(threshold, int | float) or threshold <= 0:
        return SCORE_CAP if feature.get("drifted") else 0.0
    if p_value is None:
        return min(float(statistic) / threshold, SCORE_CAP)
    if threshold >= 1:  # a p-value bound no test could miss (refused since): its verdict, on the scale
        return SCORE_CAP if feature.get("drifted") else 0.0
    return min(math.log(max(float(p_value), 1e-300)) / math.log(threshold), SCORE_CAP)


def drift_series(workspace: Workspace, name: str, start: float = 0.0, points: int = MAX_POINTS,
                 ) -> tuple[list[tuple[float, dict[str, float], bool]], list[tuple[float, str, float]]]:
    """The drift checks of `name` from unix time `start` on, as seconds since `start`: per-feature drift scores
    (`drift_score`) with the dataset-drift verdict, and the live quality measured with each check (version, value).

    At most `points` checks: past that, the time is cut into `points` spans and each gives the first of its checks
    that found dataset drift (else its last): a span drifted when any of its checks did. Only those checks' reports are
    loaded; the others are read as (id, time, verdict), a row at a time."""
    after = DriftReportRow.deployment == name, DriftReportRow.at >= datetime.fromtimestamp(start, UTC)
    with workspace.db.read() as session:
        count, first, last = session.execute(select(func.count(), func.min(DriftReportRow.at),
                                                    func.max(DriftReportRow.at)).where(*after)).one()
        chosen: dict[int, bool] = {}
        """Report id -> the dataset-drift verdict shown for it."""
        if count and count > points:
            width = max((last.timestamp() - first.timestamp()) / points, 1e-9)
            spans: dict[int, tuple[int, bool]] = {}  # span -> the check it shows, and whether that one drifted
            rows = session.execute(select(DriftReportRow.id, DriftReportRow.at, DriftReportRow.dataset_drift)
                                   .where(*after).order_by(DriftReportRow.id).execution_options(yield_per=5_000))
            for row_id, at, drifted in rows:
                span = min(int((at.timestamp() - first.timestamp()) / width), points - 1)
                if span not in spans or not spans[span][1]:  # a drifted check is kept; else the latest
                    spans[span] = (row_id, bool(drifted))
            chosen = dict(spans.values())
            query = select(DriftReportRow).where(DriftReportRow.id.in_(list(chosen)))
        else:
            query = select(DriftReportRow).where(*after)
        reports = session.scalars(query.order_by(DriftReportRow.id)).all()
    drift: list[tuple[float, dict[str, float], bool]] = []
    quality: list[tuple[float, str, float]] = []
    for r in reports:
        t = r.at.timestamp() - start
        scores = {f["feature"]: score for f in r.report.get("features", []) if (score := drift_score(f)) is not None}
        drift.append((t, scores, chosen.get(r.id, r.dataset_drift)))
        if r.report.get("quality") is not None:
            quality.append((t, r.version, float(r.report["quality"])))
    return drift, quality


def history_report(workspace: Workspace, name: str) -> LoopReport:
    """The report data of deployment `name`: traffic per version after each transition, drift, events."""
    with workspace.db.read() as session:
        events = store.deployment_history(session, name)
    start = events[0].at.timestamp() if events else 0.0
    drift, quality = drift_series(workspace, name, start)
    traffic: list[tuple[float, dict[str, float]]] = []
    for e in events:
        shares: dict[str, float] = {}
        for predictor, weight in e.weights.items():
            version = e.versions.get(predictor, predictor)
            if float(weight) > 0:
                shares[version] = shares.get(version, 0.0) + float(weight)
        if shares:
            traffic.append((e.at.timestamp() - start, shares))
    final = traffic[-1][1] if traffic else {}
    summary = {"deployment": name, "transitions": str(len(events)),
               "serving now": ", ".join(f"{v} ({w:g}%)" for v, w in final.items()) or "-"}
    return LoopReport(title=f"deployment {name}: history", started_at=start, traffic=traffic,
                      accuracy=quality,
                      drift=drift, drift_threshold=1.0,
                      drift_statistic="drift score (1 = threshold; distance / threshold, log p / log threshold)",
                      events=[(e.at.timestamp() - start, EVENT_KINDS.get(e.kind, e.kind), e.reason) for e in events],
                      summary=summary)


def write_history_picture(workspace: Workspace, name: str, folder: Path) -> tuple[Path, Path]:
    """Write `folder/NAME-history.png` and `.html`; returns their paths."""
    return render_report(history_report(workspace, name), folder, stem=f"{name}-history")
