"""Shared fixtures: every test gets its own skyloop home (DB, artifacts, logs) under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyloop.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings rooted in a fresh temporary home, ignoring the environment."""
    return Settings.for_home(tmp_path / "home")
