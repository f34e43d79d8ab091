"""The code that runs inside a Ray worker process for the `ray` backend: one step attempt per Ray task.

Ray reuses its worker processes, so everything an attempt changes in the process is put back when
it ends: file descriptors 1 and 2 (sent to the step's log for the attempt), the environment, the
working folder. `ray` is imported only here and in `ray.py`, both lazily reached: the rest of
skyloop never needs it.

The launch, the driver's context and the result travel as pickles (bytes): Ray passes bytes as
they are, while serializing other objects itself costs it about 0.3 ms more per task. The driver
pickles launches with `pickled`, here with the rest of what the two sides share.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import cloudpickle

from skyloop.execution.lookahead import run_after
from skyloop.execution.procworker import PeakMemory, StepOutput, scoped_environ
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.execution.worker import execute
from skyloop.store.artifacts import ArtifactStore

__all__ = ["LOG_TAIL_BYTES", "DriverContext", "own_paths", "pickled", "run_attempt", "run_attempts", "run_chain"]

LOG_TAIL_BYTES = 4 * 2**20
"""How much of a step's log an attempt on another node sends back (the end of it)."""


@dataclass(frozen=True)
class DriverContext:
    """What every attempt needs to know about the process that submitted it."""

    node_id: str
    """Ray node id of the driver: attempts elsewhere cannot write its log folder, so they send the log back."""
    sys_path: tuple[str, ...]
    """The driver's own import folders (not the interpreter's), so steps import as they do there."""


def own_paths() -> tuple[str, ...]:
    """The driver's import folders that are not the interpreter's (its stdlib and site-packages)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or ".")
        if path not in paths and not any(path == p or path.startswith(p + os.sep) for p in prefixes):
            paths.append(path)
    return tuple(paths)


def pickled(obj: object) -> bytes:
    """`obj` pickled so that a worker can load it: by value where needed (a class defined in a
    notebook or `__main__`), like Ray would.

    Plain pickle when it does: cloudpickle's hook on every object costs it 3x (60 vs 20 us a launch).
    The two differ only for what pickle refuses (local classes, lambdas, modules it cannot import),
    for `__main__`, whose name is then in the bytes, and for modules registered to go by value.
    """
    if not cloudpickle.list_registry_pickle_by_value():
        data = None
        with contextlib.suppress(Exception):  # what pickle refuses, cloudpickle takes (or says why not)
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if data is not None and b"__main__" not in data:
            return data
    return bytes(cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class _Worker:
    """What one Ray worker process keeps between the attempts it runs."""

    def __init__(self) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.name = f"ray:{ray.util.get_node_ip_address()}:{os.getpid()}"  # type: ignore[no-untyped-call]
        self.stores: dict[str, ArtifactStore] = {}
        self.memory = PeakMemory()
        self.paths: tuple[str, ...] = ()
        self.context: tuple[bytes, DriverContext] | None = None
        # The worker's own stdout/stderr (Ray's log files for it) and folder, put back after each attempt.
        self.output = StepOutput((os.dup(1), os.dup(2)))
        self.cwd = os.open(".", os.O_RDONLY)

    def run(self, launch: TaskLaunch, context: DriverContext) -> tuple[TaskResult, bytes | None]:
        """Run one attempt; step errors become a FAILED result. Returns the log too when it is not local."""
        self._extend_path(context.sys_path)
        local = context.node_id == self.node_id
        log_path = launch.log_path if local else _temporary_log()
        started = time.time()
        try:
            store = self.stores.get(launch.artifacts_url)
            if store is None:
                store = self.stores[launch.artifacts_url] = ArtifactStore(launch.artifacts_url)
            with self.output.capture(log_path), scoped_environ(launch.env):
                self.memory.reset()
                result = execute(launch, store)
                result.max_rss = self.memory.peak()
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a step calling sys.exit() must not end the
            # worker, and one raising KeyboardInterrupt must not pass for a cancel (Ray reports that as one; ours
            # are forced: they kill the worker, never raise in it)
            result = TaskResult(key=launch.key, state=TaskState.FAILED, error=f"{type(exc).__name__}: {exc}",
                                traceback=traceback.format_exc(), started_at=started, ended_at=time.time())
        finally:
            os.fchdir(self.cwd)  # a step's os.chdir() must not move the next attempt
        result.worker = self.name
        return result, None if local else _take_tail(log_path)

    def context_of(self, data: bytes) -> DriverContext:
        """The driver's context, unpickled once per driver."""
        if self.context is None or self.context[0] != data:
            self.context = (data, pickle.loads(data))
        return self.context[1]

    def _extend_path(self, paths: tuple[str, ...]) -> None:
        if paths != self.paths:
            # Appended, not prepended: the worker's interpreter and Ray itself must keep their own modules.
            sys.path.extend(path for path in paths if path not in sys.path)
            self.paths = paths


def _temporary_log() -> str:
    """A new path for the log of an attempt on another node (not created: see `StepOutput`)."""
    return os.path.join(tempfile.gettempdir(), f"skyloop-step-{uuid.uuid4().hex}.log")


def _take_tail(path: str) -> bytes:
    """The last `LOG_TAIL_BYTES` of the file, which is then removed (none: the attempt printed nothing)."""
    if not os.path.exists(path):
        return b""
    try:
        with open(path, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - LOG_TAIL_BYTES))
            tail = log.read()
        if size > LOG_TAIL_BYTES:
            tail = f"[... {size - LOG_TAIL_BYTES} bytes of log cut ...]\n".encode() + tail
        return tail
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


_worker: _Worker | None = None


def run_attempt(launch: bytes, context: bytes, upstream: bytes | None = None) -> bytes:
    """The Ray task: run the launch in this worker process (see `RayBackend`).

    `launch` is a pickled `TaskLaunch`, `context` a pickled `DriverContext`; returns the pickled
    `(TaskResult, log tail or None)`. `upstream` is what the task of the attempt it was sent ahead of
    returned (see `skyloop.execution.lookahead`): the launch takes its inputs from it, or ends unrun.
    """
    worker = _the_worker()
    attempt: TaskLaunch = pickle.loads(launch)
    driver = worker.context_of(context)
    if upstream is not None:
        outcome = run_after(attempt, pickle.loads(upstream)[0], lambda filled: worker.run(filled, driver))
    else:
        outcome = worker.run(attempt, driver)
    return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)


def run_attempts(launches: bytes, context: bytes) -> bytes:
    """The Ray task of a pack: run a pickled list of `TaskLaunch`es one after the other in this worker.

    Returns the pickled list of their `(TaskResult, log tail or None)`, in the same order. Each
    attempt has its own log, memory peak and result, as if it ran alone.
    """
    worker = _the_worker()
    driver = worker.context_of(context)
    outcomes = [worker.run(launch, driver) for launch in pickle.loads(launches)]
    return pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)


def run_chain(launches: bytes, context: bytes, upstream: bytes | None = None) -> Iterator[bytes]:
    """The Ray task of a chain (a streaming generator): run a pickled list of `TaskLaunch`es, each after
    the one before it (the first after `upstream`, as in `run_attempt`, when given), whose outputs it
    takes (`TaskLaunch.after`); yield each one's pickled `(TaskResult, log tail or None)` as soon as it
    ended, so that the driver learns of every end at once. Once one did not succeed, the rest end
    `NOT_RUN` without running."""
    worker = _the_worker()
    driver = worker.context_of(context)
    previous: TaskResult | None = None if upstream is None else pickle.loads(upstream)[0]
    for launch in pickle.loads(launches):
        if previous is not None:
            outcome = run_after(launch, previous, lambda filled: worker.run(filled, driver))
        else:
            outcome = worker.run(launch, driver)
        previous = outcome[0]
        yield pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)


def _the_worker() -> _Worker:
    global _worker
    if _worker is None:
        _worker = _Worker()
    return _worker
