"""The `local` backend: step attempts run in a pool of warm worker processes on this machine.

Workers are started as `python -c BOOT` and talk over a `multiprocessing` connection on a socket
pair, rather than through `multiprocessing`'s spawn or forkserver start methods: those re-import the
caller's `__main__` in every worker (re-running a pipeline script that lacks a main guard) and leave
a resource-tracker or fork-server process behind. Each worker leads its own process group, so a
timeout, a cancel or `shutdown` also ends the processes its step started. Unix only.

The backend is driven by one thread (the orchestrator's scheduler); it is not thread-safe.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from types import TracebackType

import psutil

from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.procworker import READY
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.spec.resources import Resources

__all__ = ["BOOT", "LocalBackend"]

BOOT = """\
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
sys.path[:] = conn.recv()
from skyloop.execution.procworker import serve
serve(conn, int(sys.argv[2]))
"""
"""What a worker process runs: `python -c BOOT <connection fd> <parent pid>`."""

_BOOT_SECONDS = 60.0  # a worker that is not up by then is reported as crashed
_EXIT_GRACE_SECONDS = 1.0  # how long a dying or stopping worker gets before SIGKILL
_DEVICES = "CUDA_VISIBLE_DEVICES"


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    pidfd: int | None
    spawned: float
    ready: bool = False
    launch: TaskLaunch | None = None
    started: float = 0.0
    deadline: float | None = None
    """Monotonic time by which the worker must be up (while booting) or the task done."""
    used: bool = False
    devices: str | None = None

    @property
    def name(self) -> str:
        return f"local:{self.proc.pid}"

    def alive(self) -> bool:
        # Without reaping it: the process group id stays ours until `_reap` has killed the group.
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def accepts(self, launch: TaskLaunch) -> bool:
        # CUDA picks its devices once per process: a worker keeps the devices of its first task.
        return not self.used or self.devices == launch.env.get(_DEVICES)


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group; only before it is reaped, when the group id is surely ours."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _exit_message(pid: int, code: int | None) -> str:
    if code is None:
        return f"worker process {pid} was lost"
    if code < 0:
        try:
            return f"worker process {pid} died with exit code {code} (signal {signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"worker process {pid} died with exit code {code}"


class LocalBackend:
    """Runs each attempt in a warm worker process, growing the pool up to `max_workers`."""

    name = "local"

    def __init__(self, settings: ExecutionSettings) -> None:
        self._capacity = Resources(
            cpus=settings.max_cpus if settings.max_cpus is not None else float(os.cpu_count() or 1),
            memory=settings.max_memory if settings.max_memory is not None else psutil.virtual_memory().total,
            gpus=settings.max_gpus or 0,
        )
        self.max_workers: int = settings.max_workers or max(1, math.ceil(self._capacity.cpus))
        """Most worker processes alive at once; launches beyond them wait in a queue."""
        self._idle: list[_Worker] = []
        self._busy: dict[str, _Worker] = {}
        self._owners: dict[object, _Worker] = {}  # connection or pidfd -> its worker
        self._queue: deque[TaskLaunch] = deque()
        self._done: list[TaskResult] = []
        self._started = False

    def __enter__(self) -> LocalBackend:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def start(self) -> None:
        """Start one worker so that the first launch finds it warm (more start on demand)."""
        if not self._started:
            self._started = True
            self._idle.append(self._spawn())

    def capacity(self) -> Resources:
        """The settings' limits, or this machine's CPUs and memory (and no GPUs)."""
        return self._capacity

    def pids(self) -> list[int]:
        """Process ids of the live workers, idle and busy."""
        return [worker.proc.pid for worker in [*self._idle, *self._busy.values()]]

    def submit(self, launch: TaskLaunch) -> None:
        """Hand the launch to an idle worker, a new one, or queue it while the pool is full."""
        if launch.key in self._busy:
            raise ValueError(f"task {launch.key!r} is already running")
        if not self._started:
            self.start()
        self._queue.append(launch)
        self._dispatch()

    def wait(self, timeout: float) -> list[TaskResult]:
        """Results that are in, waiting up to `timeout` seconds for one while any task runs."""
        end = time.monotonic() + max(0.0, timeout)
        while not self._done and self._busy:
            now = time.monotonic()
            limit = min([end, *(w.deadline for w in self._busy.values() if w.deadline is not None)])
            handles: list[Connection | int] = []
            for worker in self._busy.values():
                handles.append(worker.conn)
                if worker.pidfd is not None:
                    handles.append(worker.pidfd)
            for handle in wait_ready(handles, max(0.0, limit - now)):
                owner = self._owners.get(handle)
                if owner is not None:
                    readable = isinstance(handle, Connection)
                    self._collect(owner, exited=not readable, readable=readable)
            self._expire(time.monotonic())
            self._dispatch()
            if time.monotonic() >= end:
                break
        done, self._done = self._done, []
        return done

    def cancel(self, key: str) -> None:
        """Drop the launch from the queue, or kill the worker running it; reports CANCELLED."""
        for launch in self._queue:
            if launch.key == key:
                self._queue.remove(launch)
                self._done.append(TaskResult(key=key, state=TaskState.CANCELLED,
                                             error="cancelled before it started", ended_at=time.time()))
                return
        worker = self._busy.get(key)
        if worker is None:
            return
        self._collect(worker, exited=False)  # a result already sent wins over the cancel
        if worker.launch is not None and worker.launch.key == key:
            self._reap(worker, kill=True)
            self._done.append(self._ended(worker, key, TaskState.CANCELLED, "cancelled"))
        self._dispatch()

    def shutdown(self) -> None:
        """Stop every worker (politely if idle, SIGKILL if busy) and reap them; safe to repeat."""
        workers = [*self._idle, *self._busy.values()]
        self._queue.clear()
        for worker in workers:
            if worker.launch is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            else:
                _killpg(worker.proc)
        for worker in workers:
            self._reap(worker, kill=False)
        self._started = False

    # -- the pool ------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_end, child_end = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(child_end.fileno()), str(os.getpid())],
                pass_fds=(child_end.fileno(),), process_group=0, stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent_end.close()
            raise BackendError(f"cannot start a local worker process: {exc}") from exc
        finally:
            child_end.close()
        conn = Connection(parent_end.detach())
        pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # Linux 5.3+ only
            pidfd = os.pidfd_open(proc.pid)
        worker = _Worker(proc, conn, pidfd, spawned=time.monotonic())
        self._owners[conn] = worker
        if pidfd is not None:
            self._owners[pidfd] = worker
        with contextlib.suppress(OSError):  # a worker that died at once shows up as crashed
            conn.send(sys.path)
        return worker

    def _take_worker(self, launch: TaskLaunch) -> _Worker | None:
        for worker in reversed(self._idle):  # the most recently used is the warmest
            if worker.accepts(launch):
                if worker.alive():
                    self._idle.remove(worker)
                    return worker
                self._reap(worker, kill=True)  # died while idle
                return self._take_worker(launch)
        if len(self._idle) + len(self._busy) >= self.max_workers:
            if not self._idle:
                return None
            self._stop_idle(self._idle[0])  # pinned to other GPUs: make room for a fresh worker
        return self._spawn()

    def _stop_idle(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.conn.send(None)
        self._reap(worker, kill=False)

    def _dispatch(self) -> None:
        while self._queue:
            worker = self._take_worker(self._queue[0])
            if worker is None:
                return
            launch = self._queue.popleft()
            worker.launch, worker.used, worker.devices = launch, True, launch.env.get(_DEVICES)
            self._busy[launch.key] = worker
            if not worker.ready and worker.conn.poll():
                self._collect(worker, exited=False)  # its READY is probably waiting
                if worker.launch is not launch:
                    continue
            self._arm(worker)
            with contextlib.suppress(OSError):  # a dead worker is noticed by `wait`
                worker.conn.send(launch)

    def _arm(self, worker: _Worker) -> None:
        """Start the clock of the worker's task: its timeout counts from when the worker is up."""
        assert worker.launch is not None
        worker.started = time.time()
        if not worker.ready:
            worker.deadline = worker.spawned + _BOOT_SECONDS
        elif worker.launch.timeout is not None:
            worker.deadline = time.monotonic() + worker.launch.timeout
        else:
            worker.deadline = None

    # -- ends of tasks ---------------------------------------------------------------------------

    def _collect(self, worker: _Worker, exited: bool, readable: bool = False) -> None:
        """Read what the worker sent; if it has gone, report its task as crashed."""
        try:
            while readable or worker.conn.poll():
                readable = False
                message = worker.conn.recv()
                if isinstance(message, TaskResult):
                    self._finish(worker, message)
                    break  # nothing more comes before its next launch; an exit shows on the sentinel
                if message == READY:
                    worker.ready = True
                    if worker.launch is not None:
                        self._arm(worker)
        except (EOFError, OSError):
            exited = True
        if exited:
            launch = worker.launch
            self._reap(worker, kill=False)
            if launch is not None:
                error = _exit_message(worker.proc.pid, worker.proc.returncode)
                self._done.append(self._ended(worker, launch.key, TaskState.CRASHED, error))

    def _finish(self, worker: _Worker, result: TaskResult) -> None:
        if worker.launch is None or worker.launch.key != result.key:
            return
        del self._busy[result.key]
        worker.launch, worker.deadline = None, None
        result.worker = worker.name
        self._idle.append(worker)
        self._done.append(result)

    def _expire(self, now: float) -> None:
        for worker in [w for w in self._busy.values() if w.deadline is not None and w.deadline <= now]:
            self._collect(worker, exited=False)  # a result that came in just in time wins
            launch = worker.launch
            if launch is None or worker.deadline is None or worker.deadline > now:
                continue
            self._reap(worker, kill=True)
            if worker.ready:
                state, error = TaskState.TIMED_OUT, f"timed out after {launch.timeout:g}s"
            else:
                state, error = TaskState.CRASHED, f"worker process {worker.proc.pid} did not start in time"
            self._done.append(self._ended(worker, launch.key, state, error))

    def _ended(self, worker: _Worker, key: str, state: TaskState, error: str) -> TaskResult:
        return TaskResult(key=key, state=state, error=error, started_at=worker.started,
                          ended_at=time.time(), worker=worker.name)

    def _reap(self, worker: _Worker, kill: bool) -> None:
        """Forget the worker, wait for it to exit (killing it if asked or if it lingers), reap it.

        Its process group is killed while the worker is still a zombie, so the group id cannot have
        been reused: that also ends whatever its steps left running.
        """
        if worker.launch is not None:
            self._busy.pop(worker.launch.key, None)
        if worker in self._idle:
            self._idle.remove(worker)
        self._owners.pop(worker.conn, None)
        if kill:
            _killpg(worker.proc)
        if worker.pidfd is not None:
            self._owners.pop(worker.pidfd, None)
            wait_ready([worker.pidfd], _EXIT_GRACE_SECONDS)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(_EXIT_GRACE_SECONDS)
        if worker.proc.returncode is None:
            _killpg(worker.proc)
            worker.proc.wait()
        worker.conn.close()
        if worker.pidfd is not None:
            os.close(worker.pidfd)
            worker.pidfd = None
