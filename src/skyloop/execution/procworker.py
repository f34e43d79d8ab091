"""The code that runs inside a `local` worker process: take launches from the pipe, run them, answer.

The parent starts the worker with `BOOT` (see `skyloop.execution.backends._worker_process`), which
copies the parent's `sys.path` and calls `serve`. This module is imported by every worker before its
first task, so it imports only the standard library at module level; `skyloop.execution.worker` (and
with it pydantic and fsspec) is imported once the process is up, and step code on first use.

The protocol on the connection: the worker sends `(READY, rss)` once it can take work (`rss`: its
idle resident size in bytes, `None` where unknown, the baseline of memory limits), then for every
`TaskLaunch` it receives it sends one `TaskResult`; `None` (or end of file) asks it to exit.

Processes a step started end with its attempt: before the worker answers, it kills and reaps those
still running (`end_leftovers`), so that the next attempt on the worker is measured and logged alone.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import functools
import os
import pickle
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyloop.execution.tasks import TaskLaunch, TaskResult
    from skyloop.store.artifacts import ArtifactStore

__all__ = ["READY", "UNREADABLE", "PeakMemory", "StepOutput", "descendants", "drop_spare", "drop_spares",
           "end_leftovers", "kill_descendants", "read_small", "scoped_environ", "serve", "stop_then_kill",
           "wait_gone"]

READY = "ready"
"""Sent as `(READY, rss)` once the worker has imported what it needs and waits for launches."""
UNREADABLE = "unreadable"
"""Sent as `(UNREADABLE, error, traceback)` for a launch the worker cannot unpickle."""

_PARENT_POLL_SECONDS = 0.5
_EXIT_POLL_SECONDS = 0.05
_LEFTOVER_GRACE_SECONDS = 2.0  # how long a worker waits for killed leftovers to die before it answers
_PR_SET_CHILD_SUBREAPER = 36  # prctl(2), Linux 3.4+
_STOP_ROUNDS = 100  # how many generations `stop_then_kill` stops before it kills what it found
# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


@contextlib.contextmanager
def scoped_environ(env: dict[str, str]) -> Iterator[None]:
    """Overlay `env` on `os.environ` for the block, then put back what was there."""
    if not env:
        yield
        return
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class PeakMemory:
    """Peak resident memory of this process (and its waited-for children) during a stretch of work.

    On Linux, writing `5` to `/proc/self/clear_refs` resets the kernel's high-water mark (`VmHWM`),
    so the peak is exact per task and costs two small file operations. Elsewhere the lifetime
    `ru_maxrss` is the best available figure (an upper bound).
    """

    def __init__(self) -> None:
        self._children_before = 0
        # Kept open: procfs regenerates the text on every read from offset 0.
        self._clear_fd: int | None = None
        self._status_fd: int | None = None
        with contextlib.suppress(OSError):
            self._status_fd = os.open("/proc/self/status", os.O_RDONLY)
            self._clear_fd = os.open("/proc/self/clear_refs", os.O_WRONLY)

    def reset(self) -> None:
        """Start a new measurement."""
        self._children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if self._clear_fd is not None:
            try:
                os.write(self._clear_fd, b"5")
            except OSError:
                self._clear_fd = None

    def peak(self) -> int:
        """Bytes: the largest resident size seen since `reset`."""
        own = self._hwm() if self._clear_fd is not None else None
        if own is None:
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # The children's figure is a lifetime maximum too: it only says something if it grew.
        if children > self._children_before:
            own = max(own, children * _MAXRSS_UNIT)
        return own

    def _hwm(self) -> int | None:
        # Not ru_maxrss: after a vfork-based exec that also counts the parent's peak.
        if self._status_fd is None:
            return None
        status = os.pread(self._status_fd, 8192, 0)
        start = status.find(b"VmHWM:")
        if start < 0:
            return None
        return int(status[start + 6:status.index(b"kB", start)]) * 1024


class _Runner:
    """Runs launches in this process with their logs, environment and memory accounted for."""

    def __init__(self) -> None:
        from skyloop.execution.worker import execute
        from skyloop.store.artifacts import ArtifactStore

        self._execute = execute
        self._store_type = ArtifactStore
        self._stores: dict[str, ArtifactStore] = {}
        self._memory = PeakMemory()
        # The worker's own stdout/stderr and folder, put back after each task.
        self.output = StepOutput((os.dup(1), os.dup(2)))
        self._cwd = os.open(".", os.O_RDONLY)

    def run(self, launch: TaskLaunch) -> TaskResult:
        """Run one attempt; step errors become a FAILED result, never an exception."""
        try:
            store = self._stores.get(launch.artifacts_url)
            if store is None:
                store = self._stores[launch.artifacts_url] = self._store_type(launch.artifacts_url)
            with self.output.capture(launch.log_path), scoped_environ(launch.env):
                self._memory.reset()
                try:
                    result = self._execute(launch, store)
                finally:  # while its output still goes to this attempt's log
                    end_leftovers()
                result.max_rss = self._memory.peak()
        except BaseException as exc:  # a step calling sys.exit() must not end the worker
            return _failed(launch, exc)
        finally:
            os.fchdir(self._cwd)  # a step's os.chdir() must not move the next task
        return result

class StepOutput:
    """Sends file descriptors 1 and 2 of this process to an attempt's log file while it runs.

    File descriptors, not sys.stdout: output of C extensions and child processes lands too. The file
    is named as the attempt's log from its start (it can be followed while the step runs, and a
    worker that dies leaves what it printed there), but a quiet attempt leaves no file: its file is
    renamed back to this process's spare (`.spare-PID`, in the folder of the last log) and named as
    the next attempt's log. Renaming is cheap where creating a file is not (on some filesystems, for
    some folders, creating one costs up to a millisecond: more than the whole orchestration of a
    small step), so a warm worker creates files only for attempts that print.

    A worker that exits removes its spare; one that cannot (killed, or ended by Ray) leaves it to whoever
    sees it gone: `drop_spare`.
    """

    def __init__(self, saved_fds: tuple[int, int]) -> None:
        self.saved_fds = saved_fds
        """The worker's own stdout and stderr, put back after each attempt."""
        self._made: set[str] = set()
        """Folders already created."""
        self._spare: tuple[str, int, str] | None = None
        """An empty file to name as the next log: its path, a descriptor open on it for appending, and the
        log it was (where it goes back to if something, say a step's child process, wrote to it since)."""
        atexit.register(self.remove_spare)

    @contextlib.contextmanager
    def capture(self, log_path: str) -> Iterator[None]:
        """Send descriptors 1 and 2 to `log_path` (appending) for the block, then back."""
        folder = os.path.dirname(log_path)
        if folder and folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        fd = self._open(log_path)
        stdout, stderr = sys.stdout, sys.stderr
        _flush(stdout, stderr)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            yield
        finally:
            _flush(sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = stdout, stderr  # a step may have replaced them
            os.dup2(self.saved_fds[0], 1)
            os.dup2(self.saved_fds[1], 2)
            self._close(log_path, fd)

    def _open(self, log_path: str) -> int:
        spare, self._spare = self._spare, None
        if spare is not None:
            path, fd, was = spare
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size > 0:  # written after its attempt ended: it is that attempt's log
                    if not os.path.exists(was):
                        os.rename(path, was)
                elif not os.path.exists(log_path):  # an attempt's log is new; never replace one
                    os.rename(path, log_path)
                    return fd
            os.close(fd)
            with contextlib.suppress(OSError):
                if os.path.exists(path) and os.stat(path).st_size == 0:
                    os.unlink(path)
        return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _close(self, log_path: str, fd: int) -> None:
        spare = _spare_path(log_path, os.getpid())
        try:
            if os.fstat(fd).st_size == 0:
                os.rename(log_path, spare)
                self._spare = (spare, fd, log_path)
                return
        except OSError:  # the log's folder is gone, or read-only: it stays as it is
            pass
        os.close(fd)

    def remove_spare(self) -> None:
        """Remove the spare file (or name it as the log it was, if something wrote to it since)."""
        if self._spare is not None:
            path, fd, was = self._spare
            self._spare = None
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size > 0 and not os.path.exists(was):
                    os.rename(path, was)
                else:
                    os.unlink(path)


def _spare_path(log_path: str, pid: int) -> str:
    return os.path.join(os.path.dirname(log_path), f".spare-{pid}")


def drop_spare(pid: int, log_path: str) -> None:
    """Remove the spare file (see `StepOutput`) that worker process `pid`, which has exited, may have left
    beside `log_path` (the log of an attempt it ran); one that something wrote to since (a process its
    step started) is not removed but named as that log, unless that exists.

    Only for a process known to have exited: a live worker names its spare as its next attempt's log.
    """
    spare = _spare_path(log_path, pid)
    with contextlib.suppress(OSError):
        if os.stat(spare).st_size == 0:
            os.unlink(spare)
        elif not os.path.exists(log_path):
            os.rename(spare, log_path)


def drop_spares(logs: dict[int, str], grace: float = 0.0) -> None:
    """`drop_spare` for each process in `logs` (its id -> the log of the last attempt it ran) that has
    exited, waiting up to `grace` seconds for those still running; the rest keep their spares."""
    deadline = time.monotonic() + grace
    waiting = dict(logs)
    while waiting:
        for pid in [pid for pid in waiting if not _running(pid)]:
            drop_spare(pid, waiting.pop(pid))
        if not waiting or time.monotonic() >= deadline:
            return
        time.sleep(_EXIT_POLL_SECONDS)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for process `pid` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_EXIT_POLL_SECONDS)
    return True


def descendants(pid: int) -> list[int]:
    """Process ids of the children of `pid`, their children and so on (empty if it is gone).

    Linux lists each thread's children in `/proc/PID/task/TID/children`: reading those costs
    microseconds, where psutil scans every process on the machine (milliseconds).
    """
    if not _has_children_files():
        import psutil

        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                kids = [int(text) for text in read_small(f"/proc/{parent}/task/{tid}/children").split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def kill_descendants(pid: int) -> list[int]:
    """SIGKILL every descendant of process `pid` (not `pid` itself), wherever its process group; their ids.

    A step's helper may have left the worker's process group (`start_new_session=True`, a daemon), so
    killing the group is not enough. The caller stops `pid` itself first if it may still start processes
    (`WorkerProcess.kill` stops the worker's group).
    """
    return stop_then_kill(lambda seen: descendants(pid))


def stop_then_kill(find: Callable[[list[int]], list[int]]) -> list[int]:
    """SIGKILL the processes `find` names; their ids. `find` is asked again (with those found so far) after
    each generation it named is stopped (SIGSTOP), until it names no new one: a stopped process starts no
    other, so none slips out between the reading and the kill. SIGKILL also ends a stopped process."""
    found: list[int] = []
    try:
        for _ in range(_STOP_ROUNDS):
            fresh = [p for p in dict.fromkeys(find(found)) if p not in found]
            if not fresh:
                break
            for p in fresh:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGSTOP)
            found += fresh
    finally:
        for p in found:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
    return found


def end_leftovers(grace: float = _LEFTOVER_GRACE_SECONDS) -> int:
    """SIGKILL every process this one started (and theirs) that still runs, and reap them; how many.

    A worker calls it after each attempt: a process a step left running (a helper server, a
    background job) must not be counted against the next attempt's memory nor write into its log.
    Only descendants of this process are touched, never itself, its parent or other workers. In a
    worker (a child subreaper on Linux) an orphan whose parent is killed here is adopted and found in
    the next round. Gives up after `grace` seconds on processes that do not die (stuck in the kernel);
    they are reaped after a later attempt. A handle the step kept (`subprocess.Popen`) sees them gone.
    """
    if not _reap_children():
        return 0  # no child, so no descendant: the usual case costs one waitpid
    ended: set[int] = set()
    deadline = time.monotonic() + grace
    while True:
        found = descendants(os.getpid())
        if not found:
            _reap_children()
            return len(ended)
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        ended.update(found)
        left = _reap_children()
        if time.monotonic() >= deadline:
            return len(ended)
        if left:
            time.sleep(0.001)


def _reap_children() -> bool:
    """Reap the children that have exited; whether any child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _adopt_orphans() -> None:
    """Make this process adopt its orphaned descendants (Linux), so that `end_leftovers` finds them."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(Exception):  # no libc to ask, or an old kernel: orphans go to init
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), ctypes.c_ulong(0),
                                ctypes.c_ulong(0), ctypes.c_ulong(0))


def read_small(path: str) -> bytes:
    """The first 64 KiB of a small file such as `/proc/PID/statm`.

    os.open rather than open(): no buffered file object, about half the cost per small file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


@functools.cache
def _has_children_files() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")  # CONFIG_PROC_CHILDREN


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: the id was taken again
        pass
    return True


def _flush(*streams: Any) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):  # a closed or None stream left by the step
            stream.flush()


def _failed(launch: TaskLaunch, exc: BaseException) -> TaskResult:
    import traceback

    from skyloop.execution.tasks import TaskResult, TaskState

    return TaskResult(key=launch.key, state=TaskState.FAILED, error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(), ended_at=time.time())


def _resident() -> int | None:
    """This process's resident size in bytes (Linux), read before any task could add to it."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def _leave() -> None:
    """Exit when asked to, skipping the interpreter's teardown (about 0.3 s with skyloop loaded)."""
    atexit._run_exitfuncs()  # hooks that steps registered still run
    _flush(sys.stdout, sys.stderr)
    os._exit(0)


def _die() -> None:
    """Exit now, taking along every process the step started: its descendants, also those that left the
    worker's process group, then the group the worker leads."""
    kill_descendants(os.getpid())
    if os.getpgrp() == os.getpid():
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    # A thread rather than PR_SET_PDEATHSIG: that fires when the parent *thread* that started us
    # exits, and the orchestrator may start workers from a short-lived thread.
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                _die()
            time.sleep(_PARENT_POLL_SECONDS)

    threading.Thread(target=watch, name="skyloop-parent-watch", daemon=True).start()


def serve(conn: Connection, parent_pid: int) -> None:
    """The worker's main loop: run each launch received on `conn` until told to stop."""
    _watch_parent(parent_pid)
    _adopt_orphans()
    faulthandler.enable()  # a segfaulting step leaves its traceback in its log (fd 2)
    runner = _Runner()
    try:
        conn.send((READY, _resident()))
        while True:
            data = conn.recv_bytes()
            try:
                launch = pickle.loads(data)
            except Exception as exc:  # e.g. a parameter of a class that only the parent's __main__ has
                import traceback

                error = f"the worker cannot read the launch: {type(exc).__name__}: {exc}"
                conn.send((UNREADABLE, error, traceback.format_exc()))
                continue
            if launch is None:
                _leave()
            conn.send(runner.run(launch))
    except (EOFError, OSError):  # the parent closed the pipe or went away: it will not tidy up after us
        runner.output.remove_spare()
        _die()
