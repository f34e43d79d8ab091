"""Connecting to Ray: a cluster at an address, or a local Ray started here on loopback.

`ray` is imported only here, in `ray`'s backend and in its worker code, all reached lazily: the rest
of skyloop never needs it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from typing import Any

from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.backends.limits import DEVICES_VAR
from skyloop.execution.procworker import scoped_environ
from skyloop.spec.resources import Resources

__all__ = ["CONNECT_TIMEOUT", "connect_ray", "ray_resources"]

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a cluster's address to take a TCP connection before giving up on it."""


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
    if address is None and settings.max_cpus is not None and settings.max_cpus != math.floor(settings.max_cpus):
        # Ray counts a node's CPUs in whole numbers: given 1 for 0.5 it would run twice what was allowed.
        raise BackendError(f"--max-cpus {settings.max_cpus:g} is not a whole number of CPUs, which a local Ray "
                           f"needs; give {max(1, math.floor(settings.max_cpus))}, or use --backend local, which "
                           "takes fractions")
    if address is None and "ray" not in sys.modules:
        # Loopback only: Ray reads this once, at import, and only from the environment (its own
        # processes inherit it). Not for a remote cluster, which must reach this driver. A user's
        # value is kept.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _import_ray()
    if ray.is_initialized():
        _check_same_cluster(ray, address)
        return ray, False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is not None:
            _check_reachable(address)
            ray.init(address=address, **quiet)
        else:
            ids = settings.gpu_ids
            gpus = settings.max_gpus if settings.max_gpus is not None else len(ids) if ids is not None else None
            # The devices it hands out: Ray takes them from CUDA_VISIBLE_DEVICES as its node starts.
            devices = {} if ids is None else {DEVICES_VAR: ",".join(map(str, ids[:gpus]))}
            with scoped_environ(devices):
                ray.init(
                    address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                    num_cpus=None if settings.max_cpus is None else max(1, int(settings.max_cpus)),
                    num_gpus=gpus, _memory=settings.max_memory, resources=dict(settings.resources) or None,
                    **quiet,
                )
    except BackendError:
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError here
        where = f"connect to the Ray cluster at {address}" if address else "start a local Ray"
        raise BackendError(f"cannot {where}: {type(exc).__name__}: {exc}") from exc
    return ray, True


def _check_same_cluster(ray: Any, address: str | None) -> None:
    """Refuse `address` when this process is connected to another cluster already: Ray holds one connection per
    process, so the work would silently run on the cluster it has (say, a deployment naming a cluster, in a
    controller where another deployment started a local Ray)."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or address is None or address.startswith("ray://"):
        return  # none asked for, `auto`, or a client connection: nothing to compare
    current = str(getattr(ray.get_runtime_context(), "gcs_address", "") or "")
    current_host, _, current_port = current.rpartition(":")
    try:
        same = current_port == port and socket.gethostbyname(current_host) == socket.gethostbyname(host.strip("[]"))
    except OSError:
        same = False
    if current and not same:
        raise BackendError(f"cannot use the Ray cluster at {address}: this process is connected to the one at "
                           f"{current} already, and Ray holds one cluster per process; give every Ray deployment "
                           "(and run) of one process the same ray_address")


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse at once a `host:port` (or `ray://host:port`) where nothing listens: Ray itself retries such an
    address for many minutes before it gives up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # `auto`, or a form Ray resolves itself
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise BackendError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                           f"({exc.strerror or type(exc).__name__}); start it (`ray start --head`) or fix "
                           "--ray-address (SKYLOOP_EXECUTION__RAY_ADDRESS)") from None
    with sock:
        grpc = _speaks_grpc(sock, timeout)
    if grpc is False:  # Ray would retry such an address for some 14 minutes (its GCS connect retries)
        dashboard = " (8265 is Ray's dashboard)" if port == "8265" else ""
        raise BackendError(f"cannot connect to the Ray cluster at {address}: what answers there is not a Ray "
                           f"cluster{dashboard}, it does not speak gRPC; give the address of the head's GCS "
                           "(`ray start --head --port PORT`, 6379 by default) in --ray-address "
                           "(SKYLOOP_EXECUTION__RAY_ADDRESS)")


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS
"""What a gRPC client sends first (RFC 9113, 3.4); a gRPC server (Ray's GCS, its client server) answers with
a SETTINGS frame."""


def _speaks_grpc(sock: socket.socket, timeout: float) -> bool | None:
    """Whether the server on `sock` answers as gRPC servers do (HTTP/2, whose server preface is a SETTINGS
    frame): True, False (it answers something else, HTTP/1 say, or hangs up), or None when it says nothing in
    `timeout` (unknown: Ray is left to try)."""
    try:
        sock.settimeout(timeout)
        sock.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 4:  # up to the frame's type (a read may return less)
            more = sock.recv(9 - len(head))
            if not more:
                break
            head += more
    except TimeoutError:
        return None
    except OSError:
        return False  # reset at the preface: whatever listens is no HTTP/2 server
    return len(head) >= 4 and head[3] == 0x04  # a frame header whose type is SETTINGS


_INTERNAL_RESOURCES = ("node:", "accelerator_type:")
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def ray_resources(amounts: dict[str, float]) -> Resources:
    """Ray's resource amounts (of the cluster or of one node) as skyloop's, without Ray's internal ones."""
    custom = {name: amount for name, amount in amounts.items()
              if name not in _BUILTIN_RESOURCES and not name.startswith(_INTERNAL_RESOURCES)}
    return Resources(cpus=amounts.get("CPU", 0.0), memory=int(amounts.get("memory", 0)),
                     gpus=math.floor(amounts.get("GPU", 0)), custom=custom)
