"""Data drift between a reference frame and current traffic, per feature, with Evidently's default tests.

The test for a feature follows Evidently's `DataDriftPreset` unless the spec names one, but by the size of the
smaller sample of the feature's present values (missing ones dropped) rather than the reference's rows alone:

============  ======================================  ==================================
kind          either sample <= 1,000 values           both samples > 1,000 values
============  ======================================  ==================================
numeric       Kolmogorov-Smirnov, drift if p < 0.05   normed Wasserstein, drift if >= 0.1
categorical   chi-squared, drift if p < 0.05          Jensen-Shannon, drift if >= 0.1
binary        two-proportion z-test, drift if p<0.05  Jensen-Shannon, drift if >= 0.1
============  ======================================  ==================================

A column is numeric when its reference dtype is numeric (not bool) with more than 5 distinct values.
Distances measure a window's own sampling noise too: against a reference of thousands of rows, a normed
Wasserstein distance over 0.1 came from 99% of 30-row and 69% of 100-row windows drawn from the reference's own
distribution (Evidently chooses by the reference's size alone). The p-value tests hold their 5% at any window
size, and distances are used where both samples are large enough for their noise to stay below the thresholds
(0.3% of 1,000-row windows).
Chi-squared is the two-sample test (of homogeneity, on the reference and current counts per category), where
Evidently tests the current counts against the reference's shares as if those were exact: with references of a
few hundred rows that flags drift in 30-90% of windows drawn from the reference's own distribution.
Where more than 20% of that table's cells expect fewer than 5 values (Cochran's rule, mostly-unique values such as
ids, dates or zip codes), the categories seen fewer than 5 times in both samples together are merged into one
before testing; when nothing but that one is left, no category test can tell the samples apart (with all counts 1,
chi-squared gives p of about 0.5 however disjoint they are): the feature is reported not testable, with no verdict,
and counts for no side of the dataset's. Every categorical feature also reports `unseen`, the share of its current
values the reference never has. A float reference's categories are compared in its own dtype (a float32 0.1 is the
0.1 a JSON client sends).
Missing values (NaN, None) and infinities (±inf, which no test can measure) are dropped per feature before
testing; a feature with no current values left is reported drifted with a NaN statistic (a feature that stops
arriving is drift worth hearing of). Any other NaN statistic or p-value counts as drift, never as its absence.
The dataset drifts when at least `share` of the checked (testable) features drift, each p-value test judged after
Holm's correction across the features checked with one: with two features tested at 5% each, one of them drifted in
about 10% of windows of unchanged data (Evidently's plain rule), against at most 5% corrected. A feature's own
verdict (`drifted`) stays uncorrected; distances and features with no current values count as they are.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from skyloop.errors import SpecError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DriftReport", "DriftSpec", "FeatureDrift", "FeatureDriftSpec", "FeatureTest", "detect_drift",
           "feature_kind"]

_SMALL_SAMPLE = 1_000  # distances where both samples have more rows than this; p-value tests below
_MAX_DISCRETE = 5  # a numeric column with at most this many distinct values is categorical
_EPSILON = 1e-4  # Evidently's stand-in for an empty category's share in Jensen-Shannon
_MIN_STD = 1e-3  # Evidently's floor for the reference std that norms the Wasserstein distance


class FeatureTest(StrEnum):
    """A statistical test (or distance) used to decide whether one feature drifted."""

    AUTO = "auto"
    KS = "ks"
    CHISQUARE = "chisquare"
    Z = "z"
    WASSERSTEIN = "wasserstein"
    JENSENSHANNON = "jensenshannon"


_NUMERIC_TESTS = {FeatureTest.KS, FeatureTest.WASSERSTEIN}
_DISTANCE_TESTS = {FeatureTest.WASSERSTEIN, FeatureTest.JENSENSHANNON}


class FeatureDriftSpec(BaseModel):
    """How one feature is tested; every field left alone means Evidently's default.

    `threshold` is a p-value for ks, chisquare and z (drift when p < threshold, default 0.05) and a
    distance for wasserstein and jensenshannon (drift when distance >= threshold, default 0.1).
    A named test fixes the kind: ks and wasserstein are numeric, the others categorical.
    """

    # Finite numbers only, as in `deploy.spec`: NaN passes every bound and neither survives the stored JSON.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["auto", "numeric", "categorical"] = "auto"
    test: FeatureTest = FeatureTest.AUTO
    threshold: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _kind_fits_test(self) -> FeatureDriftSpec:
        if self.kind != "auto" and self.test != FeatureTest.AUTO and self.kind != _test_kind(self.test):
            raise ValueError(f"test {self.test.value!r} is for {_test_kind(self.test)} features, "
                             f"but kind is {self.kind!r}")
        # Without a test the automatic choice (by the samples' sizes) decides whether `threshold` is a p-value or
        # a distance: 0.01 meant as p < 0.01 would flag nearly every window once the reference grew a distance.
        if self.threshold is not None and self.test == FeatureTest.AUTO:
            raise ValueError(f"threshold {self.threshold:g} needs a test: it is a p-value for ks, chisquare and z "
                             "and a distance for wasserstein and jensenshannon; give one, e.g. "
                             f"{{test: ks, threshold: {self.threshold:g}}}")
        if self.threshold is not None and self.test not in _DISTANCE_TESTS and self.threshold >= 1:
            raise ValueError(f"threshold {self.threshold:g} is a p-value for test {self.test.value!r} (drift when "
                             "p < threshold): give one between 0 and 1, e.g. 0.05")
        return self


class DriftSpec(BaseModel):
    """Which features to check, how, and when the whole dataset counts as drifted."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    features: dict[str, FeatureDriftSpec] = {}
    """Per-feature overrides; every name must be a reference column."""
    ignore: list[str] = []
    """Features not checked (names absent from the reference are allowed)."""
    share: float = Field(default=0.5, gt=0, le=1)
    """The dataset drifts when at least this share of the checked features drift."""
    min_rows: int = Field(default=30, ge=1)
    """With fewer current rows nothing is tested and the report says there is not enough data."""


@dataclass(frozen=True)
class FeatureDrift:
    """The verdict on one feature: the test used, its statistic, its p-value (None for distances)."""

    feature: str
    kind: str
    test: str
    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool
    unseen: float | None = None
    """Categorical features: the share of current values the reference never has (None for numeric ones)."""
    testable: bool = True
    """False where no test can tell the samples apart (values nearly all distinct): no verdict either way."""


@dataclass(frozen=True)
class DriftReport:
    """The verdict on a current frame against a reference: per feature, then for the dataset."""

    features: list[FeatureDrift]
    drifted: int
    """Features whose own verdict is drift."""
    share: float
    """The share of the testable features that drift for the dataset (after Holm's correction)."""
    dataset_drift: bool
    reference_rows: int
    current_rows: int
    enough_data: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; NaN statistics become None."""
        out = asdict(self)
        for feature in out["features"]:
            for key in ("statistic", "p_value"):
                if feature[key] is not None and math.isnan(feature[key]):
                    feature[key] = None
        return out


def detect_drift(reference: pd.DataFrame, current: pd.DataFrame, spec: DriftSpec | None = None) -> DriftReport:
    """Test every reference column (but the ignored) for drift in `current`.

    Raises `SpecError` when a frame has two columns of one name, when a checked feature is missing from
    `current`, when `spec.features` names a column the reference lacks, when a numeric test meets non-numeric
    values, when a categorical one meets values that are no category (lists), or when a feature has no values
    at all in the reference.
    """
    spec = spec or DriftSpec()
    for frame, what in ((reference, "the reference"), (current, "current data")):
        twice = sorted(n for n, k in Counter(str(c) for c in frame.columns).items() if k > 1)
        if twice:
            raise SpecError(f"{what} has more than one column named {', '.join(map(repr, twice))}; "
                            "give each feature one column")
    columns = [str(c) for c in reference.columns]
    unknown = sorted(set(spec.features) - set(columns))
    if unknown:
        raise SpecError(f"drift spec names features the reference lacks: {', '.join(unknown)}")
    checked = [c for c in columns if c not in set(spec.ignore)]
    missing = [c for c in checked if c not in set(map(str, current.columns))]
    if missing:
        raise SpecError(f"current data lacks features: {', '.join(missing)} (add them or list them in `ignore`)")
    ref_rows, cur_rows = len(reference), len(current)
    if cur_rows < spec.min_rows:
        return DriftReport([], 0, 0.0, False, ref_rows, cur_rows, enough_data=False)
    ref_by_name = {str(c): reference[c] for c in reference.columns}
    cur_by_name = {str(c): current[c] for c in current.columns}
    results = [_check(name, _present(ref_by_name[name]), _present(cur_by_name[name]),
                      spec.features.get(name, FeatureDriftSpec()))
               for name in checked]
    testable = [r for r in results if r.testable]
    share = _holm(testable) / len(testable) if testable else 0.0
    return DriftReport(results, sum(r.drifted for r in results), share, bool(testable) and share >= spec.share,
                       ref_rows, cur_rows, enough_data=True)


def _holm(results: list[FeatureDrift]) -> int:
    """How many of `results` drift for the dataset: Holm's step-down over the p-value tests (each at its own
    threshold: p / threshold against 1 / the tests left), distances and unmeasured features as they are."""
    def measured(r: FeatureDrift) -> bool:
        return r.p_value is not None and not math.isnan(r.p_value) and not math.isnan(r.statistic)

    scaled = sorted(r.p_value / r.threshold for r in results if measured(r) and r.p_value is not None)
    rejected = next((i for i, q in enumerate(scaled) if q * (len(scaled) - i) >= 1), len(scaled))
    return rejected + sum(r.drifted for r in results if not measured(r))


def _present(values: pd.Series[Any]) -> pd.Series[Any]:
    """The values a test can use: without missing ones, and without ±inf (one inf makes a std or a distance NaN)."""
    from pandas.api.types import is_float_dtype, is_object_dtype

    if is_float_dtype(values.dtype):
        values = values[~np.isinf(values.fillna(0.0))]
    elif is_object_dtype(values.dtype):
        values = values[~values.map(lambda v: isinstance(v, float) and math.isinf(v)).astype(bool)]
    return values.dropna()


def _test_kind(test: FeatureTest) -> Literal["numeric", "categorical"]:
    return "numeric" if test in _NUMERIC_TESTS else "categorical"


def _check(name: str, ref: pd.Series[Any], cur: pd.Series[Any], fspec: FeatureDriftSpec) -> FeatureDrift:
    if ref.empty:
        raise SpecError(f"feature {name!r} has no values in the reference (list it in `ignore`)")
    large = min(len(ref), len(cur)) > _SMALL_SAMPLE  # the values a test gets, not the rows around them
    test = fspec.test
    kind = feature_kind(ref, fspec)
    if kind == "categorical":
        cur = _in_dtype_of(ref, cur)
    if test == FeatureTest.AUTO:
        if kind == "numeric":
            test = FeatureTest.WASSERSTEIN if large else FeatureTest.KS
        elif large:
            test = FeatureTest.JENSENSHANNON
        else:
            union = set(_counts(name, ref)) | set(_counts(name, cur))
            test = FeatureTest.Z if len(union) == 2 else FeatureTest.CHISQUARE
    threshold = fspec.threshold if fspec.threshold is not None else 0.1 if test in _DISTANCE_TESTS else 0.05
    if cur.empty:
        return FeatureDrift(name, _test_kind(test), test.value, math.nan, None, threshold, True)
    unseen = None
    if test in _NUMERIC_TESTS:
        statistic, p_value = _numeric(name, test, ref, cur)
    else:
        seen = set(_counts(name, ref))
        unseen = float(sum(n for k, n in _counts(name, cur).items() if k not in seen)) / len(cur)
        statistic, p_value = _categorical(name, test, ref, cur)
        if p_value is not None and math.isnan(p_value) and not math.isnan(statistic):  # nothing left to compare
            return FeatureDrift(name, _test_kind(test), test.value, math.nan, None, threshold, False, unseen,
                                testable=False)
    if math.isnan(statistic) or (p_value is not None and math.isnan(p_value)):
        drifted = True  # a test that cannot tell is not a test that found nothing
    else:
        drifted = statistic >= threshold if p_value is None else p_value < threshold
    return FeatureDrift(name, _test_kind(test), test.value, statistic, p_value, threshold, bool(drifted), unseen)


def _in_dtype_of(ref: pd.Series[Any], cur: pd.Series[Any]) -> pd.Series[Any]:
    """`cur` as categories of a float reference: in the reference's dtype, where a float32 0.1 is not the float64
    0.1 a JSON client sends (then every current value would be a category the reference never had)."""
    from pandas.api.types import is_bool_dtype, is_float_dtype, is_numeric_dtype

    if not is_float_dtype(ref.dtype) or not is_numeric_dtype(cur.dtype) or is_bool_dtype(cur.dtype):
        return cur
    return cur.astype(ref.dtype)


def feature_kind(reference: pd.Series[Any], spec: FeatureDriftSpec) -> Literal["numeric", "categorical"]:
    """The kind a feature is tested as: its named test's, else its spec's kind, else by the reference's values."""
    if spec.test != FeatureTest.AUTO:
        return _test_kind(spec.test)
    return spec.kind if spec.kind != "auto" else _auto_kind(reference)


def _auto_kind(ref: pd.Series[Any]) -> Literal["numeric", "categorical"]:
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    numeric = is_numeric_dtype(ref.dtype) and not is_bool_dtype(ref.dtype)
    return "numeric" if numeric and ref.nunique() > _MAX_DISCRETE else "categorical"


def _numeric(name: str, test: FeatureTest, ref: pd.Series[Any], cur: pd.Series[Any]) -> tuple[float, float | None]:
    try:
        x, y = np.asarray(ref, dtype=np.float64), np.asarray(cur, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"feature {name!r}: test {test.value!r} needs numbers ({exc}); "
                        "set its kind to 'categorical'") from exc
    stats = _scipy("stats")
    if test == FeatureTest.KS:
        result = stats.ks_2samp(x, y)
        return float(result.statistic), float(result.pvalue)
    # Evidently's rule for a constant reference: norm by a floor, so any move of the current values is large.
    norm = max(float(np.std(x)), _MIN_STD)
    return float(stats.wasserstein_distance(x, y)) / norm, None


def _categorical(name: str, test: FeatureTest, ref: pd.Series[Any], cur: pd.Series[Any]) -> tuple[float, float | None]:
    ref_counts, cur_counts = _counts(name, ref), _counts(name, cur)
    keys = list(dict.fromkeys([*ref_counts, *cur_counts]))  # the reference's most common first
    r = np.array([ref_counts.get(k, 0) for k in keys], dtype=np.float64)
    c = np.array([cur_counts.get(k, 0) for k in keys], dtype=np.float64)
    if test == FeatureTest.JENSENSHANNON:
        p, q = r / r.sum(), c / c.sum()
        p[p == 0], q[q == 0] = _EPSILON, _EPSILON
        return float(_scipy("spatial.distance").jensenshannon(p, q)), None
    if test == FeatureTest.Z:
        if len(keys) > 2:
            raise SpecError(f"feature {name!r}: the z-test needs at most two categories, found {len(keys)}")
        return _z_test(r, c)
    # Both frames are samples: the test of homogeneity on the 2 x k table counts the reference's sampling noise
    # too, and a category only one of them has is one more column (no zero expectation, no infinity).
    # Without Yates' correction, so that on two categories it agrees with the z-test (chi-squared = z**2).
    if len(keys) == 1:
        return 0.0, 1.0
    table = _mergeable(np.vstack([r, c]))
    if table.shape[1] == 1:  # no category holds enough values to compare: NaN p-value, a finite statistic
        return 0.0, math.nan
    result = _scipy("stats").chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def _mergeable(table: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A 2 x k table closer to what chi-squared's approximation needs: where more than 20% of the cells expect
    fewer than 5 values (Cochran's rule), the categories seen fewer than 5 times in both samples together are
    merged into one column. Pooled counts decide, the same whichever sample a value came from, so the merged
    table is still a test of homogeneity."""
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    rare = table.sum(axis=0) < 5
    if np.mean(expected < 5) <= 0.2 or rare.sum() < 2:
        return table
    return np.hstack([table[:, ~rare], table[:, rare].sum(axis=1, keepdims=True)])


def _z_test(r: np.ndarray[Any, Any], c: np.ndarray[Any, Any]) -> tuple[float, float | None]:
    """Two-proportion z-test on the share of the first category; z > 0 when it grew in `current`."""
    if len(r) < 2:
        return 0.0, 1.0
    n1, n2 = float(r.sum()), float(c.sum())
    p1, p2 = r[0] / n1, c[0] / n2
    pooled = (r[0] + c[0]) / (n1 + n2)
    z = float((p2 - p1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)))
    return z, float(2 * _scipy("stats").norm.sf(abs(z)))


def _counts(name: str, values: pd.Series[Any]) -> dict[Any, int]:
    try:  # a categorical dtype lists unseen categories as 0
        return {k: int(n) for k, n in values.value_counts().items() if n > 0}
    except TypeError as exc:  # lists, dicts, arrays: values that are no category
        raise SpecError(f"feature {name!r}: its values cannot be counted as categories ({exc}); give it as "
                        "numbers or strings, or list it in `ignore`") from exc


def _scipy(module: str) -> Any:
    # scipy ships no type information, and only the drift tests need it: imported on first use.
    try:
        return importlib.import_module(f"scipy.{module}")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("drift detection needs scipy: pip install scipy") from exc
