"""What drift compares: the reference's features against the logged inputs, as the payload log's masks left them.

A `hash` mask logs an input's values as salted sha256 prefixes (`PayloadLog.hashed`). A categorical feature
stays comparable once the reference's values are hashed the same way: equal values, equal hashes. A numeric one
does not (hashes have no order and no distance), and a `drop` mask logs nothing: both are left out of the test
and named, with why, in `DriftInputs.unchecked`. A reference feature that is neither masked nor among the logged
inputs is tested as one with no current values, which drifts: a feature that stops arriving is drift to hear of.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from skyloop.monitoring.drift import DriftSpec, FeatureDriftSpec, feature_kind
from skyloop.monitoring.payloads import feature_column, input_name

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DriftInputs", "drift_inputs", "masked_as"]


@dataclass(frozen=True)
class DriftInputs:
    """A reference and the current values to test against it, with the spec to test them by."""

    reference: pd.DataFrame
    current: pd.DataFrame
    tests: DriftSpec
    unchecked: dict[str, str]
    """Features left out of the test, with why."""


def masked_as(feature: str, mask: Mapping[str, str]) -> str | None:
    """How the payload log masks `feature` (a reference column, or a payload frame's feature column): the mask of
    its input, `NAME` itself or the `[n, k]` tensor `NAME` whose column `NAME_j` it is; None when not masked."""
    name = input_name(feature)
    if name in mask:
        return mask[name]
    tensor, _, column = name.rpartition("_")
    return mask.get(tensor) if tensor and column.isdigit() else None


def drift_inputs(reference: pd.DataFrame, recent: pd.DataFrame, mask: Mapping[str, str], tests: DriftSpec,
                 hashed: Callable[[list[Any]], list[str]]) -> DriftInputs | None:
    """The frames `detect_drift` compares for logged payloads `recent` (as `read_payloads` gives them); None when
    no reference feature is among the logged inputs (nothing to compare is no measure of drift)."""
    import pandas as pd

    names = [str(c) for c in reference.columns]
    reference = reference.set_axis(names, axis=1)
    if not any(feature_column(n) in recent.columns for n in names):
        return None
    ignored = set(tests.ignore)
    unchecked: dict[str, str] = {}
    ref_columns: dict[str, pd.Series[Any]] = {}
    cur_columns: dict[str, Any] = {}
    for name in names:
        logged = recent[feature_column(name)] if feature_column(name) in recent.columns else None
        how = masked_as(name, mask)
        if name in ignored:
            ref_columns[name] = reference[name]
            continue
        if how == "drop":
            unchecked[name] = "masked with drop, so never logged"
        elif how == "hash" and feature_kind(reference[name].dropna(), tests.features.get(name, FeatureDriftSpec())) \
                == "numeric":
            unchecked[name] = "masked with hash: a numeric feature's hashes have no order nor distance to test"
        if name in unchecked:
            ref_columns[name] = reference[name]
            continue
        ref_columns[name] = reference[name]
        if how == "hash":  # hashed as the log hashes a value a client sends: JSON's str, int, float or bool
            present = reference[name].notna()
            ref_columns[name] = reference[name].astype(object)
            values = reference[name][present].tolist()
            if reference[name].dtype == np.float32:  # as a client writes them: 0.1, not 0.10000000149011612
                values = [float(str(np.float32(v))) for v in values]
            ref_columns[name][present] = hashed(values)
        cur_columns[name] = logged if logged is not None else pd.Series([None] * len(recent), dtype=object)
    current = pd.DataFrame({n: pd.Series(v).reset_index(drop=True) for n, v in cur_columns.items()},
                           index=range(len(recent)))
    spec = tests.model_copy(update={"ignore": [*tests.ignore, *unchecked]}) if unchecked else tests
    return DriftInputs(pd.DataFrame(ref_columns), current, spec, unchecked)
