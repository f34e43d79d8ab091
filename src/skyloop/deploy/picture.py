"""A deployment's history as a picture: live quality and traffic per model version, drift, and the events.

`skyloop deploy history NAME --picture DIR` writes `DIR/NAME-history.png` and `.html` with the same
renderer as the demo's report (`monitoring.report`), from what the DB holds: the transitions (each with
the weights and versions it set) and the drift reports (which carry the live quality measured with them).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from skyloop.monitoring.report import LoopReport, render_report
from skyloop.store import deployments as store
from skyloop.store.models import DriftReportRow
from skyloop.store.workspace import Workspace

__all__ = ["EVENT_KINDS", "drift_series", "history_report", "write_history_picture"]

EVENT_KINDS = {"loop.fired": "drift", "loop.retraining": "retrain", "loop.blessed": "blessed",
           "loop.rejected": "rejected", "promoted": "promoted", "rolled_back": "rolled_back", "step": "canary"}
"""Deployment event kinds -> the kinds the report marks on its time axis."""


def drift_series(workspace: Workspace, name: str, start: float = 0.0,
                 ) -> tuple[list[tuple[float, dict[str, float], bool]], list[tuple[float, str, float]]]:
    """The drift checks of `name` from unix time `start` on, as seconds since `start`: per-feature statistics
    with the dataset-drift verdict, and the live quality measured with each check (version, value)."""
    with workspace.db.read() as session:
        rows = session.scalars(select(DriftReportRow).where(DriftReportRow.deployment == name)
                               .order_by(DriftReportRow.id)).all()
    rows = [r for r in rows if r.at.timestamp() >= start]
    drift = [(r.at.timestamp() - start, {f["feature"]: f["statistic"] for f in r.report.get("features", [])},
              r.dataset_drift) for r in rows]
    quality = [(r.at.timestamp() - start, r.version, float(r.report["quality"])) for r in rows
               if r.report.get("quality") is not None]
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
                      drift=drift,
                      events=[(e.at.timestamp() - start, EVENT_KINDS.get(e.kind, e.kind), e.reason) for e in events],
                      summary=summary)


def write_history_picture(workspace: Workspace, name: str, folder: Path) -> tuple[Path, Path]:
    """Write `folder/NAME-history.png` and `.html`; returns their paths."""
    return render_report(history_report(workspace, name), folder, stem=f"{name}-history")
