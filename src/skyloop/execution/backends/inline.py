"""The `inline` backend: each attempt runs in the orchestrator's own process, at once (for debugging).

No isolation: a step that crashes the interpreter takes the orchestrator with it, and module state
leaks between steps. Timeouts work only on the main thread on Unix (they use `SIGALRM`).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from types import FrameType

import psutil

from skyloop.execution.procworker import scoped_environ
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.execution.worker import execute
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore

__all__ = ["InlineBackend"]


class _TimedOut(BaseException):
    """Raised into the step by SIGALRM; a BaseException so that `execute` does not catch it."""


@contextlib.contextmanager
def _alarm(timeout: float | None) -> Iterator[None]:
    """Raise `_TimedOut` in the block after `timeout` seconds, where signals allow it."""
    if (timeout is None or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, on_alarm)
    armed = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-6))
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
            if outer_delay > 0:  # put back a timer the caller had set, less the time spent here
                remaining = max(outer_delay - (time.monotonic() - armed), 1e-6)
                signal.setitimer(signal.ITIMER_REAL, remaining, outer_interval)


@contextlib.contextmanager
def _captured(log_path: str) -> Iterator[None]:
    """Send `sys.stdout` and `sys.stderr` to the log file for the block (Python-level output only).

    Output is buffered and the file written only when there is some: creating a file per step costs
    more than running a small step in-process.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        text = buffer.getvalue()
        if text:
            folder = os.path.dirname(log_path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(text)


class InlineBackend:
    """Runs each attempt in this process as soon as it is submitted."""

    name = "inline"

    def __init__(self, capacity: Resources | None = None, custom: dict[str, float] | None = None) -> None:
        self._capacity = capacity
        self._custom = dict(custom or {})
        self._stores: dict[str, ArtifactStore] = {}
        self._done: list[TaskResult] = []

    def start(self) -> None:
        """Nothing to start."""

    def capacity(self) -> Resources:
        """The given capacity, or this machine's CPUs and memory (no GPUs; the custom resources given)."""
        if self._capacity is None:
            self._capacity = Resources(cpus=float(os.cpu_count() or 1),
                                       memory=psutil.virtual_memory().total, gpus=0, custom=self._custom)
        return self._capacity

    def submit(self, launch: TaskLaunch) -> None:
        """Run the attempt now; its result waits for the next `wait`."""
        self._done.append(self._run(launch))

    def wait(self, timeout: float) -> list[TaskResult]:
        """The results of every attempt submitted since the last call.

        Blocks only when there are none: then nothing runs, so it sleeps out `timeout` (a caller
        waiting for a retry delay does not spin).
        """
        if not self._done:
            time.sleep(max(0.0, timeout))
        done, self._done = self._done, []
        return done

    def cancel(self, key: str) -> None:
        """Nothing to do: every attempt has ended by the time `submit` returns."""

    def shutdown(self) -> None:
        """Forget the cached artifact stores."""
        self._stores.clear()

    def _run(self, launch: TaskLaunch) -> TaskResult:
        started = time.time()
        try:
            store = self._stores.get(launch.artifacts_url)
            if store is None:
                store = self._stores[launch.artifacts_url] = ArtifactStore(launch.artifacts_url)
            with _captured(launch.log_path), scoped_environ(launch.env), _alarm(launch.timeout):
                result = execute(launch, store)
        except _TimedOut:
            result = TaskResult(key=launch.key, state=TaskState.TIMED_OUT,
                                error=f"timed out after {launch.timeout:g}s")
        except (Exception, SystemExit) as exc:  # a step's sys.exit() must not end the orchestrator
            result = TaskResult(key=launch.key, state=TaskState.FAILED, error=f"{type(exc).__name__}: {exc}",
                                traceback=traceback.format_exc())
        result.started_at = result.started_at or started
        result.ended_at = result.ended_at or time.time()
        result.worker = f"inline:{os.getpid()}"
        return result
