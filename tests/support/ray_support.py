"""A local Ray for tests (importable as `ray_support`): loopback only, 2 CPUs, no usage report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import pytest

__all__ = ["RAY_ENV", "local_ray"]

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Set before Ray starts (and before `import ray`): every listener on 127.0.0.1, no usage report."""


@contextlib.contextmanager
def local_ray() -> Iterator[ModuleType]:
    """Start a local Ray (2 CPUs, a small object store, nothing but loopback) and shut it down after."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():
            patch.setenv(name, value)
        ray = pytest.importorskip("ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=100 * 2**20, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
