"""Run the model server: load the graphs once, then serve them from pre-forked uvicorn worker processes.

The parent process binds the socket and loads every graph (models verified, user classes started) before
any worker exists, so a tampered model or a broken spec stops `skyloop serve` with a clear error, cold
start pays for one import of the model code instead of one per worker, and workers share the loaded
model's memory copy-on-write (gunicorn's `preload_app`). The parent then forks the workers, restarts any
that dies, and stops them all on SIGTERM/SIGINT. With one worker the parent serves itself. While the parent
loads, a thread of its own answers on the sockets (`/v2/health/live` 200, anything else 503), so that a probe
is told the server is loading instead of waiting in the listen backlog until it times out.

Replica mode (`replicas=N`) is for a controller with a router in front: N sockets on N ports, one forked
worker each. The parent keeps every socket open, so while a dead replica is being replaced (at once: the
parent wakes on SIGCHLD) its new connections wait in the listen backlog instead of being refused. A JSON
state file tells the controller which pid serves which port.

Feedback must name an answer: the workers of a server share a table of the ids they answered
(`serving.answered`, made before the fork), and a worker that takes feedback on another's answer passes it on
to that one, whose graph heard the request (`serving.relay`: one Unix socket per worker slot, also made
before the fork). Replicas take the word of the gateway in front of them, which
checks ids against its own answers and may pass feedback on to another replica than the one that answered.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyloop.config import Settings
from skyloop.errors import Conflict, ModelLoadError, SpecError
from skyloop.scratch import Scratch, disown
from skyloop.serving.spec import GraphNode, NodeType, ServeSpec

__all__ = ["bind", "serve", "spec_for_target"]

log = logging.getLogger("skyloop.serving")

_PARENT_POLL_SECONDS = 0.5
_STOP_GRACE_SECONDS = 10.0
_CRASH_LOOP_SECONDS = 1.0  # a worker that exits younger than this is restarted after this long
_LOADING_READ_SECONDS = 1.0  # how long the loading answerer waits for one request
_LOADING_MAX_READ = 1024 * 1024  # what it reads of a request at most (the rest is not worth the wait)

_metrics_name: str | None = None
"""This worker's name in the multiprocess metrics files: its slot's (`w0`, `w1`, ...), set after the fork."""


def _metrics_process() -> str:
    """Whose metrics files this process writes: a worker's slot, else (the parent, one worker) its pid.

    A replacement worker takes over the files of the one it replaces (dead and reaped first, so no two live
    processes share them) and counts on from its values: the folder holds one set of files per slot however
    often workers restart, instead of a set per pid ever started that every scrape reads and adds up.
    """
    return _metrics_name or str(os.getpid())


def _slot_metrics_name(index: int) -> str:
    return f"w{index}"  # no '_': prometheus_client splits file names on it


def spec_for_target(target: str, name: str | None = None) -> ServeSpec:
    """A `ServeSpec` for a CLI target: a YAML spec file, a `models:/` URI, or a model directory."""
    from skyloop.serving.spec import load_serve_spec
    from skyloop.spec.files import validate

    if name is not None:  # checked as a spec's name is (`model_copy` would take any string unchecked)
        validate(ServeSpec, {"name": name, "graph": {"name": "model", "type": "MODEL", "model_uri": "x"}},
                 "--name")
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
    except OverflowError:
        sock.close()
        raise SpecError(f"--port {port}: a port is 0 to 65535 (0 picks a free one)") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
        raise SpecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Loading:
    """Answers on the listening sockets while the parent loads the graphs, before any worker can.

    Without it a probe or a client would wait in the listen backlog for as long as the models take to load
    (minutes for a large one) and time out: `/v2/health/live` answers 200 here, everything else 503 with the
    reason, as the app itself does before its graphs have loaded. One thread, one connection at a time, each
    answered and closed; it is stopped and joined before the parent forks (a fork copies no thread).
    """

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="skyloop-loading", daemon=True)

    def __enter__(self) -> _Loading:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                readable, _, _ = select.select(self.socks, [], [], 0.05)
            except (OSError, ValueError):  # a socket closed under us: the server is stopping
                return
            for sock in readable:
                with contextlib.suppress(OSError, ValueError):  # a client that left, or that sent no HTTP
                    conn, _ = sock.accept()
                    with conn:
                        _answer_loading(conn)


def _answer_loading(conn: socket.socket) -> None:
    """One HTTP/1.1 answer while loading: 200 for liveness, 503 with the reason for anything else."""
    # One deadline for the whole request, not one per read: a client trickling bytes must not hold up the
    # start of the workers (the thread is joined before they fork).
    deadline = time.monotonic() + _LOADING_READ_SECONDS

    def recv(size: int) -> bytes:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        return conn.recv(size)

    data = b""
    while b"\r\n\r\n" not in data:
        chunk = recv(65536)
        if not chunk or len(data) > _LOADING_MAX_READ:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")  # METHOD TARGET VERSION
    path = request_line[1].partition(b"?")[0].rstrip(b"/") if len(request_line) > 1 else b""
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value)
    # Read the body (what fits) so that closing sends FIN: closing with unread data sends RST, and a client
    # that gets RST may lose the answer it was sent.
    left = min(length, _LOADING_MAX_READ) - len(body)
    with contextlib.suppress(TimeoutError):  # a body slower than the deadline: answer all the same
        while left > 0 and (chunk := recv(min(left, 65536))):
            left -= len(chunk)
    reason = "models are still loading"
    doc: dict[str, object]
    if path == b"/v2/health/live":
        status, doc = "200 OK", {"live": True}
    elif path == b"/v2/health/ready":
        status, doc = "503 Service Unavailable", {"ready": False, "error": reason}
    else:
        status, doc = "503 Service Unavailable", {"error": f"the server is not ready: {reason}"}
    payload = json.dumps(doc, separators=(",", ":")).encode()
    conn.sendall(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
                 f"connection: close\r\n\r\n".encode() + payload)


def _run_uvicorn(app: Any, sock: socket.socket, log_level: str) -> None:
    import uvicorn

    from skyloop.serving.http import BoundedHttpToolsProtocol

    config = uvicorn.Config(app, loop="uvloop", http=BoundedHttpToolsProtocol, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=int(_STOP_GRACE_SECONDS))
    uvicorn.Server(config).run(sockets=[sock])


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)  # orphaned: shut down like on a normal stop

    threading.Thread(target=watch, name="skyloop-parent-watch", daemon=True).start()


@dataclass
class _Slot:
    """One worker's place: the socket it serves and who serves it now."""

    index: int
    sock: socket.socket
    metrics_dir: str | None = None  # this slot's own multiprocess metrics folder (replica mode)
    pid: int = 0
    restarts: int = 0
    started_at: float = 0.0  # wall clock, for the state file
    started: float = 0.0  # monotonic, to spot a crash loop


def _fork_worker(app: Any, slot: _Slot, slots: list[_Slot], log_level: str, wakeup: tuple[int, int],
                 in_worker: Callable[[int], object] | None = None) -> int:
    global _metrics_name
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        for fd in wakeup:
            os.close(fd)
        for other in {s.sock for s in slots} - {slot.sock}:
            other.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if slot.metrics_dir is not None:  # prometheus_client re-reads this after a fork, on the first update
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = slot.metrics_dir
        _metrics_name = _slot_metrics_name(slot.index)
        if in_worker is not None:
            in_worker(slot.index)
        _watch_parent(parent)
        _run_uvicorn(app, slot.sock, log_level)
    except BaseException:
        log.exception("server worker failed")
        code = 1
    finally:
        os._exit(code)


def _write_state(path: Path, slots: list[_Slot]) -> None:
    """Replace `path` in one step, so a reader never sees half a file."""
    doc = {"pid": os.getpid(), "replicas": [{"index": s.index, "port": s.sock.getsockname()[1], "pid": s.pid,
                                             "restarts": s.restarts, "started_at": s.started_at} for s in slots]}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _supervise(app: Any, slots: list[_Slot], log_level: str, state_file: Path | None = None,
               parent: int | None = None, on_started: Callable[[], object] | None = None,
               in_worker: Callable[[int], object] | None = None,
               also_listening: Iterable[socket.socket] = ()) -> None:
    """Fork a worker per slot, replace any that dies, and stop them all on SIGTERM/SIGINT, or once this
    process's parent is no longer `parent` (when given).

    `in_worker(index)` runs in each forked worker (a replacement too) with its slot's index, before it serves.
    `also_listening`: sockets besides the slots' that the parent closes with them when the workers stop."""
    # Imported once here rather than in every (re)started worker: a replacement serves sooner.
    import uvicorn.loops.uvloop
    import uvicorn.protocols.http.httptools_impl  # noqa: F401

    stopping = threading.Event()
    multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    wakeup = os.pipe()  # SIGCHLD and SIGTERM write here (set_wakeup_fd), so the loop wakes at once
    for fd in wakeup:
        os.set_blocking(fd, False)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    previous_wakeup = signal.set_wakeup_fd(wakeup[1])
    by_pid: dict[int, _Slot] = {}
    due: dict[int, float] = {}  # slot index -> when to start its next worker

    def start(slot: _Slot) -> None:
        slot.pid = _fork_worker(app, slot, slots, log_level, wakeup, in_worker)
        slot.started_at, slot.started = time.time(), time.monotonic()
        by_pid[slot.pid] = slot

    try:
        for slot in slots:
            start(slot)
        if state_file is not None:
            _write_state(state_file, slots)
        if on_started is not None:
            on_started()
        while not stopping.is_set():
            for pid, status in _reap():
                if pid not in by_pid:
                    continue
                slot = by_pid.pop(pid)
                if multiproc:
                    from prometheus_client import multiprocess

                    # Its live gauges (in-flight requests, queue depth) go; its counters stay, for its replacement.
                    multiprocess.mark_process_dead(_slot_metrics_name(slot.index),  # type: ignore[no-untyped-call]
                                                   slot.metrics_dir or multiproc)
                # Failing on its own at once (not killed) would fail again: do not spin.
                young = os.WIFEXITED(status) and time.monotonic() - slot.started < _CRASH_LOOP_SECONDS
                log.warning("server worker %d exited (%s); starting another%s", pid, _describe(status),
                            " in a second" if young else "")
                due[slot.index] = time.monotonic() + (_CRASH_LOOP_SECONDS if young else 0.0)
            now = time.monotonic()
            for index in [i for i, when in due.items() if when <= now and not stopping.is_set()]:
                del due[index]
                slots[index].restarts += 1
                start(slots[index])
                if state_file is not None:
                    _write_state(state_file, slots)
            if parent is not None and os.getppid() != parent:
                log.warning("parent process %d is gone; stopping", parent)
                break
            timeout = min([_PARENT_POLL_SECONDS, *(when - now for when in due.values())])
            with contextlib.suppress(InterruptedError):
                select.select([wakeup[0]], [], [], max(timeout, 0.0))
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeup[0], 512):
                    pass
    finally:
        _stop(set(by_pid), {slot.sock for slot in slots} | set(also_listening))
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for fd in wakeup:
            os.close(fd)
        if state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                state_file.unlink()


def _reap() -> list[tuple[int, int]]:
    """Every child that has exited, with its wait status."""
    done: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if not pid:
            return done
        done.append((pid, status))


def _stop(children: set[int], listening: set[socket.socket]) -> None:
    """SIGTERM, so uvicorn lets in-flight requests finish; SIGKILL what is still there after the grace period.

    The parent's copies of the `listening` sockets are closed once the workers are told to stop (gunicorn's
    arbiter does the same): each worker closes its own copy as it starts draining, and the parent's would
    otherwise keep the port queueing new connections that nobody accepts, to be reset only when the drain ends.
    Closed, they are refused at once, and a client or a proxy can go elsewhere."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for sock in listening:
        sock.close()
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    while children and time.monotonic() < deadline:
        children -= {pid for pid, _ in _reap()}
        time.sleep(0.02)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def serve(specs: list[ServeSpec], settings: Settings, host: str = "127.0.0.1", port: int = 8080,
          workers: int | None = None, threads: int = 4, max_body_bytes: int = 16 * 1024 * 1024,
          log_level: str = "warning", on_ready: Any = None, replicas: int | None = None,
          state_file: Path | None = None, exit_with_parent: bool = False, parent: int | None = None) -> None:
    """Load `specs`, then serve them until SIGTERM/SIGINT (blocking). `on_ready(port)` runs once listening.

    With `replicas=N`, N one-worker replicas listen on their own ports (`port`, `port+1`, ... or free ports
    for 0) and `on_ready(ports)` gets the list. `state_file` (replicas only) is kept up to date as JSON:
    `{"pid": PARENT, "replicas": [{"index", "port", "pid", "restarts", "started_at"}, ...]}`, and removed
    on stop. With `exit_with_parent` the server stops when its parent process dies: `parent`, or by default the
    parent it had when `serve` was called.
    """
    # Taken before loading, which can take minutes: a parent that dies meanwhile leaves this process to init,
    # and a parent taken after that would be init itself, never to die (the replicas would serve forever).
    watched = (parent if parent is not None else os.getppid()) if exit_with_parent else None
    if replicas is not None:
        if workers is not None:
            raise SpecError("replicas each run one worker: give --replicas or --workers, not both")
        if replicas < 1:
            raise SpecError(f"replicas must be at least 1, got {replicas}")
    elif state_file is not None:
        raise SpecError("a state file describes replicas: give --replicas with --state-file")
    if replicas and port and port + replicas - 1 > 65535:
        # Else the bind of the first port past the end says `--port 65536`, a port nobody asked for.
        raise SpecError(f"--replicas {replicas} from --port {port} need ports up to {port + replicas - 1}, past "
                        "65535: give a lower --port, or --port 0 for free ones")
    if state_file is not None and not state_file.parent.is_dir():
        raise SpecError(f"cannot write the state file {state_file}: no folder {state_file.parent}")
    workers = 1 if replicas else workers or os.cpu_count() or 1
    metrics_dir: Scratch | None = None
    if given := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _clear_metrics_dir(given)
    elif replicas or workers > 1:
        # Before prometheus_client is imported: it picks per-process files or memory at import time.
        metrics_dir = Scratch("metrics")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.path
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue(_metrics_process)  # type: ignore[no-untyped-call]
    try:
        from skyloop.serving.answered import AnsweredIds
        from skyloop.serving.app import create_app
        from skyloop.serving.dataplane import DataPlane
        from skyloop.serving.relay import Relay

        with contextlib.ExitStack() as stack:
            socks = []
            for i in range(replicas or 1):
                socks.append(bind(host, port + i if port else 0))
                stack.callback(socks[-1].close)
            # Replicas sit behind a deployment's gateway, which checks feedback ids against its answers.
            answered = None if replicas else AnsweredIds(parts=workers)
            relay = None
            if not replicas and workers > 1:
                relay = Relay(workers)
                stack.callback(relay.close)
            plane = DataPlane(specs, settings, threads=threads, answered=answered, behind_router=bool(replicas),
                              relay=relay)
            with _Loading(socks):
                plane.load()
            failed = [m.failure for m in plane.models.values() if m.failure]
            if len(failed) == 1:
                raise failed[0]
            if failed:
                raise ModelLoadError("; ".join(f"{m.name}: {m.failure}" for m in plane.models.values() if m.failure))
            app = create_app(plane, max_body_bytes=max_body_bytes, load=False)
            if watched is not None and os.getppid() != watched:
                log.warning("parent process %d died while the models loaded; stopping", watched)
                return
            if replicas:
                slots = [_Slot(i, sock, _replica_metrics_dir(i)) for i, sock in enumerate(socks)]
                ports = [sock.getsockname()[1] for sock in socks]
                _supervise(app, slots, log_level, state_file, watched,
                           None if on_ready is None else lambda: on_ready(ports))
                return
            if on_ready is not None:
                on_ready(socks[0].getsockname()[1])
            if workers == 1:
                if watched is not None:
                    _watch_parent(watched)
                _run_uvicorn(app, socks[0], log_level)
            else:
                def in_worker(index: int) -> None:
                    if answered is not None:
                        answered.use_part(index)
                    if relay is not None:
                        relay.use_part(index)

                _supervise(app, [_Slot(i, socks[0]) for i in range(workers)], log_level, parent=watched,
                           in_worker=in_worker, also_listening=relay.listeners if relay is not None else ())
    finally:
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            metrics_dir.remove()


def _clear_metrics_dir(path: str) -> None:
    """Empty a multiprocess metrics folder given by the environment (made if missing) before serving from it.

    What an earlier server left there would be added to this one's figures: its counts to the new counters
    (a restarted server reporting twice the requests it answered), and the in-flight requests of one killed
    mid-request forever. The folder is this server's alone: two servers sharing one would add up each other's.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    disown(path)  # a killed server's scratch folder, given again: this server's now, whatever a sweep finds
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    for replica in folder.glob("replica-*"):
        if replica.is_dir():
            shutil.rmtree(replica, ignore_errors=True)


def _replica_metrics_dir(index: int) -> str | None:
    """Replica `index`'s own metrics folder, so its `/metrics` counts its requests only (and survives restarts)."""
    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not base:
        return None
    folder = Path(base) / f"replica-{index}"
    folder.mkdir(exist_ok=True)
    return str(folder)
