"""Run the model server: load the graphs once, then serve them from pre-forked uvicorn worker processes.

The parent process binds the socket and loads every graph (models verified, user classes started) before
any worker exists, so a tampered model or a broken spec stops `skyloop serve` with a clear error, cold
start pays for one import of the model code instead of one per worker, and workers share the loaded
model's memory copy-on-write (gunicorn's `preload_app`). The parent then forks the workers, restarts any
that dies, and stops them all on SIGTERM/SIGINT. With one worker the parent serves itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from skyloop.config import Settings
from skyloop.errors import ModelLoadError
from skyloop.serving.spec import GraphNode, NodeType, ServeSpec

__all__ = ["bind", "serve", "spec_for_target"]

log = logging.getLogger("skyloop.serving")

_PARENT_POLL_SECONDS = 0.5
_STOP_GRACE_SECONDS = 10.0


def spec_for_target(target: str, name: str | None = None) -> ServeSpec:
    """A `ServeSpec` for a CLI target: a YAML spec file, a `models:/` URI, or a model directory."""
    from skyloop.serving.spec import load_serve_spec

    if target.endswith((".yaml", ".yml")) and not Path(target).is_dir():
        spec = load_serve_spec(target)
        return spec.model_copy(update={"name": name}) if name else spec
    if target.startswith("models:/"):
        from skyloop.registry.uri import parse_model_ref

        model = parse_model_ref(target).name
    else:
        from skyloop.registry.package import read_manifest

        model = read_manifest(Path(target)).name
        target = str(Path(target).resolve())
    node = GraphNode(name=name or model, type=NodeType.MODEL, model_uri=target)
    return ServeSpec(name=name or model, graph=node)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket that forked workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ModelLoadError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run_uvicorn(app: Any, sock: socket.socket, log_level: str) -> None:
    import uvicorn

    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=int(_STOP_GRACE_SECONDS))
    uvicorn.Server(config).run(sockets=[sock])


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)  # orphaned: shut down like on a normal stop

    threading.Thread(target=watch, name="skyloop-parent-watch", daemon=True).start()


def _fork_worker(app: Any, sock: socket.socket, log_level: str) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _watch_parent(parent)
        _run_uvicorn(app, sock, log_level)
    except BaseException:
        log.exception("server worker failed")
        code = 1
    finally:
        os._exit(code)


def _supervise(app: Any, sock: socket.socket, workers: int, log_level: str) -> None:
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    children = {_fork_worker(app, sock, log_level) for _ in range(workers)}
    try:
        while not stopping.is_set():
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid and pid in children:
                children.discard(pid)
                if not stopping.is_set():
                    log.warning("server worker %d exited (%s); starting another", pid, _describe(status))
                    children.add(_fork_worker(app, sock, log_level))
                continue
            stopping.wait(0.2)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        while children and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
                children.discard(pid)
            time.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def serve(specs: list[ServeSpec], settings: Settings, host: str = "127.0.0.1", port: int = 8080,
          workers: int | None = None, threads: int = 4, max_body_bytes: int = 16 * 1024 * 1024,
          log_level: str = "warning", on_ready: Any = None) -> None:
    """Load `specs`, then serve them until SIGTERM/SIGINT (blocking). `on_ready(port)` runs once listening."""
    workers = workers or os.cpu_count() or 1
    metrics_dir: str | None = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported: it picks per-process files or memory at import time.
        metrics_dir = tempfile.mkdtemp(prefix="skyloop-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        from skyloop.serving.app import create_app
        from skyloop.serving.dataplane import DataPlane

        sock = bind(host, port)
        try:
            plane = DataPlane(specs, settings, threads=threads)
            plane.load()
            failed = [m.failure for m in plane.models.values() if m.failure]
            if len(failed) == 1:
                raise failed[0]
            if failed:
                raise ModelLoadError("; ".join(f"{m.name}: {m.failure}" for m in plane.models.values() if m.failure))
            app = create_app(plane, max_body_bytes=max_body_bytes, load=False)
            if on_ready is not None:
                on_ready(sock.getsockname()[1])
            if workers == 1:
                _run_uvicorn(app, sock, log_level)
            else:
                _supervise(app, sock, workers, log_level)
        finally:
            sock.close()
    finally:
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
