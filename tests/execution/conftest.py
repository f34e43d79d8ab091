"""Fixtures of the execution tests."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from ray_support import local_ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[ModuleType]:
    """One local Ray for the module that asks for it (see `ray_support.local_ray`)."""
    with local_ray() as ray:
        yield ray
