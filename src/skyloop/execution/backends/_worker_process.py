"""One `local` worker process as the parent sees it: how it is started, watched, killed and reaped.

Workers are started as `python -c BOOT` and talk over a `multiprocessing` connection on a socket
pair, rather than through `multiprocessing`'s spawn or forkserver start methods: those re-import the
caller's `__main__` in every worker (re-running a pipeline script that lacks a main guard) and leave
a resource-tracker or fork-server process behind. Each worker leads its own process group.

A worker that is killed (timeout, cancel, memory, shutdown) takes along every process its step
started: its group, and its descendants that left the group (a helper started in a session of its
own). A worker that dies by itself leaves those to init; `end_strays` finds them by a variable
that each worker and what it starts inherit. Unix only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready

import psutil

from skyloop.errors import BackendError
from skyloop.execution.backends.limits import DEVICES_VAR, MemoryWatch
from skyloop.execution.procworker import descendants, drop_spare, kill_descendants, stop_then_kill
from skyloop.execution.tasks import TaskLaunch

__all__ = ["BOOT", "TAG_VAR", "WorkerProcess"]

BOOT = """\
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
sys.path[:] = conn.recv()
from skyloop.execution.procworker import serve
serve(conn, int(sys.argv[2]))
"""
"""What a worker process runs: `python -c BOOT <connection fd> <parent pid>`."""

TAG_VAR = "SKYLOOP_WORKER_TAG"
"""Set in each worker's environment to a value of its own, which the processes its steps start inherit."""



@dataclass(eq=False)
class WorkerProcess:
    """A worker process, its connection, and the task it runs (if any)."""

    proc: subprocess.Popen[bytes]
    conn: Connection
    pidfd: int | None
    """Readable once the process has exited (Linux 5.3+); else its end of the connection tells."""
    spawned: float
    ready: bool = False
    """Whether it has said READY (its imports are done)."""
    launch: TaskLaunch | None = None
    started: float = 0.0
    """Wall-clock time its current task started (or was handed over)."""
    deadline: float | None = None
    """Monotonic time by which it must be up (while booting) or its task done."""
    used: bool = False
    devices: str | None = None
    """The `CUDA_VISIBLE_DEVICES` of its first task, which it keeps (CUDA binds devices once)."""
    gpu_ids: tuple[int, ...] = ()
    """Device ids its current task holds from the backend's pool."""
    watch: MemoryWatch | None = None
    """The memory watch of its current task, if that task asked for memory."""
    idle_rss: int | None = None
    """Its resident size when it said READY (idle), until a task's watch takes it as baseline."""
    tag: str = ""
    """Its value of `TAG_VAR`."""
    logs: tuple[str, ...] = ()
    """The logs of its last two launches: it keeps its spare log file beside one of them (beside the one
    before when it could not read the last), which `reap` removes should the worker not (see `StepOutput`)."""

    @classmethod
    def spawn(cls) -> WorkerProcess:
        """Start a worker process; it takes launches as soon as it has booted."""
        parent_end, child_end = socket.socketpair()
        tag = secrets.token_hex(8)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(child_end.fileno()), str(os.getpid())],
                pass_fds=(child_end.fileno(),), process_group=0, stdin=subprocess.DEVNULL,
                env={**os.environ, TAG_VAR: tag},
            )
        except OSError as exc:
            parent_end.close()
            raise BackendError(f"cannot start a local worker process: {exc}") from exc
        finally:
            child_end.close()
        conn = Connection(parent_end.detach())
        pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # os.pidfd_open: Linux 5.3+ only
            pidfd = os.pidfd_open(proc.pid)
        with contextlib.suppress(OSError):  # a worker that died at once shows up as crashed
            conn.send(sys.path)
        return cls(proc, conn, pidfd, spawned=time.monotonic(), tag=tag)

    @property
    def name(self) -> str:
        """How results name the worker: `local:<pid>`."""
        return f"local:{self.proc.pid}"

    @property
    def handles(self) -> list[Connection | int]:
        """What `multiprocessing.connection.wait` watches: a message, or the process's end."""
        return [self.conn] if self.pidfd is None else [self.conn, self.pidfd]

    def alive(self) -> bool:
        """Whether the process still runs, asked without reaping it."""
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def accepts(self, launch: TaskLaunch) -> bool:
        """Whether the launch may run here: CUDA picks its devices once per process."""
        return not self.used or self.devices == launch.env.get(DEVICES_VAR)

    def assign(self, launch: TaskLaunch) -> None:
        """Make `launch` this worker's task (the caller sends it)."""
        self.launch, self.used, self.devices = launch, True, launch.env.get(DEVICES_VAR)
        self.logs = (*self.logs[-1:], launch.log_path)

    def send(self, message: TaskLaunch | None) -> None:
        """Send a launch, or `None` to ask the worker to exit; a dead worker is noticed elsewhere."""
        with contextlib.suppress(OSError):
            self.conn.send(message)

    def send_bytes(self, payload: bytes) -> None:
        """Send a launch pickled already; a dead worker is noticed elsewhere."""
        with contextlib.suppress(OSError):
            self.conn.send_bytes(payload)

    def kill(self) -> None:
        """SIGKILL the process group and every descendant, while the worker is unreaped (the ids surely ours).

        The group is stopped first, so that the step starts nothing while its descendants are gathered
        (see `kill_descendants`); those include processes that left the group, which its kill would miss.
        """
        if self.proc.returncode is None:
            try:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGSTOP)
                kill_descendants(self.proc.pid)
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)

    def end_strays(self) -> list[int]:
        """SIGKILL what this worker's steps left running when the worker died by itself; their ids.

        Those processes were adopted elsewhere (by init) when it died, so they are no longer its
        descendants: they are found by this worker's `TAG_VAR` in their environment, stopped until no
        more show, then killed with their own descendants. A process started with an environment that
        leaves the variable out is missed. Reads the environment of every process the user may read,
        milliseconds: only for a worker that died while running a step.
        """
        entry = f"{TAG_VAR}={self.tag}".encode()
        return stop_then_kill(lambda found: [*(pid for pid in _tagged(entry) if pid != self.proc.pid),
                                             *(child for pid in found for child in descendants(pid))])

    def reap(self, grace: float) -> None:
        """Give the process `grace` seconds to exit, kill its group, reap it and close its handles.

        The group is killed while the worker is still a zombie, so its id cannot have been reused:
        that also ends whatever its steps left running, and makes sure that the spare log file named
        after that id, which a worker that did not exit by itself (killed, crashed) leaves, is its own.
        """
        if self.pidfd is not None:
            wait_ready([self.pidfd], grace)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()
        with contextlib.suppress(ChildProcessError):  # dead, not reaped: the id in the spare's name is its own
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            for log in reversed(self.logs):
                drop_spare(self.proc.pid, log)
        self.proc.wait()
        self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def exit_message(self) -> str:
        """`worker process 1234 died with exit code -9 (signal SIGKILL)`."""
        pid, code = self.proc.pid, self.proc.returncode
        if code is None:
            return f"worker process {pid} was lost"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"worker process {pid} died with exit code {code} (signal {signal.Signals(-code).name})"
        return f"worker process {pid} died with exit code {code}"


def _tagged(entry: bytes) -> list[int]:
    """Ids of the processes whose environment holds `entry` (`NAME=value`), among those the user may read."""
    if not os.path.isdir("/proc/self"):  # macOS: psutil asks the kernel for each process
        name, _, value = entry.decode().partition("=")
        pids = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(name) == value:
                    pids.append(proc.pid)
        return pids
    needle = b"\0" + entry + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                block = _read_all(f"/proc/{name}/environ")
            except OSError:  # gone, or someone else's
                continue
            if needle in b"\0" + block + b"\0":
                found.append(int(name))
    return found


def _read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
