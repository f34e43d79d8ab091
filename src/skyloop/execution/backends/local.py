"""The `local` backend: step attempts run in a pool of warm worker processes on this machine.

The pool grows on demand up to `max_workers` and keeps idle workers warm; a launch that finds no
free worker waits in a queue. A task's timeout counts from when its worker is up. Timeouts,
cancels and crashes cost the worker (it is killed with its process group and every process its
step started, also those that left the group, and replaced lazily; see `WorkerProcess.kill` and,
for a worker that died by itself, `WorkerProcess.end_strays`).
An attempt that ends on its own leaves the worker warm but nothing else: before answering, the
worker kills what the step left running (`procworker.end_leftovers`), and it imports a step's
`.py` file again if the file has changed since (`loading.load_file_module`).
How one worker process is started and reaped lives in `_worker_process`; what runs inside it in
`skyloop.execution.procworker`; the GPU pool and memory sampling in `limits`. Unix only.

Limits:

- **Memory.** An attempt with `resources.memory > 0` is sampled every `memory_poll_seconds` (see
  `MemoryWatch` for what counts) and killed with its process group as OUT_OF_MEMORY once it uses
  more than its request plus `memory_margin`. Sampling happens inside `wait`, whose sleep is cut to
  the poll interval only while such attempts run: no thread races the scheduler thread to kill or
  reap a worker, and attempts without a request cost nothing. The flip side is that nothing is
  sampled while the caller is outside `wait`, and an attempt that allocates faster than one poll
  can still reach the kernel's OOM killer first; a SIGKILLed worker of a watched attempt is
  reported as OUT_OF_MEMORY when the kernel's OOM-kill counter rose meanwhile.
- **GPUs.** The backend owns the device ids `gpu_ids` (default: the first `max_gpus` of those in
  the `CUDA_VISIBLE_DEVICES` this process was started with, else `0..max_gpus-1`). An attempt asking
  for n GPUs gets n free ids in `CUDA_VISIBLE_DEVICES` (comma-separated) and holds them until it
  ends in any state; one asking for more than are free waits in the queue (GPU launches keep their
  order among themselves; launches without GPUs pass them). When GPUs are declared, an attempt
  asking for none gets `CUDA_VISIBLE_DEVICES=""`, so that CPU steps cannot take memory on devices
  given to others (Kubernetes hides undeclared devices the same way); with no GPUs declared the
  variable is left alone. A `CUDA_VISIBLE_DEVICES` set explicitly in `launch.env` wins: the caller
  chose the devices itself (the ids are still taken from the pool, so that accounting holds).

The backend is driven by one thread (the orchestrator's scheduler); it is not thread-safe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import signal
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from types import TracebackType

import psutil

from skyloop.config import ExecutionSettings
from skyloop.execution.backends._worker_process import WorkerProcess
from skyloop.execution.backends.limits import DEVICES_VAR, GpuPool, MemoryWatch, resident
from skyloop.execution.procworker import READY, UNREADABLE
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.spec.resources import Resources

__all__ = ["LocalBackend"]

_BOOT_SECONDS = 60.0  # a worker that is not up by then is reported as crashed
_EXIT_GRACE_SECONDS = 1.0  # how long a dying or stopping worker gets before SIGKILL


class LocalBackend:
    """Runs each attempt in a warm worker process, growing the pool up to `max_workers`."""

    name = "local"

    def __init__(self, settings: ExecutionSettings) -> None:
        self._gpus = GpuPool.from_settings(settings)
        self._capacity = Resources(
            cpus=settings.max_cpus if settings.max_cpus is not None else float(os.cpu_count() or 1),
            memory=settings.max_memory if settings.max_memory is not None else psutil.virtual_memory().total,
            gpus=len(self._gpus), custom=dict(settings.resources),
        )
        self._margin = settings.memory_margin
        self._poll = settings.memory_poll_seconds
        self._next_sample = 0.0  # monotonic time of the next memory sample, while attempts are watched
        self.max_workers: int = settings.max_workers or max(1, math.ceil(self._capacity.cpus))
        """Most worker processes alive at once; launches beyond them wait in a queue."""
        self._idle: list[WorkerProcess] = []
        self._busy: dict[str, WorkerProcess] = {}
        self._owners: dict[object, WorkerProcess] = {}  # connection or pidfd -> its worker
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
        """The settings' limits, or this machine's CPUs and memory; GPUs: the size of the pool."""
        return self._capacity

    def launch_limit(self) -> int:
        """How many attempts start at once (`max_workers`): the orchestrator hands over no more, so that what
        waits does so in its policy's order rather than in this backend's first-come queue."""
        return self.max_workers

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
        """Results that are in, waiting up to `timeout` seconds for one.

        With no result in and no task running or queued, nothing can end before the caller acts
        again, so it sleeps out the timeout: a caller waiting for a retry delay does not spin.
        """
        end = time.monotonic() + max(0.0, timeout)
        while not self._done and self._busy:
            now = time.monotonic()
            limit = min([end, *(w.deadline for w in self._busy.values() if w.deadline is not None)])
            watched = any(w.watch is not None for w in self._busy.values())
            if watched:
                limit = min(limit, self._next_sample)
            handles = [handle for worker in self._busy.values() for handle in worker.handles]
            for handle in wait_ready(handles, max(0.0, limit - now)):
                owner = self._owners.get(handle)
                if owner is not None:
                    readable = isinstance(handle, Connection)
                    self._collect(owner, exited=not readable, readable=readable)
            now = time.monotonic()
            self._expire(now)
            if watched and now >= self._next_sample:
                self._next_sample = now + self._poll
                self._sample()
            self._dispatch()
            if time.monotonic() >= end:
                break
        if not (self._done or self._busy or self._queue):
            time.sleep(max(0.0, end - time.monotonic()))
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
                worker.send(None)
            else:
                worker.kill()
        for worker in workers:
            self._reap(worker, kill=False)
        self._started = False

    # -- the pool ------------------------------------------------------------------------------

    def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess.spawn()
        for handle in worker.handles:
            self._owners[handle] = worker
        return worker

    def _take_worker(self, launch: TaskLaunch) -> WorkerProcess | None:
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

    def _stop_idle(self, worker: WorkerProcess) -> None:
        worker.send(None)
        self._reap(worker, kill=False)

    def _dispatch(self) -> None:
        index = 0
        gpus_blocked = False  # a GPU launch that must wait holds back later GPU launches (no starving)
        while index < len(self._queue):
            queued = self._queue[index]
            wanted = queued.resources.gpus
            if wanted > len(self._gpus):
                del self._queue[index]
                error = (f"asks for {wanted} GPUs but this backend has {len(self._gpus)} "
                         f"(execution settings gpu_ids / max_gpus)")
                self._done.append(TaskResult(key=queued.key, state=TaskState.FAILED, error=error,
                                             ended_at=time.time()))
                continue
            ids: tuple[int, ...] | None = ()
            if wanted:  # ids that an idle worker is pinned to first, so that it can take the launch
                ids = None if gpus_blocked else self._gpus.pick(wanted, [w.devices for w in reversed(self._idle)])
            if ids is None:  # not enough GPUs free: it keeps its place
                gpus_blocked = True
                index += 1
                continue
            launch = self._with_devices(queued, ids)
            try:
                payload = pickle.dumps(launch, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                del self._queue[index]
                error = f"cannot pass the launch to a worker: {type(exc).__name__}: {exc}"
                self._done.append(TaskResult(key=launch.key, state=TaskState.FAILED, error=error,
                                             ended_at=time.time()))
                continue
            worker = self._take_worker(launch)
            if worker is None:
                return
            del self._queue[index]
            worker.assign(launch)
            worker.gpu_ids = ids
            self._gpus.take(ids)
            self._busy[launch.key] = worker
            if not worker.ready and worker.conn.poll():
                self._collect(worker, exited=False)  # its READY is probably waiting
                if worker.launch is not launch:
                    continue
            self._arm(worker)
            worker.send_bytes(payload)

    def _with_devices(self, launch: TaskLaunch, ids: tuple[int, ...]) -> TaskLaunch:
        """The launch with `CUDA_VISIBLE_DEVICES` naming its GPUs (empty for none), unless it sets it."""
        if not self._gpus or DEVICES_VAR in launch.env:
            return launch
        return dataclasses.replace(launch, env={**launch.env, DEVICES_VAR: ",".join(map(str, ids))})

    def _arm(self, worker: WorkerProcess) -> None:
        """Start the clock of the worker's task: its timeout counts from when the worker is up.

        Its memory watch starts then too, with the worker's idle size as baseline: the size it
        reported with READY when it has only just booted, else its size now (it is idle until the
        caller sends the launch).
        """
        assert worker.launch is not None
        worker.started = time.time()
        if not worker.ready:
            worker.deadline = worker.spawned + _BOOT_SECONDS
            return
        if worker.launch.timeout is not None:
            worker.deadline = time.monotonic() + worker.launch.timeout
        else:
            worker.deadline = None
        idle_rss, worker.idle_rss = worker.idle_rss, None  # only the first task finds it idle at READY
        if worker.launch.resources.memory > 0:
            baseline = idle_rss if idle_rss is not None else resident(worker.proc.pid)
            if worker.watch is not None:
                worker.watch.close()
            worker.watch = MemoryWatch(worker.proc.pid, worker.launch.resources.memory, self._margin,
                                       baseline or 0)

    # -- ends of tasks ---------------------------------------------------------------------------

    def _collect(self, worker: WorkerProcess, exited: bool, readable: bool = False) -> None:
        """Read what the worker sent; if it has gone, report its task as crashed."""
        try:
            while readable or worker.conn.poll():
                readable = False
                message = worker.conn.recv()
                if isinstance(message, TaskResult):
                    self._finish(worker, message)
                    break  # nothing more comes before its next launch; an exit shows on the sentinel
                if isinstance(message, tuple) and message[0] == READY:
                    worker.ready, worker.idle_rss = True, message[1]
                    if worker.launch is not None:
                        self._arm(worker)
                elif isinstance(message, tuple) and message[0] == UNREADABLE and worker.launch is not None:
                    _, error, trace = message
                    self._finish(worker, TaskResult(key=worker.launch.key, state=TaskState.FAILED, error=error,
                                                    traceback=trace, ended_at=time.time()))
                    break
        except (EOFError, OSError):
            exited = True
        if exited:
            launch, watch = worker.launch, worker.watch
            self._reap(worker, kill=False)
            if launch is None:
                return
            worker.end_strays()  # what its step started outlived it (adopted by init): end those too
            oom = None
            if watch is not None and worker.proc.returncode == -signal.SIGKILL:
                oom = watch.killed_by_kernel()
            if oom is not None and watch is not None:
                self._done.append(self._ended(worker, launch.key, TaskState.OUT_OF_MEMORY, oom, watch.peak))
            else:
                self._done.append(self._ended(worker, launch.key, TaskState.CRASHED, worker.exit_message()))

    def _finish(self, worker: WorkerProcess, result: TaskResult) -> None:
        if worker.launch is None or worker.launch.key != result.key:
            return
        self._release(worker)
        result.worker = worker.name
        self._idle.append(worker)
        self._done.append(result)

    def _sample(self) -> None:
        """Kill the attempts whose memory is over their limit (a result already sent wins)."""
        for worker in [w for w in self._busy.values() if w.watch is not None]:
            watch, launch = worker.watch, worker.launch
            assert watch is not None and launch is not None
            error = watch.check()
            if error is None:
                continue
            self._collect(worker, exited=False)
            if worker.launch is not launch:
                continue
            watch.kill_strays()
            self._reap(worker, kill=True)
            self._done.append(self._ended(worker, launch.key, TaskState.OUT_OF_MEMORY, error, watch.peak))

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

    def _ended(self, worker: WorkerProcess, key: str, state: TaskState, error: str,
               max_rss: int | None = None) -> TaskResult:
        return TaskResult(key=key, state=state, error=error, started_at=worker.started,
                          ended_at=time.time(), worker=worker.name, max_rss=max_rss)

    def _release(self, worker: WorkerProcess) -> None:
        """End the worker's current attempt here: free its GPUs and its watch, forget the launch."""
        if worker.launch is not None:
            self._busy.pop(worker.launch.key, None)
        self._gpus.give_back(worker.gpu_ids)
        if worker.watch is not None:
            worker.watch.close()
        worker.launch, worker.deadline, worker.gpu_ids, worker.watch = None, None, (), None

    def _reap(self, worker: WorkerProcess, kill: bool) -> None:
        """Forget the worker and its attempt, and reap it (killing it first if asked)."""
        self._release(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        for handle in worker.handles:
            self._owners.pop(handle, None)
        if kill:
            worker.kill()
        worker.reap(_EXIT_GRACE_SECONDS)
