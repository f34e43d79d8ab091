"""The run loop: walk the DAG, check the cache, launch what fits, record every transition in the DB.

All state that matters lives in the metadata DB; the in-memory view here can be rebuilt from it,
which is what `resume` does after the orchestrator process was killed.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import cloudpickle

from skyloop.config import Settings
from skyloop.errors import Conflict
from skyloop.execution.backends.base import Backend
from skyloop.execution.cache import cache_key, find_cached
from skyloop.execution.history import Prior, crash_orphans, load_prior
from skyloop.execution.recorder import Recorder
from skyloop.execution.tasks import InputValue, TaskLaunch, TaskResult, TaskState
from skyloop.execution.units import TaskProgress, Unit, evaluate, expand, resolve_binding
from skyloop.pipelines.step import Step, code_hash
from skyloop.pipelines.validate import topological_order
from skyloop.scheduling.policy import Candidate, ReadyQueue
from skyloop.spec.pipeline import PipelineSpec, TaskSpec
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.db import Database
from skyloop.store.runs import claim_run, create_run, release_run, renew_lease

__all__ = ["Observer", "Orchestrator", "Prepared"]

_FAILED = (TaskState.FAILED, TaskState.TIMED_OUT, TaskState.CRASHED, TaskState.OUT_OF_MEMORY,
           TaskState.CANCELLED, TaskState.UPSTREAM_FAILED)


class Observer(Protocol):
    """Told about progress (the CLI draws it)."""

    def task_changed(self, task: str, state: TaskState, done: int, total: int) -> None:
        """A task changed state, or one more of its units finished."""

    def run_changed(self, run_id: str, status: str) -> None:
        """The run started, was adopted, or ended."""


@dataclass
class Prepared:
    """A validated spec, the steps behind its tasks, and checked parameter values."""

    spec: PipelineSpec
    steps: dict[str, Step[Any, Any]]
    params: dict[str, Any]


class _Heartbeat(threading.Thread):
    """Renews the run's lease so that nobody adopts a run whose orchestrator is alive."""

    def __init__(self, db: Database, run_id: str, owner: str, settings: Settings) -> None:
        super().__init__(name=f"skyloop-heartbeat-{run_id[:8]}", daemon=True)
        self.db, self.run_id, self.owner = db, run_id, owner
        self.interval = settings.execution.heartbeat_seconds
        self.lease = settings.execution.lease_seconds
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.db.session() as session:
                    if not renew_lease(session, self.run_id, self.owner, self.lease):
                        self.lost = True
                        return
            except Exception:  # a busy DB: try again at the next beat; the lease has slack
                continue


class Orchestrator:
    """Runs one pipeline run to its end on a backend."""

    def __init__(self, settings: Settings, db: Database, store: ArtifactStore, backend: Backend,
                 observer: Observer | None = None) -> None:
        self.settings, self.db, self.store, self.backend = settings, db, store, backend
        self.observer = observer
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    # -- entry points -------------------------------------------------------------------------------
    def start(self, prepared: Prepared, priority: int = 0) -> str:
        """Create a run of `prepared` and drive it to its end; returns the run id."""
        run_id = uuid.uuid4().hex
        with self.db.session() as session:
            create_run(session, run_id=run_id, pipeline=prepared.spec.name,
                       spec=prepared.spec.model_dump(mode="json"), params=prepared.params,
                       backend=self.backend.name, owner=self.owner,
                       lease_seconds=self.settings.execution.lease_seconds, priority=priority)
        self._drive(run_id, prepared, Prior())
        return run_id

    def resume(self, run_id: str, prepared: Prepared) -> str:
        """Adopt an unfinished run and complete it without re-running finished units."""
        with self.db.session() as session:
            row = claim_run(session, run_id, self.owner, self.settings.execution.lease_seconds)
            run_id = row.id
            crash_orphans(session, run_id, "orchestrator lost while the step ran; re-run on resume")
            prior = load_prior(session, run_id)
        self._drive(run_id, prepared, prior)
        return run_id

    # -- the loop -----------------------------------------------------------------------------------
    def _drive(self, run_id: str, prepared: Prepared, prior: Prior) -> None:
        self._run = _RunState(self, run_id, prepared, prior)
        heartbeat = _Heartbeat(self.db, run_id, self.owner, self.settings)
        heartbeat.start()
        if self.observer:
            self.observer.run_changed(run_id, "RUNNING")
        status, error = "FAILED", None
        try:
            status, error = self._run.loop(heartbeat)
        except KeyboardInterrupt:
            self._run.cancel_all()
            status, error = "CANCELLED", "cancelled by the user"
            raise
        except BaseException as exc:
            self._run.cancel_all()
            error = f"orchestrator error: {type(exc).__name__}: {exc}"
            raise
        finally:
            heartbeat.stopped.set()
            heartbeat.join(timeout=5)
            if not heartbeat.lost:
                with self.db.session() as session:
                    release_run(session, run_id, self.owner, status, error)
            if self.observer:
                self.observer.run_changed(run_id, status)


class _RunState:
    """The in-memory view of one run while the loop drives it."""

    def __init__(self, orch: Orchestrator, run_id: str, prepared: Prepared, prior: Prior) -> None:
        self.orch, self.run_id, self.prior = orch, run_id, prior
        self.spec, self.steps, self.params = prepared.spec, prepared.steps, prepared.params
        self.store, self.backend = orch.store, orch.backend
        self.recorder = Recorder(orch.db, run_id)
        order = topological_order(self.spec)
        specs = {t.name: t for t in self.spec.tasks}
        self.tasks = {n: TaskProgress(specs[n], specs[n].upstream()) for n in order}
        self.dependents: dict[str, list[str]] = {n: [] for n in order}
        for name, progress in self.tasks.items():
            for dep in progress.waiting_on:
                self.dependents[dep].append(name)
        self.ready: deque[str] = deque(n for n in order if not self.tasks[n].waiting_on)
        self.pending: dict[int, Unit] = {}
        self.queue = ReadyQueue()
        self.delayed: list[tuple[float, int, Unit]] = []
        self.running: dict[str, Unit] = {}
        self.capacity = self.backend.capacity()
        self.in_use = Resources(cpus=0, memory=0, gpus=0)
        self.seq = 0
        self.payloads: dict[str, bytes | None] = {}
        self.logs = orch.settings.logs_dir / run_id
        self.ok_units = 0

    # -- progress ----------------------------------------------------------------------------------
    def _notify(self, progress: TaskProgress) -> None:
        if self.orch.observer:
            self.orch.observer.task_changed(progress.spec.name, progress.state, len(progress.unit_outputs),
                                            progress.size)

    def _complete(self, progress: TaskProgress, state: TaskState, error: str | None = None) -> None:
        progress.state, progress.error = state, error
        if state.ok and state != TaskState.SKIPPED:
            progress.gather()
        if state in _FAILED:
            self.recorder.event("step.failed", f"step {progress.spec.name!r} ended {state.value}: {error}")
        self._notify(progress)
        for name in self.dependents[progress.spec.name]:
            waiting = self.tasks[name].waiting_on
            waiting.discard(progress.spec.name)
            if not waiting:
                self.ready.append(name)

    def _next_attempt(self, task: str, index: int) -> tuple[int, str]:
        attempt = self.prior.attempts.get((task, index), 0) + 1
        self.prior.attempts[(task, index)] = attempt
        return attempt, uuid.uuid4().hex

    def _record_end(self, task: TaskSpec, state: TaskState, error: str) -> None:
        attempt, step_run_id = self._next_attempt(task.name, -1)
        self.recorder.attempt(step_run_id=step_run_id, task=task.name, map_index=-1, attempt=attempt,
                              state=state.value, step_ref=task.step.path,
                              resources=task.resources.model_dump(mode="json"), error=error)

    # -- activation: a task whose upstream tasks all ended ----------------------------------------
    def activate(self, name: str) -> None:
        progress = self.tasks[name]
        task = progress.spec
        upstream = [self.tasks[d] for d in task.upstream()]
        failed = [u.spec.name for u in upstream if u.state in _FAILED]
        if failed:
            self._record_end(task, TaskState.UPSTREAM_FAILED, f"upstream step(s) {failed} did not succeed")
            return self._complete(progress, TaskState.UPSTREAM_FAILED, f"upstream {failed} failed")
        skipped = [u.spec.name for u in upstream if u.state == TaskState.SKIPPED]
        if skipped:
            self._record_end(task, TaskState.SKIPPED, f"upstream step(s) {skipped} were skipped")
            return self._complete(progress, TaskState.SKIPPED)
        try:
            false = [c.describe() for c in task.when if not evaluate(c, self.params, self.tasks, self.store)]
            inputs = {n: resolve_binding(b, self.params, self.tasks) for n, b in task.inputs.items()}
            unit_inputs = expand(task, inputs, self.store)
        except (ValueError, KeyError) as exc:
            self._record_end(task, TaskState.FAILED, str(exc))
            return self._complete(progress, TaskState.FAILED, str(exc))
        if false:
            self._record_end(task, TaskState.SKIPPED, f"condition `{false[0]}` is false")
            return self._complete(progress, TaskState.SKIPPED)
        if not task.resources.fits(self.capacity):
            error = (f"step asks for {task.resources.model_dump(mode='json')} but the {self.backend.name} backend "
                     f"offers {self.capacity.model_dump(mode='json')}; lower the request or raise --max-cpus etc.")
            self._record_end(task, TaskState.FAILED, error)
            return self._complete(progress, TaskState.FAILED, error)
        progress.size = len(unit_inputs)
        step = self.steps[name]
        code = code_hash(step.fn)
        all_cached = True
        outputs = [o.name for o in task.outputs]
        keyed: list[tuple[int, dict[str, InputValue], str | None]] = []
        for i, unit_in in enumerate(unit_inputs):
            index = i if task.map_over else -1
            done = self.prior.outputs.get((name, index))
            if done is not None:
                progress.unit_outputs[index] = done
                all_cached = False
            else:
                keyed.append((index, unit_in, cache_key(code, task.cache.version, unit_in)
                              if task.cache.enabled else None))
        wanted = [key for _, _, key in keyed if key]
        hits = {}
        if wanted:
            with self.orch.db.read() as session:
                hits = find_cached(session, wanted, outputs)
        for index, unit_in, key in keyed:
            hit = hits.get(key) if key else None
            if hit is not None:
                attempt, step_run_id = self._next_attempt(name, index)
                self.recorder.attempt(step_run_id=step_run_id, task=name, map_index=index, attempt=attempt,
                                      state="CACHED", step_ref=task.step.path, code_hash=code, cache_key=key,
                                      resources=task.resources.model_dump(mode="json"), inputs=unit_in,
                                      cached_from=hit[0], outputs=hit[1])
                progress.unit_outputs[index] = hit[1]
                continue
            all_cached = False
            self.seq += 1
            self._enqueue(Unit(task, index, unit_in, key, self.seq))
        if len(progress.unit_outputs) == progress.size:
            return self._complete(progress, TaskState.CACHED if all_cached and progress.size else TaskState.SUCCEEDED)
        progress.state = TaskState.RUNNING
        self._notify(progress)

    # -- launching ---------------------------------------------------------------------------------
    def _payload(self, name: str) -> bytes | None:
        if name not in self.payloads:
            step = self.steps[name]
            self.payloads[name] = None if step.importable else cloudpickle.dumps(step.fn)
        return self.payloads[name]

    def _enqueue(self, unit: Unit) -> None:
        self.pending[unit.seq] = unit
        self.queue.push(Candidate(key=unit.seq, resources=unit.task.resources, priority=unit.task.priority,
                                  seq=unit.seq))

    def launch_ready(self) -> list[TaskLaunch]:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self._enqueue(heapq.heappop(self.delayed)[2])
        if not self.pending:
            return []
        launches = []
        for cand in self.queue.take(self.capacity - self.in_use):
            unit = self.pending.pop(cand.key)
            task = unit.task
            unit.attempt, unit.step_run_id = self._next_attempt(task.name, unit.index)
            suffix = f"-{unit.index}" if unit.index >= 0 else ""
            log_path = str(self.logs / f"{task.name}{suffix}.{unit.attempt}.log")
            self.recorder.attempt(step_run_id=unit.step_run_id, task=task.name, map_index=unit.index,
                                  attempt=unit.attempt, state="RUNNING", step_ref=task.step.path,
                                  code_hash=code_hash(self.steps[task.name].fn), cache_key=unit.cache_key,
                                  resources=task.resources.model_dump(mode="json"), inputs=unit.inputs,
                                  log_path=log_path)
            self.in_use = self.in_use + task.resources
            self.running[unit.step_run_id] = unit
            launches.append(TaskLaunch(
                key=unit.step_run_id, task_name=task.name, step=task.step, inputs=unit.inputs,
                output_names=[o.name for o in task.outputs], multi_output=task.multi_output,
                resources=task.resources, timeout=task.timeout, log_path=log_path,
                artifacts_url=self.store.url, fn_payload=self._payload(task.name),
            ))
        return launches

    # -- results -----------------------------------------------------------------------------------
    def finish(self, result: TaskResult) -> None:
        unit = self.running.pop(result.key)
        self.in_use = self.in_use - unit.task.resources
        self.recorder.finished(result)
        progress = self.tasks[unit.task.name]
        if progress.state.done:
            return  # a sibling unit already failed the task
        if result.state == TaskState.SUCCEEDED:
            missing = [o.name for o in unit.task.outputs if o.name not in result.outputs]
            if not missing:
                progress.unit_outputs[unit.index] = result.outputs
                self._notify(progress)
                if len(progress.unit_outputs) == progress.size:
                    self._complete(progress, TaskState.SUCCEEDED)
                return
        retry = unit.task.retry
        if result.state != TaskState.CANCELLED and unit.attempt <= retry.retries:
            delay = retry.delay * retry.backoff ** (unit.attempt - 1)
            self.recorder.event("step.retry", f"step {unit.task.name!r} attempt {unit.attempt} ended "
                                f"{result.state.value} ({result.error}); retrying in {delay:g}s", result.key)
            unit.not_before = time.monotonic() + delay
            heapq.heappush(self.delayed, (unit.not_before, unit.seq, unit))
            return
        self._complete(progress, result.state, result.error)

    def cancel_all(self) -> None:
        for key in list(self.running):
            self.backend.cancel(key)
        deadline = time.monotonic() + 5
        while self.running and time.monotonic() < deadline:
            for result in self.backend.wait(0.2):
                if result.key in self.running:
                    self.finish(result)
        # The run row is released next; an attempt row lost here is reaped as CRASHED later.
        with contextlib.suppress(Exception):
            self.recorder.flush()

    def loop(self, heartbeat: _Heartbeat) -> tuple[str, str | None]:
        beat = self.orch.settings.execution.heartbeat_seconds
        while True:
            if heartbeat.lost:
                raise Conflict(f"run {self.run_id} was adopted by another process; this one stops")
            while self.ready:
                self.activate(self.ready.popleft())
            launches = self.launch_ready()
            self.recorder.flush()
            for launch in launches:
                self.backend.submit(launch)
            if not (self.running or self.pending or self.delayed or self.ready):
                break
            if not (self.running or self.delayed or launches):
                # Cannot happen while requests are checked against capacity on activation; fail loudly.
                raise RuntimeError(f"{len(self.pending)} step(s) wait for resources that will never free up")
            timeout = beat
            if self.delayed:
                timeout = max(0.0, min(timeout, self.delayed[0][0] - time.monotonic()))
            for result in self.backend.wait(timeout):
                if result.key in self.running:
                    self.finish(result)
        failed = [p for p in self.tasks.values() if p.state in _FAILED]
        self.recorder.flush()
        if not failed:
            return "SUCCEEDED", None
        first = next((p for p in failed if p.state != TaskState.UPSTREAM_FAILED), failed[0])
        return "FAILED", f"step {first.spec.name!r} {first.state.value}: {first.error}"

