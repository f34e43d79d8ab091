"""The closed-loop report: PNG and self-contained HTML from plain data."""

from __future__ import annotations

import base64
import html
import re
import struct
import threading
from pathlib import Path

import pytest
from matplotlib.cbook import is_math_text

from skyloop.monitoring.report import DPI, FIGSIZE, MAX_LEGEND, LoopReport, _figure, _named_version, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_report() -> LoopReport:
    """Two versions: iris/1 drifts and decays, iris/2 is retrained, canaried at 10% and promoted."""
    accuracy: list[tuple[float, str, float]] = []
    traffic: list[tuple[float, dict[str, float]]] = []
    drift: list[tuple[float, dict[str, float], bool]] = []
    for step in range(20):
        t = step * 30.0
        split = {"iris/1": 100.0} if t < 300 else {"iris/1": 90.0, "iris/2": 10.0} if t < 420 else {"iris/2": 100.0}
        traffic.append((t, split))
        if split.get("iris/1", 0.0) > 0:
            accuracy.append((t, "iris/1", 0.96 if t < 150 else 0.61))
        if split.get("iris/2", 0.0) > 0:
            accuracy.append((t, "iris/2", 0.95))
        drifted = 150 <= t < 420
        p = 0.001 if drifted else 0.6
        stats = {"sepal_length": p, "sepal_width": 0.7, "petal_length": p / 2, "petal_width": min(1.0, p * 1.5)}
        drift.append((t, stats, drifted))
    events = [
        (0.0, "promoted", "iris/1 promoted to 100%"),
        (180.0, "drift", "trigger fired: dataset drift 3/4 features"),
        (200.0, "retrain", "retraining pipeline run 7 started"),
        (280.0, "blessed", "iris/2 blessed: accuracy 0.95 >= 0.90"),
        (300.0, "canary", "iris/2 canary at 10%"),
        (350.0, "note", "operator says <script>alert('x')</script> & more"),
        (420.0, "promoted", "iris/2 promoted to 100%"),
    ]
    return LoopReport(
        title="iris closed loop <demo>",
        started_at=1_700_000_000.0,
        accuracy=accuracy,
        accuracy_threshold=0.8,
        traffic=traffic,
        drift=drift,
        drift_threshold=0.05,
        drift_statistic="p-value (KS)",
        events=events,
        summary={"final model": "iris/2", "accuracy before/after": "0.61 -> 0.95", "loop firings": "1"},
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which always comes first."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Render the synthetic report once (about a second) and share it: (folder, png, html)."""
    folder = tmp_path_factory.mktemp("report") / "out"
    return (folder, *render_report(synthetic_report(), folder, stem="loop"))


def test_renders_png_and_self_contained_html(rendered: tuple[Path, Path, Path]) -> None:
    report = synthetic_report()
    folder, png_path, html_path = rendered

    assert (png_path, html_path) == (folder / "loop.png", folder / "loop.html")
    png = png_path.read_bytes()
    width, height = png_size(png)
    assert width == pytest.approx(FIGSIZE[0] * DPI, rel=0.02)
    assert height == pytest.approx(FIGSIZE[1] * DPI, rel=0.02)

    page = html_path.read_text(encoding="utf-8")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    assert base64.b64decode(match.group(1)) == png
    for _, kind, text in report.events:
        assert html.escape(text) in page
        assert f"<td>{html.escape(kind)}</td>" in page
    for key, value in report.summary.items():
        assert html.escape(key) in page and html.escape(value) in page
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert html.escape(report.title) in page
    # Self-contained: nothing fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_png_decodes_with_matplotlib(rendered: tuple[Path, Path, Path]) -> None:
    from matplotlib import image

    png_path = rendered[1]
    pixels = image.imread(str(png_path))
    width, height = png_size(png_path.read_bytes())
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something was drawn, not a blank canvas


@pytest.mark.parametrize(
    "report",
    [
        LoopReport(title="nothing yet", started_at=0.0),
        LoopReport(
            title="only traffic",
            started_at=0.0,
            traffic=[(0.0, {"m/1": 100.0})],
            drift_statistic="normed Wasserstein",
            events=[(0.0, "canary", "m/1 canary")],
        ),
        LoopReport(
            title="zero traffic, one drift check",
            started_at=0.0,
            traffic=[(5.0, {"m/1": 0.0})],
            drift=[(5.0, {"x": 0.3}, True)],
            drift_threshold=0.1,
        ),
    ],
    ids=["empty", "single-sample", "zero-traffic"],
)
def test_sparse_inputs_render(tmp_path: Path, report: LoopReport) -> None:
    png_path, html_path = render_report(report, tmp_path)
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    assert "data:image/png;base64," in html_path.read_text(encoding="utf-8")


def test_renders_repeatably_from_threads(tmp_path: Path, rendered: tuple[Path, Path, Path]) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            render_report(synthetic_report(), tmp_path, stem=f"r{i}")
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    # Same data, same picture: the same dimensions and (near enough) the same compressed size.
    reference = rendered[1].read_bytes()
    for i in range(2):
        data = (tmp_path / f"r{i}.png").read_bytes()
        assert png_size(data) == png_size(reference)
        assert abs(len(data) - len(reference)) <= 0.01 * len(reference)


@pytest.mark.parametrize(("text", "version"), [
    ("iris/10 promoted to 100%", "iris/10"),
    ("champion moved to models:/iris/1", "iris/1"),
    ("spec version 2: iris/2 as a canary against iris/1", "iris/2"),
    ("rolled back", ""),
])
def test_an_event_label_names_the_version_its_text_names_whole(text: str, version: str) -> None:
    assert _named_version(text, ["iris/1", "iris/2", "iris/10"]) == version


def _legend_texts(report: LoopReport, panel: int) -> list[str]:
    legend = _figure(report).axes[panel].get_legend()
    assert legend is not None
    return [text.get_text() for text in legend.get_texts()]


def test_names_are_printed_as_given_not_as_mathtext_nor_hidden(tmp_path: Path) -> None:
    # Two `$` made matplotlib parse a name as mathtext (bad math raised, so no report at all), and a legend
    # label that starts with `_` was left out of the legend.
    odd = ["cost $x^$", "_id", "$\\foo$"]
    report = LoopReport(
        title="model $\\alpha$", started_at=0.0,
        accuracy=[(1.0, "m/$x^$", 0.9), (2.0, "_m/2", 0.8)],
        traffic=[(1.0, {"m/$x^$": 100.0}), (2.0, {"m/$x^$": 50.0, "_m/2": 50.0})],
        drift=[(1.0, dict.fromkeys(odd, 0.2), False), (2.0, dict.fromkeys(odd, 0.01), True)],
        drift_statistic="p-value ($)",
        events=[(2.0, "promoted", "m/$x^$ promoted")],
    )
    png_path, html_path = render_report(report, tmp_path)
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    assert html.escape("model $\\alpha$") in html_path.read_text(encoding="utf-8")

    def shown(texts: list[str]) -> list[str]:
        assert not any(is_math_text(t) for t in texts)
        return [t.replace("\\$", "$") for t in texts]

    assert shown(_legend_texts(report, 0)) == ["m/$x^$", "_m/2"]
    assert shown(_legend_texts(report, 1)) == ["m/$x^$", "_m/2"]
    assert shown(_legend_texts(report, 2)) == [*odd, "dataset drift"]


def test_legends_of_many_features_and_versions_stay_short(tmp_path: Path) -> None:
    # A hundred features once made a legend taller than the figure: tight_layout gave up (a warning) and the
    # other panels were squeezed flat.
    features = {f"f{i}": i / 100 for i in range(100)}
    versions = [f"m/{i}" for i in range(30)]
    report = LoopReport(
        title="many", started_at=0.0,
        accuracy=[(float(t), versions[t], 0.9) for t in range(30)],
        traffic=[(float(t), {versions[t]: 100.0}) for t in range(30)],
        drift=[(float(t), features, t % 2 == 0) for t in range(30)],
        drift_threshold=0.5,
    )
    render_report(report, tmp_path)  # pytest turns the warning into an error
    assert _legend_texts(report, 2) == [*list(features)[:MAX_LEGEND], "... 88 more", "dataset drift", "threshold"]
    newest = versions[-MAX_LEGEND:]  # the versions that served last are the ones worth naming
    assert _legend_texts(report, 0) == [*newest, "... 18 more"]
    assert _legend_texts(report, 1) == [*newest, "... 18 more"]
