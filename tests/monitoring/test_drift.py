"""Data drift: Evidently's default tests, per-feature overrides and the dataset-drift rule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy import stats
from scipy.spatial import distance

from skyloop.errors import SpecError
from skyloop.monitoring.drift import DriftSpec, FeatureDrift, FeatureDriftSpec, FeatureTest, detect_drift


def _numeric(seed: int, n: int, shift: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame({"x": np.random.default_rng(seed).normal(shift, 1.0, n)})


def _categorical(seed: int, n: int, probs: list[float]) -> pd.DataFrame:
    cats = ["a", "b", "c", "d"][: len(probs)]
    return pd.DataFrame({"x": np.random.default_rng(seed).choice(cats, size=n, p=probs)})


def _only(ref: pd.DataFrame, cur: pd.DataFrame, spec: DriftSpec | None = None) -> FeatureDrift:
    report = detect_drift(ref, cur, spec)
    assert len(report.features) == 1
    return report.features[0]


SAME: list[tuple[str, Any, Any]] = [
    ("ks", lambda: _numeric(1, 300), lambda: _numeric(2, 300)),
    ("wasserstein", lambda: _numeric(1, 2_000), lambda: _numeric(2, 2_000)),
    ("chisquare", lambda: _categorical(1, 500, [0.5, 0.3, 0.2]), lambda: _categorical(2, 300, [0.5, 0.3, 0.2])),
    ("z", lambda: _categorical(1, 500, [0.7, 0.3]), lambda: _categorical(2, 300, [0.7, 0.3])),
    ("jensenshannon", lambda: _categorical(1, 2_000, [0.5, 0.3, 0.2]),
     lambda: _categorical(2, 1_500, [0.5, 0.3, 0.2])),
]


@pytest.mark.parametrize(("test", "ref", "cur"), SAME, ids=[s[0] for s in SAME])
def test_same_distribution_does_not_drift(test: str, ref: Any, cur: Any) -> None:
    result = _only(ref(), cur())
    assert result.test == test
    assert not result.drifted


SHIFTED: list[tuple[str, Any, Any]] = [
    ("ks", lambda: _numeric(1, 300), lambda: _numeric(2, 300, shift=1.0)),
    ("wasserstein", lambda: _numeric(1, 2_000), lambda: _numeric(2, 2_000, shift=1.0)),
    ("chisquare", lambda: _categorical(1, 500, [0.5, 0.3, 0.2]), lambda: _categorical(2, 300, [0.2, 0.3, 0.5])),
    ("z", lambda: _categorical(1, 500, [0.7, 0.3]), lambda: _categorical(2, 300, [0.5, 0.5])),
    ("jensenshannon", lambda: _categorical(1, 2_000, [0.5, 0.3, 0.2]),
     lambda: _categorical(2, 1_500, [0.2, 0.3, 0.5])),
]


@pytest.mark.parametrize(("test", "ref", "cur"), SHIFTED, ids=[s[0] for s in SHIFTED])
def test_changed_distribution_drifts(test: str, ref: Any, cur: Any) -> None:
    result = _only(ref(), cur())
    assert result.test == test
    assert result.drifted


def test_kinds_are_detected() -> None:
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"few": rng.integers(0, 3, 200), "many": rng.normal(size=200),
                        "flag": rng.integers(0, 2, 200).astype(bool), "text": rng.choice(["u", "v", "w"], 200)})
    report = detect_drift(ref, ref.copy())
    kinds = {f.feature: (f.kind, f.test) for f in report.features}
    assert kinds == {"few": ("categorical", "chisquare"), "many": ("numeric", "ks"),
                     "flag": ("categorical", "z"), "text": ("categorical", "chisquare")}
    assert [f.feature for f in report.features] == ["few", "many", "flag", "text"]  # reference order


def _frames(n_drifted: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(7)
    ref = pd.DataFrame({f"f{i}": rng.normal(size=300) for i in range(4)})
    cur = pd.DataFrame({f"f{i}": rng.normal(2.0 if i < n_drifted else 0.0, 1.0, 300) for i in range(4)})
    return ref, cur


@pytest.mark.parametrize(("n_drifted", "dataset_drift"), [(2, True), (1, False)])
def test_dataset_drift_needs_the_share(n_drifted: int, dataset_drift: bool) -> None:
    report = detect_drift(*_frames(n_drifted), DriftSpec(share=0.5))
    assert report.drifted == n_drifted
    assert report.share == n_drifted / 4
    assert report.dataset_drift is dataset_drift
    assert report.enough_data


def test_overrides_change_test_and_threshold() -> None:
    ref, cur = _numeric(1, 300), _numeric(2, 300, shift=0.3)
    default = _only(ref, cur)
    assert (default.test, default.threshold) == ("ks", 0.05)
    wasserstein = _only(ref, cur, DriftSpec(features={"x": FeatureDriftSpec(test=FeatureTest.WASSERSTEIN)}))
    assert (wasserstein.test, wasserstein.threshold, wasserstein.p_value) == ("wasserstein", 0.1, None)
    lenient = _only(ref, cur, DriftSpec(features={"x": FeatureDriftSpec(test=FeatureTest.KS, threshold=1e-12)}))
    assert lenient.p_value == default.p_value
    assert default.drifted and not lenient.drifted
    categorical = _only(ref.round(), cur.round(), DriftSpec(features={"x": FeatureDriftSpec(kind="categorical")}))
    assert (categorical.kind, categorical.test) == ("categorical", "chisquare")


def test_kind_and_test_must_agree() -> None:
    with pytest.raises(ValidationError, match="numeric"):
        FeatureDriftSpec(kind="categorical", test=FeatureTest.KS)


def test_ignored_features_are_skipped() -> None:
    ref, cur = _frames(2)
    report = detect_drift(ref, cur.drop(columns=["f0"]), DriftSpec(ignore=["f0", "f1"]))
    assert [f.feature for f in report.features] == ["f2", "f3"]
    assert report.drifted == 0 and not report.dataset_drift


def test_too_few_current_rows_is_not_enough_data() -> None:
    ref, cur = _frames(4)
    report = detect_drift(ref, cur.head(29))
    assert not report.enough_data and not report.dataset_drift
    assert report.features == [] and report.current_rows == 29


def test_missing_feature_is_a_spec_error() -> None:
    ref, cur = _frames(0)
    with pytest.raises(SpecError, match="f1, f3"):
        detect_drift(ref, cur.drop(columns=["f1", "f3"]))


def test_overrides_for_unknown_features_are_a_spec_error() -> None:
    ref, cur = _frames(0)
    with pytest.raises(SpecError, match="typo"):
        detect_drift(ref, cur, DriftSpec(features={"typo": FeatureDriftSpec()}))


def test_non_numeric_values_for_a_numeric_test_is_a_spec_error() -> None:
    ref = pd.DataFrame({"x": ["a", "b"] * 20})
    with pytest.raises(SpecError, match="'x'"):
        detect_drift(ref, ref, DriftSpec(features={"x": FeatureDriftSpec(test=FeatureTest.KS)}))


@pytest.mark.parametrize("values", [[[1, 2], [3]], [{"a": 1}, {"b": 2}], [np.arange(2), np.arange(3)]],
                         ids=["lists", "dicts", "arrays"])
def test_values_that_are_no_category_are_a_spec_error(values: list[Any]) -> None:
    frame = pd.DataFrame({"n": np.arange(40.0), "v": values * 20})
    with pytest.raises(SpecError, match="feature 'v': its values cannot be counted as categories"):
        detect_drift(frame, frame)


@pytest.mark.parametrize("columns", [["x", "x"], [0, "0"]])
def test_a_feature_with_two_columns_is_a_spec_error(columns: list[Any]) -> None:
    # Was an AttributeError: a frame's `[name]` of a name given twice is a frame, not a column.
    two = pd.DataFrame(np.random.default_rng(0).normal(size=(100, 2)), columns=columns)
    one = two.iloc[:, :1]
    for ref, cur, what in ((two, one, "the reference"), (one, two, "current data")):
        with pytest.raises(SpecError, match=f"{what} has more than one column named '(x|0)'"):
            detect_drift(ref, cur)


def test_statistics_are_scipys() -> None:
    x = np.array([0.1, 0.5, 0.9, 1.3, 2.0, 2.2, 3.1, 3.3, 4.0, 5.5])
    y = x + 0.7
    ks = _only(pd.DataFrame({"x": x}), pd.DataFrame({"x": y}), DriftSpec(min_rows=1))
    expected = stats.ks_2samp(x, y)
    assert (ks.statistic, ks.p_value) == (float(expected.statistic), float(expected.pvalue))
    spec = DriftSpec(min_rows=1, features={"x": FeatureDriftSpec(test=FeatureTest.WASSERSTEIN)})
    w = _only(pd.DataFrame({"x": x}), pd.DataFrame({"x": y}), spec)
    assert w.statistic == pytest.approx(stats.wasserstein_distance(x, y) / np.std(x))

    ref = pd.DataFrame({"c": ["a"] * 5 + ["b"] * 3 + ["c"] * 2})
    cur = pd.DataFrame({"c": ["a"] * 2 + ["b"] * 3 + ["c"] * 5})
    chi = _only(ref, cur, DriftSpec(min_rows=1))
    expected = stats.chi2_contingency([[5, 3, 2], [2, 3, 5]], correction=False)
    assert (chi.statistic, chi.p_value) == pytest.approx((expected.statistic, expected.pvalue))
    spec = DriftSpec(min_rows=1, features={"c": FeatureDriftSpec(test=FeatureTest.JENSENSHANNON)})
    js = _only(ref, cur, spec)
    assert js.statistic == pytest.approx(distance.jensenshannon([0.5, 0.3, 0.2], [0.2, 0.3, 0.5]))


def test_z_statistic() -> None:
    ref = pd.DataFrame({"b": ["y"] * 60 + ["n"] * 40})
    cur = pd.DataFrame({"b": ["y"] * 40 + ["n"] * 60})
    z = _only(ref, cur)
    pooled = 0.5
    expected = (0.4 - 0.6) / math.sqrt(pooled * (1 - pooled) * (1 / 100 + 1 / 100))
    assert z.test == "z"
    assert z.statistic == pytest.approx(expected)
    assert z.p_value == pytest.approx(2 * stats.norm.sf(abs(expected)))


def test_chi_squared_p_values_hold_their_level_when_nothing_changed() -> None:
    # Reference and current both drawn from one distribution: p < 0.05 about 5% of the time. Testing current
    # counts against the reference's shares as if exact (Evidently's form) flagged 30% at 300 rows each, 62%
    # with a 100-row reference.
    probs = [0.4, 0.3, 0.2, 0.1]
    for ref_rows, rate in ((300, 0.1), (100, 0.1)):
        flags = [_only(_categorical(seed, ref_rows, probs), _categorical(10_000 + seed, 300, probs)).drifted
                 for seed in range(200)]
        assert sum(flags) / len(flags) <= rate, ref_rows
    # A real move is still found, and on two categories chi-squared says what the z-test says.
    assert _only(_categorical(1, 300, probs), _categorical(2, 300, [0.25, 0.25, 0.25, 0.25])).drifted
    ref, cur = _categorical(1, 300, [0.7, 0.3]), _categorical(2, 300, [0.6, 0.4])
    z, chi = _only(ref, cur), _only(ref, cur, DriftSpec(features={"x": FeatureDriftSpec(test=FeatureTest.CHISQUARE)}))
    assert chi.p_value == pytest.approx(z.p_value) and chi.statistic == pytest.approx(z.statistic**2)


def test_categories_unseen_in_the_reference() -> None:
    ref = _categorical(1, 500, [0.5, 0.3, 0.2])
    stray = pd.concat([_categorical(2, 299, [0.5, 0.3, 0.2]), pd.DataFrame({"x": ["new"]})], ignore_index=True)
    one = _only(ref, stray)  # one stray value is no drift (a zero expectation would make it infinite)
    assert math.isfinite(one.statistic) and not one.drifted
    many = pd.concat([_categorical(2, 270, [0.5, 0.3, 0.2]), pd.DataFrame({"x": ["new"] * 30})], ignore_index=True)
    assert _only(ref, many).drifted


def test_nans_are_dropped_and_an_absent_feature_drifts() -> None:
    ref = _numeric(1, 300)
    cur = _numeric(2, 300)
    cur.loc[::3, "x"] = np.nan
    assert not _only(ref, cur).drifted
    gone = _only(ref, pd.DataFrame({"x": [np.nan] * 300}))
    assert gone.drifted and math.isnan(gone.statistic)


@pytest.mark.parametrize(("rows", "test"), [(2_000, "wasserstein"), (300, "ks")])
@pytest.mark.parametrize("dtype", ["float64", "Float64", "object"])
def test_infinities_are_dropped_like_missing_values(rows: int, test: str, dtype: str) -> None:
    def with_inf(frame: pd.DataFrame) -> pd.DataFrame:
        values = frame["x"].astype(object)
        values.iloc[0], values.iloc[1] = np.inf, -np.inf
        return pd.DataFrame({"x": values.astype(dtype)})

    ref, same, shifted = _numeric(1, rows), _numeric(2, rows), _numeric(3, rows, shift=5.0)
    kinds = DriftSpec(features={"x": FeatureDriftSpec(kind="numeric")})
    moved = _only(with_inf(ref), with_inf(shifted), kinds)  # one inf once made the statistic NaN: no drift
    assert moved.test == test and math.isfinite(moved.statistic) and moved.drifted
    assert moved.statistic == _only(ref.iloc[2:], shifted.iloc[2:], kinds).statistic
    still = _only(with_inf(ref), with_inf(same), kinds)
    assert math.isfinite(still.statistic) and not still.drifted


def test_a_reference_of_infinities_only_has_no_values() -> None:
    with pytest.raises(SpecError, match="has no values in the reference"):
        detect_drift(pd.DataFrame({"x": [np.inf, -np.inf] * 50}), _numeric(1, 100))


def test_to_dict_round_trips_through_orjson() -> None:
    ref = pd.DataFrame({"n": np.random.default_rng(0).normal(size=100), "c": ["p", "q"] * 50})
    cur = ref.copy()
    cur["gone"] = 1
    ref["gone"] = np.arange(100)
    cur["gone"] = np.nan
    data = detect_drift(ref, cur).to_dict()
    assert orjson.loads(orjson.dumps(data)) == data
    assert data["features"][2]["statistic"] is None
    assert type(data["share"]) is float and type(data["dataset_drift"]) is bool


@pytest.mark.parametrize("rows", [30, 100, 300])
def test_a_small_window_against_a_large_reference_holds_the_false_alarm_level(rows: int) -> None:
    # Before, the normed Wasserstein distance (chosen by the reference's size alone) flagged 99% of 30-row and
    # 69% of 100-row windows of the reference's own distribution; the KS test holds its 5%.
    rng = np.random.default_rng(rows)
    reference = pd.DataFrame({"x": rng.normal(size=5_000)})
    flagged = [_only(reference, pd.DataFrame({"x": rng.normal(size=rows)}), DriftSpec(min_rows=1))
               for _ in range(200)]
    assert {f.test for f in flagged} == {"ks"}
    assert sum(f.drifted for f in flagged) <= 20  # 5% expected: 10 of 200


def test_both_samples_large_use_the_distance() -> None:
    assert _only(_numeric(1, 2_000), _numeric(2, 1_001)).test == "wasserstein"
    assert _only(_numeric(1, 2_000), _numeric(2, 1_000)).test == "ks"
    assert _only(_numeric(1, 1_000), _numeric(2, 2_000)).test == "ks"


def test_the_test_is_chosen_by_the_values_present_not_the_rows() -> None:
    # A feature present in 2% of the rows: ~100 reference values and ~40 current ones, from one distribution.
    # Chosen by the frames' row counts (5,000 and 2,000), the normed Wasserstein distance flagged every window.
    rng = np.random.default_rng(3)

    def sparse(n: int) -> pd.DataFrame:
        values = rng.normal(size=n)
        values[rng.random(n) > 0.02] = np.nan
        return pd.DataFrame({"x": values})

    reference = sparse(5_000)
    flagged = [_only(reference, sparse(2_000)) for _ in range(100)]
    assert {f.test for f in flagged} == {"ks"}
    assert sum(f.drifted for f in flagged) <= 12  # 5% expected
    assert _only(_numeric(1, 2_000), _numeric(2, 2_000)).test == "wasserstein"  # full columns: still the distance


@pytest.mark.parametrize(("given", "message"), [
    ({"threshold": 0.01}, r"threshold 0.01 needs a test.*\{test: ks, threshold: 0.01\}"),
    ({"kind": "numeric", "threshold": 0.01}, "threshold 0.01 needs a test"),
    ({"test": "ks", "threshold": 5}, r"threshold 5 is a p-value for test 'ks'.*between 0 and 1"),
    ({"test": "chisquare", "threshold": 1}, "threshold 1 is a p-value for test 'chisquare'"),
    ({"test": "z", "threshold": 0}, "greater than 0"),
])
def test_a_threshold_must_say_what_it_bounds(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FeatureDriftSpec.model_validate(given)


@pytest.mark.parametrize("given", [{"test": "ks", "threshold": 0.01}, {"test": "wasserstein", "threshold": 2.5},
                                   {"test": "jensenshannon", "threshold": 0.3}, {"kind": "numeric"}])
def test_thresholds_with_their_test_are_accepted(given: dict[str, Any]) -> None:
    assert FeatureDriftSpec.model_validate(given).threshold == given.get("threshold")


def test_the_dataset_verdict_is_corrected_for_the_features_tested_and_each_feature_is_not() -> None:
    # x's p-value is about 0.03: drift on its own, not once two features share the 5% (Holm: 0.03 >= 0.05 / 2).
    rng = np.random.default_rng(6)
    ref = pd.DataFrame({"x": rng.normal(size=300), "y": rng.normal(size=300)})
    cur = pd.DataFrame({"x": rng.normal(0.18, 1.0, 300), "y": rng.normal(size=300)})
    report = detect_drift(ref, cur)
    x, y = report.features
    assert 0.025 <= x.p_value < 0.05 and x.drifted and not y.drifted  # type: ignore[operator]
    assert report.drifted == 1 and report.share == 0.0 and not report.dataset_drift
    strong = cur.assign(x=rng.normal(1.0, 1.0, 300))
    assert detect_drift(ref, strong).dataset_drift  # a real move is still found


def test_dataset_drift_holds_its_false_alarm_level_with_two_features() -> None:
    # Windows of unchanged data: one of two features drifting (p < 0.05 each) was dataset drift in ~10% of them.
    rng = np.random.default_rng(2)
    reference = pd.DataFrame({"a": rng.normal(size=5_000), "b": rng.normal(size=5_000)})
    reports = [detect_drift(reference, pd.DataFrame({"a": rng.normal(size=600), "b": rng.normal(size=600)}))
               for _ in range(300)]
    alarms = sum(r.dataset_drift for r in reports)
    # 5% family-wise over references; this one reference gives 21 (the uncorrected rule: 38).
    assert alarms <= 28, alarms
    assert sum(r.drifted > 0 for r in reports) > alarms  # each feature's own verdict is not corrected


def test_a_float32_reference_matches_the_floats_a_client_sends() -> None:
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"x": rng.choice([0.1, 0.2, 0.3], 800).astype(np.float32)})
    cur = pd.DataFrame({"x": rng.choice([0.1, 0.2, 0.3], 300)})  # float64, as JSON parses them
    result = _only(ref, cur)
    assert result.test == "chisquare" and not result.drifted and result.unseen == 0.0
    moved = pd.DataFrame({"x": rng.choice([0.1, 0.2, 0.3], 300, p=[0.1, 0.1, 0.8])})
    assert _only(ref, moved).drifted


def test_mostly_unique_categories_are_not_testable_and_report_what_is_unseen() -> None:
    # All counts 1: chi-squared is N on N - 1 degrees of freedom, p ~ 0.5 however disjoint the samples.
    dates = pd.DataFrame({"d": pd.date_range("2020", periods=200)})
    later = pd.DataFrame({"d": pd.date_range("2021", periods=50)})
    result = _only(dates, later)
    assert not result.testable and not result.drifted and result.p_value is None and result.unseen == 1.0
    report = detect_drift(dates.assign(x=_numeric(1, 200)["x"]), later.assign(x=_numeric(2, 50)["x"]))
    assert report.share == 0.0 and not report.dataset_drift  # counted on neither side of the dataset's verdict
    # Zip-code-like: a few common values and a long tail of rare ones; the tail is merged, and a move is found.
    rng = np.random.default_rng(0)
    common, tail = ["a", "b", "c"], [f"z{i}" for i in range(400)]
    ref = pd.DataFrame({"z": [*rng.choice(common, 300), *rng.choice(tail, 200)]})
    same = pd.DataFrame({"z": [*rng.choice(common, 180), *rng.choice(tail, 120)]})
    moved = pd.DataFrame({"z": [*rng.choice(common, 60), *[f"new{i}" for i in range(240)]]})
    assert _only(ref, same).testable and not _only(ref, same).drifted
    shifted = _only(ref, moved)
    assert shifted.testable and shifted.drifted and shifted.unseen == pytest.approx(0.8)


def test_a_deployment_spec_with_a_threshold_and_no_test_names_the_field_and_the_fix() -> None:
    from skyloop.deploy.spec import load_deployment_spec

    doc = {"name": "d", "predictors": [{"name": "a", "model_uri": "models:/m/1", "traffic": 100}],
           "loop": {"drift": {"tests": {"features": {"x0": {"threshold": 0.01}}}}}}
    with pytest.raises(SpecError, match=r"loop\.drift\.tests\.features\.x0: threshold 0\.01 needs a test"):
        load_deployment_spec(doc)
    doc["loop"]["drift"]["tests"]["features"]["x0"] = {"test": "ks", "threshold": 0.01}
    assert load_deployment_spec(doc).loop is not None
