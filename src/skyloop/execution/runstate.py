"""One run's progress while an orchestrator drives it: which tasks are ready, cached, running, done.

A `RunState` decides *what* is ready and records every transition; the orchestrator decides *when*
ready attempts launch (across all the runs it holds) and talks to the backend.
"""

from __future__ import annotations

import json
import statistics
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cloudpickle

from skyloop.errors import NotFound, SpecError, StoreError
from skyloop.execution.cache import cache_key, find_cached, lookup_connection
from skyloop.execution.history import Prior
from skyloop.execution.loading import resolve
from skyloop.execution.recorder import Recorder
from skyloop.execution.tasks import After, Element, Gathered, InputValue, TaskLaunch, TaskResult, TaskState
from skyloop.execution.units import TaskProgress, Unit, evaluate, expand, resolve_binding
from skyloop.pipelines.step import Step, code_hash
from skyloop.pipelines.validate import topological_order
from skyloop.scheduling.estimates import Estimator, Sample
from skyloop.spec.pipeline import PipelineSpec, TaskInput, TaskSpec
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactRef, ArtifactStore
from skyloop.store.db import Database

__all__ = ["FAILED_STATES", "Observer", "Prepared", "RunState"]

FAILED_STATES = (TaskState.FAILED, TaskState.TIMED_OUT, TaskState.CRASHED, TaskState.OUT_OF_MEMORY,
                 TaskState.CANCELLED, TaskState.UPSTREAM_FAILED)

SIBLINGS_NEEDED = 3
"""Units of a mapped task that must have ended before the others are estimated from them."""
SIBLINGS_KEPT = 32
"""Durations of a mapped task's units kept per run (the first ones to end)."""


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


def input_bytes(inputs: dict[str, InputValue]) -> int | None:
    """Total size of the artifacts an attempt reads; None where that is not known: a unit of a `.map` over a
    list one step returned reads one element of it, whose size is not its list's (by that, every unit of a
    longer sweep looked larger, and size-scaled estimates grew with the sweep)."""
    total = 0
    for value in inputs.values():
        if isinstance(value, ArtifactRef):
            total += value.size
        elif isinstance(value, Gathered):
            total += sum(ref.size for ref in value.refs)
        elif isinstance(value, Element) and isinstance(value.source, ArtifactRef):
            return None
    return total


def _raise_capacity(wanted: Resources, offered: Resources, fix: str | None = None) -> str:
    """How to offer what `wanted` asks beyond `offered`: the backend's own `fix`, else the options or
    settings that declare it."""
    if fix is not None:
        return fix
    fixes = [f"raise {option}" for option, short in (("--max-cpus", wanted.cpus > offered.cpus),
                                                     ("--max-memory", wanted.memory > offered.memory),
                                                     ("--max-gpus (and gpu_ids)", wanted.gpus > offered.gpus))
             if short]
    fixes += [f"declare {name!r} in the settings' execution.resources (e.g. SKYLOOP_EXECUTION__RESOURCES="
              f"'{{\"{name}\": {amount:g}}}')" for name, amount in wanted.custom.items()
              if amount > offered.custom.get(name, 0.0)]
    return " and ".join(fixes) if fixes else "raise the backend's capacity"


class RunState:
    """The in-memory view of one run; everything it learns is also written through `recorder`."""

    def __init__(self, run_id: str, prepared: Prepared, prior: Prior, *, db: Database, store: ArtifactStore,
                 recorder: Recorder, capacity: Resources, backend_name: str, logs: Path,
                 priority: int = 0, weight: float = 1.0, estimates: dict[str, tuple[float, str]] | None = None,
                 ranks: dict[str, float] | None = None, observer: Observer | None = None,
                 home: Path | None = None, estimator: Estimator | None = None,
                 sized: dict[str, list[Sample]] | None = None, capacity_fix: str | None = None,
                 nodes: list[Resources] | None = None) -> None:
        self.run_id, self.prior = run_id, prior
        self.home = str(home) if home is not None else None
        """The skyloop home of the run, passed to steps (with the DB and store URLs) for `log_model`."""
        self.spec, self.steps, self.params = prepared.spec, prepared.steps, prepared.params
        self.db, self.store, self.recorder = db, store, recorder
        self.capacity, self.backend_name, self.logs = capacity, backend_name, logs
        self.capacity_fix = capacity_fix
        self.nodes = nodes if nodes is not None and len(nodes) > 1 else None
        """What each node of a cluster of several offers (a step must fit one), where the backend says."""
        """The backend's own advice for a step that asks for more than `capacity` (see `_raise_capacity`)."""
        self.priority, self.weight = priority, weight
        self.estimates = estimates or {}
        self._estimator, self._sized = estimator, sized or {}
        """History of the tasks whose attempts vary in input size: each unit's estimate is fitted to its inputs."""
        self._unit_estimates: dict[tuple[str, int], tuple[float, str]] = {}
        self._siblings: dict[str, list[float]] = {}
        """Mapped task -> seconds its first units took in this run (at most `SIBLINGS_KEPT`)."""
        self._sibling_median: dict[str, float] = {}
        """Mapped task -> the median of `_siblings`, once it holds `SIBLINGS_NEEDED`."""
        self.ranks = ranks or {}
        self.observer = observer
        order = topological_order(self.spec)
        specs = {t.name: t for t in self.spec.tasks}
        self.tasks = {n: TaskProgress(specs[n], specs[n].upstream()) for n in order}
        self.dependents: dict[str, list[str]] = {n: [] for n in order}
        for name, progress in self.tasks.items():
            for dep in progress.waiting_on:
                self.dependents[dep].append(name)
        self.ready: deque[str] = deque(n for n in order if not self.tasks[n].waiting_on)
        self.payloads: dict[str, bytes | None] = {}
        self._code: dict[str, str] = {}
        """Task -> the code hash of its step as last activated (what its attempts record and are cached under)."""
        self.active_units = 0
        """Units queued, waiting to retry or running."""
        self.ahead: dict[str, Unit] = {}
        """Task -> its attempt sent before its upstream ended (`ahead_of`), not recorded until `_activate`."""
        self.dropped: list[Unit] = []
        self.cancelling: str | None = None
        """Why the run is being cancelled (by its orchestrator: nothing of it launches any more), else None."""
        """Attempts sent ahead that activation did not confirm, for the caller to forget."""

    # -- progress ----------------------------------------------------------------------------------
    def _notify(self, progress: TaskProgress) -> None:
        if self.observer:
            self.observer.task_changed(progress.spec.name, progress.state, len(progress.unit_outputs),
                                       progress.size)

    def _complete(self, progress: TaskProgress, state: TaskState, error: str | None = None) -> None:
        progress.state, progress.error = state, error
        if state.ok and state != TaskState.SKIPPED:
            progress.gather()
        if state in FAILED_STATES:
            self.recorder.event(self.run_id, "step.failed",
                                f"step {progress.spec.name!r} ended {state.value}: {error}")
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
        self.recorder.attempt(run_id=self.run_id, step_run_id=step_run_id, task=task.name, map_index=-1,
                              attempt=attempt, state=state.value, step_ref=task.step.path,
                              resources=task.resources.model_dump(mode="json"), error=error)

    @property
    def done(self) -> bool:
        """Whether every task has ended."""
        return not self.ready and not self.active_units

    def outcome(self) -> tuple[str, str | None]:
        """`SUCCEEDED`, or `FAILED` with the first real failure."""
        failed = [p for p in self.tasks.values() if p.state in FAILED_STATES]
        if not failed:
            return "SUCCEEDED", None
        first = next((p for p in failed if p.state != TaskState.UPSTREAM_FAILED), failed[0])
        return "FAILED", f"step {first.spec.name!r} {first.state.value}: {first.error}"

    # -- activation: a task whose upstream tasks all ended ----------------------------------------
    def activate_ready(self, enqueue: Callable[[RunState, Unit], None],
                       confirm: Callable[[RunState, Unit], None] = lambda run, unit: None) -> None:
        """Activate every task whose upstream ended; attempts to run go to `enqueue`, and those sent ahead
        (see `ahead_of`) to `confirm` once their row is recorded. One sent ahead whose inputs do not
        resolve goes to `dropped` (the caller forgets its launch) and is activated as any other."""
        while self.ready:
            self._activate(self.ready.popleft(), enqueue, confirm)

    def _activate(self, name: str, enqueue: Callable[[RunState, Unit], None],
                  confirm: Callable[[RunState, Unit], None]) -> None:
        progress = self.tasks[name]
        task = progress.spec
        sent = self.ahead.get(name)
        if sent is not None and self._confirm(progress, sent):
            return confirm(self, sent)
        upstream = [self.tasks[d] for d in task.upstream()]
        failed = [u.spec.name for u in upstream if u.state in FAILED_STATES]
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
        except (ValueError, KeyError, NotFound, StoreError) as exc:  # an upstream blob gone or damaged
            self._record_end(task, TaskState.FAILED, str(exc))
            return self._complete(progress, TaskState.FAILED, str(exc))
        except Exception as exc:  # the user's objects (unpickled, compared): this step's fault alone
            error = (f"reading this step's inputs in the orchestrator (a condition, or the list it maps over) "
                     f"raised {type(exc).__name__}: {exc}")
            self._record_end(task, TaskState.FAILED, error)
            return self._complete(progress, TaskState.FAILED, error)
        if false:
            self._record_end(task, TaskState.SKIPPED, f"condition `{false[0]}` is false")
            return self._complete(progress, TaskState.SKIPPED)
        if not task.resources.fits(self.capacity):
            error = (f"step asks for {task.resources.model_dump(mode='json')} but the {self.backend_name} "
                     f"backend offers {self.capacity.model_dump(mode='json')}; lower the request or "
                     f"{_raise_capacity(task.resources, self.capacity, self.capacity_fix)}")
            self._record_end(task, TaskState.FAILED, error)
            return self._complete(progress, TaskState.FAILED, error)
        if self.nodes is not None and not any(task.resources.fits(node) for node in self.nodes):
            offers = "; ".join(sorted({json.dumps(n.model_dump(mode="json"), sort_keys=True) for n in self.nodes}))
            error = (f"step asks for {task.resources.model_dump(mode='json')}, which no single node of the "
                     f"{self.backend_name} cluster offers (a step runs on one node; they offer {offers}); lower the "
                     "request or add a node that large")
            self._record_end(task, TaskState.FAILED, error)
            return self._complete(progress, TaskState.FAILED, error)
        progress.size = len(unit_inputs)
        if task.map_over and not unit_inputs:  # a row says so: else the step would show PENDING for ever
            self._record_end(task, TaskState.SUCCEEDED, "mapped over an empty list: no unit to run")
            return self._complete(progress, TaskState.SUCCEEDED)
        code = self._task_code(name)
        all_cached = True
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
            with lookup_connection(self.db) as conn:
                hits = find_cached(conn, wanted, [o.name for o in task.outputs], self.store)
        for index, unit_in, key in keyed:
            hit = hits.get(key) if key else None
            if hit is not None:
                attempt, step_run_id = self._next_attempt(name, index)
                self.recorder.attempt(run_id=self.run_id, step_run_id=step_run_id, task=name, map_index=index,
                                      attempt=attempt, state="CACHED", step_ref=task.step.path, code_hash=code,
                                      cache_key=key, resources=task.resources.model_dump(mode="json"),
                                      inputs=unit_in, cached_from=hit[0], outputs=hit[1])
                progress.unit_outputs[index] = hit[1]
                continue
            all_cached = False
            self.active_units += 1
            enqueue(self, Unit(task, index, unit_in, key, seq=0))
        if len(progress.unit_outputs) == progress.size:
            return self._complete(progress, TaskState.CACHED if all_cached and progress.size else TaskState.SUCCEEDED)
        progress.state = TaskState.RUNNING
        self._notify(progress)

    def _task_code(self, name: str) -> str:
        """The code hash of the step as it runs now (kept for the task's launches)."""
        code = self._code[name] = code_hash(self._current_fn(name))
        return code

    def _current_fn(self, name: str) -> Callable[..., Any]:
        """The step's function as its file holds it now: workers import a `.py` file again once it changed
        (see `skyloop.execution.loading`), so a step of a file edited during the run is keyed in the cache
        by the code that runs, not by the code the run started with."""
        step = self.steps[name]
        ref = self.tasks[name].spec.step
        if not (step.importable and ref.module.endswith(".py")):
            return step.fn
        try:
            current = resolve(ref)
        except SpecError:  # a broken edit: the worker reports it when it loads the step
            return step.fn
        return current.fn if isinstance(current, Step) else step.fn

    # -- launching ---------------------------------------------------------------------------------
    def _payload(self, name: str) -> bytes | None:
        if name not in self.payloads:
            step = self.steps[name]
            self.payloads[name] = None if step.importable else cloudpickle.dumps(step.fn)
        return self.payloads[name]

    def estimate(self, unit: Unit) -> tuple[float, str]:
        """Expected seconds of one attempt of `unit`, and where that figure comes from.

        A unit of a step whose history varies in input size is fitted to its own inputs' size
        ("history-scaled", where size explains time). A unit of a `.map` whose step has no history takes
        the median of the units of its task that already ended in this run, once `SIBLINGS_NEEDED` have
        ("siblings").
        """
        name = unit.task.name
        samples = self._sized.get(name)
        if samples is not None and self._estimator is not None:
            key = (name, unit.index)  # a unit's inputs never change, nor does its fit
            if key not in self._unit_estimates:
                fitted = self._estimator.estimate(samples, input_bytes(unit.inputs))
                self._unit_estimates[key] = (fitted.seconds, fitted.source)
            return self._unit_estimates[key]
        found = self.estimates.get(name, (0.0, "default"))
        if found[1] == "default" and unit.index >= 0 and name in self._sibling_median:
            return self._sibling_median[unit.task.name], "siblings"
        return found

    def launch(self, unit: Unit) -> TaskLaunch:
        """Record a RUNNING attempt of `unit` (committed by the caller before launching) and build it."""
        launch = self._build(unit)
        self._record_launch(unit)
        return launch

    def _build(self, unit: Unit, after: After | None = None) -> TaskLaunch:
        task = unit.task
        unit.attempt, unit.step_run_id = self._next_attempt(task.name, unit.index)
        suffix = f"-{unit.index}" if unit.index >= 0 else ""
        unit.log_path = str(self.logs / f"{task.name}{suffix}.{unit.attempt}.log")
        estimate = self.estimate(unit)
        return TaskLaunch(
            key=unit.step_run_id, task_name=task.name, step=task.step, inputs=unit.inputs,
            output_names=[o.name for o in task.outputs], multi_output=task.multi_output,
            resources=task.resources, timeout=task.timeout, log_path=unit.log_path,
            artifacts_url=self.store.url, fn_payload=self._payload(task.name),
            run_id=self.run_id, db_url=self.db.url, home=self.home,
            estimate=None if estimate[1] == "default" else estimate[0], after=after,
        )

    def _record_launch(self, unit: Unit) -> None:
        task = unit.task
        self.recorder.attempt(run_id=self.run_id, step_run_id=unit.step_run_id, task=task.name,
                              map_index=unit.index, attempt=unit.attempt, state="RUNNING", step_ref=task.step.path,
                              code_hash=self._code.get(task.name) or self._task_code(task.name),
                              cache_key=unit.cache_key,
                              resources=task.resources.model_dump(mode="json"), inputs=unit.inputs,
                              log_path=unit.log_path, estimate=self.estimate(unit),
                              input_bytes=input_bytes(unit.inputs))

    # -- lookahead (see `skyloop.execution.lookahead`) ---------------------------------------------
    def ahead_of(self, unit: Unit) -> list[TaskLaunch]:
        """Launches of the tasks that wait only on `unit` (running, not mapped), to send before it ends.

        Only a task that is not mapped, has no `when` and no pool (the policy's queue holds pool limits),
        fits, and whose other inputs are known."""
        if unit.index >= 0 or unit.task.map_over:
            return []
        launches = []
        for name in self.dependents[unit.task.name]:
            task, progress = self.tasks[name].spec, self.tasks[name]
            if (progress.waiting_on != {unit.task.name} or task.map_over or task.when or task.pool is not None
                    or name in self.ahead or (name, -1) in self.prior.outputs
                    or not task.resources.fits(self.capacity)):
                continue
            from_upstream = {n: b.output for n, b in task.inputs.items()
                             if isinstance(b, TaskInput) and b.task == unit.task.name}
            try:
                known = {n: resolve_binding(b, self.params, self.tasks) for n, b in task.inputs.items()
                         if n not in from_upstream}
            except KeyError:
                continue
            after = After(key=unit.step_run_id, inputs=from_upstream, outputs=tuple(o.name for o in unit.task.outputs),
                          code_hash=self._task_code(name),
                          cache_version=task.cache.version if task.cache.enabled else None)
            sent = self.ahead[name] = Unit(task, -1, known, None, seq=0)
            launches.append(self._build(sent, after))
        return launches

    def _confirm(self, progress: TaskProgress, sent: Unit) -> bool:
        """Record the attempt of a task sent ahead, now that its upstream succeeded (its only one: no other
        check can fail); False, and the attempt is forgotten, when its inputs cannot be resolved."""
        task = progress.spec
        try:
            sent.inputs = {n: resolve_binding(b, self.params, self.tasks) for n, b in task.inputs.items()}
        except KeyError:
            self.forget_ahead(task.name)
            self.dropped.append(sent)
            return False  # activated as without lookahead, which records why
        del self.ahead[task.name]
        code = self._code.get(task.name) or self._task_code(task.name)
        sent.cache_key = cache_key(code, task.cache.version, sent.inputs) if task.cache.enabled else None
        progress.size = 1
        self.active_units += 1
        self._record_launch(sent)
        progress.state = TaskState.RUNNING
        self._notify(progress)
        return True

    def forget_ahead(self, name: str) -> None:
        """Drop the attempt of `name` sent ahead (its upstream did not succeed): as if never built."""
        if self.ahead.pop(name, None) is not None:
            self.prior.attempts[(name, -1)] -= 1

    # -- results -----------------------------------------------------------------------------------
    def finish(self, unit: Unit, result: TaskResult) -> float | None:
        """Take an attempt's end; returns the retry delay when the unit must run again, else None."""
        if result.code_hash is not None:  # sent ahead, it ran the code its file held once its upstream ended
            task = unit.task
            self._code[task.name] = result.code_hash
            unit.cache_key = cache_key(result.code_hash, task.cache.version, unit.inputs) if task.cache.enabled \
                else None
        self.recorder.finished(result, self.run_id, cache_key=unit.cache_key)
        progress = self.tasks[unit.task.name]
        seconds = result.seconds
        if unit.index >= 0 and result.state == TaskState.SUCCEEDED and seconds is not None:
            seen = self._siblings.setdefault(unit.task.name, [])
            if len(seen) < SIBLINGS_KEPT:
                seen.append(seconds)
                if len(seen) >= SIBLINGS_NEEDED:
                    self._sibling_median[unit.task.name] = statistics.median(seen)
        if progress.state.done:
            self.active_units -= 1
            return None  # a sibling unit already failed the task
        if result.state in (TaskState.SUCCEEDED, TaskState.CACHED):  # CACHED: found by a worker (lookahead)
            missing = [o.name for o in unit.task.outputs if o.name not in result.outputs]
            if not missing:
                self.active_units -= 1
                progress.unit_outputs[unit.index] = result.outputs
                self._notify(progress)
                if len(progress.unit_outputs) == progress.size:
                    self._complete(progress, result.state if unit.index < 0 else TaskState.SUCCEEDED)
                return None
        retry = unit.task.retry
        failures = unit.attempt - self.prior.spared.get((unit.task.name, unit.index), 0)
        if result.state != TaskState.CANCELLED and failures <= retry.retries:
            delay = retry.delay_after(failures)
            self.recorder.event(self.run_id, "step.retry", f"step {unit.task.name!r} attempt {unit.attempt} "
                                f"ended {result.state.value} ({result.error}); retrying in {delay:g}s", result.key)
            return delay
        self.active_units -= 1
        self._complete(progress, result.state, result.error)
        return None
