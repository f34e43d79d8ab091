"""The closed-loop report: what happened to a deployed model over time, as one PNG and one HTML file.

Pure rendering from plain data (`LoopReport`); nothing here talks to a store or a server. The picture has four
panels sharing the time axis (seconds since `started_at`): live accuracy per version, traffic split, drift
statistics per feature, and a timeline of which version served when, with vertical markers for loop events
across all panels. The HTML file is self-contained (the PNG is embedded as a data URI, CSS is inline, no JS).

Matplotlib is driven through `Figure` + `FigureCanvasAgg` only, never pyplot's global state, so rendering works
headless and from worker threads.
"""

from __future__ import annotations

import base64
import html
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

try:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend
    from matplotlib.patches import Patch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"the closed-loop report needs matplotlib ({exc}): pip install 'skyloop[monitoring]'") from exc

__all__ = ["LoopReport", "render_report"]

FIGSIZE = (12.0, 11.0)
DPI = 110

# Events worth a vertical line across the panels; every event still appears in the HTML table.
EVENT_COLOURS: dict[str, str] = {
    "drift": "#d62728",
    "retrain": "#9467bd",
    "blessed": "#2ca02c",
    "rejected": "#8c564b",
    "promoted": "#1f77b4",
    "rolled_back": "#ff7f0e",
    "canary": "#17becf",
    "shift": "#7f7f7f",  # the demo's world shifting under the agents
}
_VERSION_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
_FEATURE_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
MAX_LEGEND = 12
"""Versions or features named in one panel's legend at most (the rest are counted): a legend of a hundred
features covered its panel and squeezed the others flat."""


@dataclass
class LoopReport:
    """Plain data for one closed-loop report; times are seconds since `started_at` (unix time)."""

    title: str
    started_at: float
    accuracy: list[tuple[float, str, float]] = field(default_factory=list)
    """(t, version label, live accuracy in [0, 1]) per time window."""
    accuracy_threshold: float | None = None
    """The quality trigger, drawn as a horizontal line on the accuracy panel."""
    traffic: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    """(t, {version label: percent of traffic}) samples; a split holds until the next sample."""
    drift: list[tuple[float, dict[str, float], bool]] = field(default_factory=list)
    """(t, {feature: drift statistic}, dataset drift?) per drift check."""
    drift_threshold: float | None = None
    """Drawn as a horizontal line on the drift panel."""
    drift_statistic: str = "drift statistic"
    """Y-axis label of the drift panel, e.g. "p-value (KS)" or "normed Wasserstein"."""
    events: list[tuple[float, str, str]] = field(default_factory=list)
    """(t, kind, text): deploy history and loop firings, e.g. ("promoted", "iris/2 promoted to 100%")."""
    summary: dict[str, str] = field(default_factory=dict)
    """Key facts shown at the top of the HTML file."""


def render_report(report: LoopReport, folder: Path, stem: str = "report") -> tuple[Path, Path]:
    """Write `folder/stem.png` and `folder/stem.html` for `report` and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = _render_png(report)
    png_path, html_path = folder / f"{stem}.png", folder / f"{stem}.html"
    png_path.write_bytes(png)
    html_path.write_text(_render_html(report, png), encoding="utf-8")
    return png_path, html_path


# ---------------------------------------------------------------- picture


def _versions(report: LoopReport) -> list[str]:
    """Version labels in order of first appearance, so colours are stable across panels."""
    seen: dict[str, None] = {}
    for _, version, _ in sorted(report.accuracy, key=lambda row: row[0]):
        seen.setdefault(version)
    for _, split in sorted(report.traffic, key=lambda row: row[0]):
        for version in split:
            seen.setdefault(version)
    return list(seen)


def _time_range(report: LoopReport) -> tuple[float, float]:
    ts = [row[0] for row in report.accuracy] + [row[0] for row in report.traffic]
    ts += [row[0] for row in report.drift] + [row[0] for row in report.events]
    lo, hi = min([0.0, *ts]), max([0.0, *ts])
    return (lo, hi if hi > lo else lo + 1.0)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="#888888", fontsize=11)


def _text(label: str) -> str:
    """`label` as matplotlib prints it literally: two `$` start mathtext, which misprints a name or raises."""
    return label.replace("$", r"\$")


def _legend(ax: Axes, entries: list[tuple[Artist, str]], *, loc: Literal["best", "lower left"], wide: bool = False,
            newest: bool = False, always: list[tuple[Artist, str]] | None = None) -> None:
    """A legend of `entries` (at most `MAX_LEGEND`, the first or the `newest`, then how many more) and `always`;
    `wide`: up to four columns side by side, else one column, or two past six rows.

    Handles and labels are given, not collected: matplotlib's collection hides labels that start with `_`."""
    shown = entries[-MAX_LEGEND:] if newest else entries[:MAX_LEGEND]
    rows = [(handle, _text(label)) for handle, label in shown]
    if len(entries) > len(shown):
        rows.append((Patch(alpha=0.0), f"... {len(entries) - len(shown)} more"))
    rows += always or []
    if rows:
        ncol = min(4, len(rows)) if wide else 1 if len(rows) <= 6 else 2
        ax.legend([h for h, _ in rows], [t for _, t in rows], loc=loc, fontsize=8, ncol=ncol)


def _render_png(report: LoopReport) -> bytes:
    fig = _figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _figure(report: LoopReport) -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 3, 2]})
    versions = _versions(report)
    colours = {v: _VERSION_COLOURS[i % len(_VERSION_COLOURS)] for i, v in enumerate(versions)}
    t0, t1 = _time_range(report)

    _accuracy_panel(axes[0], report, colours)
    _traffic_panel(axes[1], report, versions, colours, t1)
    _drift_panel(axes[2], report)
    _timeline_panel(axes[3], report, versions, colours, t1)
    _event_markers(list(axes), report, versions)

    axes[0].set_xlim(t0, t1)
    axes[3].set_xlabel("time since start (s)")
    fig.suptitle(_text(report.title), fontsize=14, fontweight="bold")
    fig.tight_layout()
    return fig


def _accuracy_panel(ax: Axes, report: LoopReport, colours: dict[str, str]) -> None:
    ax.set_title("Live accuracy per version", loc="left", fontsize=10)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.05)
    ax.grid(alpha=0.3)
    if not report.accuracy:
        _empty(ax, "no accuracy windows yet")
    entries: list[tuple[Artist, str]] = []
    for version, colour in colours.items():
        rows = sorted((t, acc) for t, v, acc in report.accuracy if v == version)
        if rows:
            line, = ax.plot([t for t, _ in rows], [a for _, a in rows], marker="o", ms=3, color=colour)
            entries.append((line, version))
    always: list[tuple[Artist, str]] = []
    if report.accuracy_threshold is not None:
        always.append((ax.axhline(report.accuracy_threshold, color="#d62728", ls="--", lw=1), "quality trigger"))
    _legend(ax, entries, loc="lower left", newest=True, always=always)


def _traffic_panel(ax: Axes, report: LoopReport, versions: list[str], colours: dict[str, str], end: float) -> None:
    ax.set_title("Traffic split", loc="left", fontsize=10)
    ax.set_ylabel("% of traffic")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    samples = sorted(report.traffic, key=lambda row: row[0])
    if not samples:
        _empty(ax, "no traffic samples yet")
        return
    # A split holds until the next sample: duplicate each change point so the areas step, not slope.
    ts: list[float] = []
    rows: list[list[float]] = []
    for i, (t, split) in enumerate(samples):
        if i:
            ts.append(t)
            rows.append(rows[-1])
        ts.append(t)
        rows.append([split.get(v, 0.0) for v in versions])
    if end > ts[-1]:
        ts.append(end)
        rows.append(rows[-1])
    values = np.asarray(rows, dtype=float).T
    areas = ax.stackplot(ts, values, colors=[colours[v] for v in versions], alpha=0.8)
    _legend(ax, list(zip(areas, versions, strict=True)), loc="lower left", newest=True)


def _drift_panel(ax: Axes, report: LoopReport) -> None:
    ax.set_title("Drift per feature", loc="left", fontsize=10)
    ax.set_ylabel(_text(report.drift_statistic))
    ax.grid(alpha=0.3)
    checks = sorted(report.drift, key=lambda row: row[0])
    if not checks:
        _empty(ax, "no drift checks yet")
    features = list(dict.fromkeys(f for _, stats, _ in checks for f in stats))
    entries: list[tuple[Artist, str]] = []
    for i, feature in enumerate(features):
        points = [(t, stats[feature]) for t, stats, _ in checks if feature in stats]
        colour = _FEATURE_COLOURS[i % len(_FEATURE_COLOURS)]
        line, = ax.plot([t for t, _ in points], [s for _, s in points], marker=".", color=colour)
        entries.append((line, feature))
    always: list[tuple[Artist, str]] = []
    drifted = [t for t, _, flag in checks if flag]
    if drifted:
        gaps = np.diff([t for t, _, _ in checks])
        half = float(np.median(gaps)) / 2 if len(gaps) else 1.0
        for t in drifted:
            ax.axvspan(t - half, t + half, color="#d62728", alpha=0.12, lw=0)
        always.append((ax.plot([], [], color="#d62728", alpha=0.3, lw=8)[0], "dataset drift"))
    if report.drift_threshold is not None:
        always.append((ax.axhline(report.drift_threshold, color="#333333", ls="--", lw=1), "threshold"))
    _legend(ax, entries, loc="best", wide=True, always=always)


def _timeline_panel(ax: Axes, report: LoopReport, versions: list[str], colours: dict[str, str], end: float) -> None:
    ax.set_title("Which version served when (bars: >0% traffic)", loc="left", fontsize=10)
    samples = sorted(report.traffic, key=lambda row: row[0])
    served = [v for v in versions if any(split.get(v, 0.0) > 0 for _, split in samples)]
    if not served:
        _empty(ax, "no versions served yet")
        ax.set_yticks([])
        return
    for row, version in enumerate(served):
        spans: list[tuple[float, float]] = []
        for i, (t, split) in enumerate(samples):
            if split.get(version, 0.0) > 0:
                stop = samples[i + 1][0] if i + 1 < len(samples) else end
                spans.append((t, max(stop - t, 0.0)))
        ax.broken_barh(spans, (row - 0.35, 0.7), facecolors=colours[version], alpha=0.85)
    ax.set_yticks(range(len(served)), [_text(v) for v in served])
    ax.set_ylim(len(served) - 0.5, -1.5)  # versions top-down, with a lane above for event labels
    ax.grid(axis="x", alpha=0.3)


def _named_version(text: str, versions: list[str]) -> str:
    """The version an event's text names first, matched whole (`iris/1` is not in "iris/10 promoted")."""
    found = [(m.start(), v) for v in versions
             if (m := re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w/.-])", text)) is not None]
    return min(found)[1] if found else ""


def _event_markers(axes: list[Axes], report: LoopReport, versions: list[str]) -> None:
    """Vertical lines across all panels for important events, short labels in the timeline's top lane."""
    marked = sorted((e for e in report.events if e[1] in EVENT_COLOURS), key=lambda e: e[0])
    timeline = axes[-1]
    for i, (t, kind, text) in enumerate(marked):
        colour = EVENT_COLOURS[kind]
        for ax in axes:
            ax.axvline(t, color=colour, ls=":", lw=1.2, alpha=0.9)
        version = _named_version(text, versions)
        label = _text(f"{kind} {version}".strip())
        # Stagger labels over three heights so neighbouring events do not print on top of each other.
        timeline.annotate(
            label,
            xy=(t, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -10 - 10 * (i % 3)),
            textcoords="offset points",
            fontsize=7,
            color=colour,
            clip_on=True,
        )
    kinds = list(dict.fromkeys(kind for _, kind, _ in marked))
    if kinds:
        # On the accuracy panel: its lower right is usually empty, while the timeline's bars fill the width.
        handles = [Patch(color=EVENT_COLOURS[k], label=k) for k in kinds]
        legend = Legend(axes[0], handles, kinds, loc="lower right", fontsize=7, ncol=len(kinds), title="events")
        axes[0].add_artist(legend)  # a second legend: `ax.legend()` would replace the versions' one


# ---------------------------------------------------------------- page

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1400px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
p.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def _render_html(report: LoopReport, png: bytes) -> str:
    esc = html.escape
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.started_at))
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in report.summary.items())
    events = "".join(
        f'<tr><td class="num">{t:.1f}</td><td>{esc(kind)}</td><td>{esc(text)}</td></tr>'
        for t, kind, text in sorted(report.events, key=lambda e: e[0])
    )
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(report.title)}</h1>",
        f'<p class="sub">t = 0 at {esc(start)}</p>',
        f'<table class="summary">{summary}</table>' if summary else "",
        f'<img src="{data_uri}" alt="{esc(report.title)}: accuracy, traffic, drift and serving timeline">',
        "<h2>Events</h2>",
        f'<table class="events"><tr><th>t (s)</th><th>kind</th><th>text</th></tr>{events}</table>'
        if events
        else "<p>No events.</p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
