"""The demo's world: an agent sees 4 numeric observations and must say whether an event follows.

The rule never changes (`y = 1` when `sin(x0) + 0.3 x1 + 0.1 x3 > 0`, with 5% label noise), but
what the agent sees does: at first `x0` is centred on 0, after the shift on 3 (and `x3` moves too).
A model trained before the shift has never seen that region and extrapolates badly (accuracy ~0.93 ->
~0.6); one retrained on
what was logged and labelled after the shift is right again. Seeded, so every demo tells the same story.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FEATURES", "World"]

FEATURES = ["x0", "x1", "x2", "x3"]
_NOISE = 0.05


class World:
    """Draws observations and the truth behind them, before or after the shift."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.shifted = False

    def observe(self, n: int) -> np.ndarray[Any, Any]:
        """`n` observations (rows of 4 floats) from the current distribution."""
        x = self.rng.normal(0.0, 1.0, size=(n, 4))
        if self.shifted:
            x[:, 0] += 3.0
            x[:, 3] += 1.5
        return x

    def truth(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The label of each row (with a little noise)."""
        clean = (np.sin(x[:, 0]) + 0.3 * x[:, 1] + 0.1 * x[:, 3] > 0).astype(np.int64)
        flip = self.rng.random(len(x)) < _NOISE
        labels: np.ndarray[Any, Any] = np.where(flip, 1 - clean, clean)
        return labels
