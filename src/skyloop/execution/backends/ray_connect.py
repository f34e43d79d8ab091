"""Connecting to Ray: a cluster at an address, or a local Ray started here on loopback.

`ray` is imported only here, in `ray`'s backend and in its worker code, all reached lazily: the rest
of skyloop never needs it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError

__all__ = ["connect_ray"]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendError("the ray backend needs the ray extra: pip install 'skyloop[ray]'") from exc
    return ray


def connect_ray(address: str | None, settings: ExecutionSettings) -> tuple[Any, bool]:
    """The `ray` module, connected to `address` or to a local Ray started here (sized by `settings`),
    unless Ray is already initialised in this process; and whether this call initialised it.

    A Ray started here listens on 127.0.0.1 only, unless this process imported `ray` before
    without `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in its environment (Ray reads it at import).
    """
    if address is None and "ray" not in sys.modules:
        # Loopback only: Ray reads this once, at import, and only from the environment (its own
        # processes inherit it). Not for a remote cluster, which must reach this driver. A user's
        # value is kept.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is not None:
            ray.init(address=address, **quiet)
        else:
            ray.init(
                address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                num_cpus=None if settings.max_cpus is None else max(1, math.floor(settings.max_cpus)),
                num_gpus=settings.max_gpus, _memory=settings.max_memory, **quiet,
            )
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError here
        where = f"connect to the Ray cluster at {address}" if address else "start a local Ray"
        raise BackendError(f"cannot {where}: {type(exc).__name__}: {exc}") from exc
    return ray, True
