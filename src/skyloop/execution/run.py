"""`Run`: what a finished (or running) pipeline run looks like to a user or a notebook."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from skyloop.errors import NotFound, StepFailed
from skyloop.execution.history import Prior, load_prior
from skyloop.execution.tasks import TaskState
from skyloop.spec.pipeline import PipelineSpec
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.models import StepRunRow
from skyloop.store.runs import get_run, step_runs
from skyloop.store.workspace import Workspace

__all__ = ["Run", "StepInfo", "summarize_task"]

_FAILURES = ("FAILED", "TIMED_OUT", "CRASHED", "OUT_OF_MEMORY", "CANCELLED", "UPSTREAM_FAILED")


@dataclass
class StepInfo:
    """One task of a run: its state, its attempts and, for a mapped task, its units."""

    task: str
    state: TaskState
    attempts: int = 0
    units: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None
    log_paths: list[str] = field(default_factory=list)
    """The log files of its attempts that printed something (a quiet attempt leaves none)."""
    estimate: float | None = None
    """Seconds the scheduler expected one attempt to take (mean over the units it launched)."""
    actual: float | None = None
    """Seconds one attempt took (mean over the units that ran to success)."""
    estimate_source: str | None = None
    """Where the estimate came from (see `StepRunRow.estimate_source`); `mixed` when the units' sources differ."""

    @property
    def status(self) -> str:
        """Its state's name, as `Run.status` is the run's (`SUCCEEDED`, `FAILED`, ...)."""
        return self.state.value

    @property
    def seconds(self) -> float | None:
        """Wall time from the first start to the last end."""
        if self.started_at and self.ended_at:
            return (self.ended_at - self.started_at).total_seconds()
        return None


def summarize_task(task: str, rows: list[StepRunRow]) -> StepInfo:
    """Fold a task's attempt rows (oldest first) into one state."""
    latest: dict[int, StepRunRow] = {}
    for row in rows:
        if row.map_index < 0:
            latest = {-1: row}  # a task-level verdict (skip, upstream failure) replaces earlier units
        else:
            latest.pop(-1, None)
            latest[row.map_index] = row
    states = [r.state for r in latest.values()]
    failure = next((s for s in _FAILURES if s in states), None)
    if failure:
        state = failure
    elif "RUNNING" in states or "PENDING" in states:
        state = "RUNNING"
    elif states and all(s == "CACHED" for s in states):
        state = "CACHED"
    elif states and all(s == "SKIPPED" for s in states):
        state = "SKIPPED"
    else:
        state = "SUCCEEDED" if states else "PENDING"
    starts = [r.started_at for r in rows if r.started_at]
    ends = [r.ended_at for r in latest.values() if r.ended_at]
    errors = [r.error for r in latest.values() if r.error and r.state in _FAILURES]
    estimates = [r.estimate_seconds for r in latest.values() if r.estimate_seconds is not None]
    sources = {r.estimate_source for r in latest.values() if r.estimate_source}
    durations = [(r.ended_at - r.started_at).total_seconds() for r in latest.values()
                 if r.state == "SUCCEEDED" and r.started_at and r.ended_at]
    return StepInfo(
        task=task, state=TaskState(state), attempts=len(rows), units=len(latest),
        estimate=sum(estimates) / len(estimates) if estimates else None,
        actual=sum(durations) / len(durations) if durations else None,
        estimate_source=(sources.pop() if len(sources) == 1 else "mixed") if sources else None,
        started_at=min(starts) if starts else None,
        ended_at=max(ends) if ends and len(ends) == len(latest) else None,
        error=errors[0] if errors else None,
        log_paths=[r.log_path for r in rows if r.log_path and os.path.exists(r.log_path)],
    )


class Run:
    """A pipeline run as stored: status, step states, outputs and logs."""

    def __init__(self, workspace: Workspace, run_id: str) -> None:
        self._ws = workspace
        with workspace.db.read() as session:
            row = get_run(session, run_id)
            rows = step_runs(session, row.id)
        self.id: str = row.id
        self.pipeline: str = row.pipeline
        self.status: str = row.status
        self.error: str | None = row.error
        self.params: dict[str, Any] = row.params
        self.backend: str | None = row.backend
        """The backend it ran on (None: queued for any agent, not claimed yet)."""
        self.created_at, self.started_at, self.ended_at = row.created_at, row.started_at, row.ended_at
        self.spec = PipelineSpec.model_validate(row.spec)
        by_task: dict[str, list[StepRunRow]] = {t.name: [] for t in self.spec.tasks}
        for r in rows:
            by_task.setdefault(r.task, []).append(r)
        self.steps: dict[str, StepInfo] = {t: summarize_task(t, rs) for t, rs in by_task.items()}

    def __repr__(self) -> str:
        return f"<Run {self.id[:12]} {self.pipeline} {self.status}>"

    @property
    def succeeded(self) -> bool:
        """Whether the run finished with every step done or rightly skipped."""
        return self.status == "SUCCEEDED"

    def raise_for_status(self) -> Run:
        """Raise `StepFailed` for the first failed step, else return the run."""
        if not self.succeeded:
            failed = next((s for s in self.steps.values() if s.state.value in _FAILURES), None)
            raise StepFailed(failed.task if failed else self.pipeline, failed.error or "" if failed else
                             self.error or self.status)
        return self

    def _prior(self) -> Prior:
        with self._ws.db.read() as session:
            return load_prior(session, self.id)

    @property
    def workspace(self) -> Workspace:
        """The metadata DB and artifact store this run lives in."""
        return self._ws

    def _refs(self, task: str, prior: Prior | None = None) -> dict[str, ArtifactRef | list[ArtifactRef]]:
        spec = self.spec.task(task) if task in self.steps else None
        if spec is None:
            raise NotFound(f"run {self.id[:12]} has no step {task!r}; steps are {list(self.steps)}")
        prior = prior or self._prior()
        if spec.map_over:
            units = sorted(i for (t, i) in prior.outputs if t == task and i >= 0)
            return {o.name: [prior.outputs[(task, i)][o.name] for i in units] for o in spec.outputs}
        if (task, -1) not in prior.outputs:
            raise NotFound(f"step {task!r} of run {self.id[:12]} has no outputs (it is {self.steps[task].state})")
        return dict(prior.outputs[(task, -1)])

    def _collected(self, task: str) -> int:
        """How many outputs of `task`'s finished units garbage collection deleted."""
        from skyloop.store.lineage import collected_outputs

        with self._ws.db.read() as session:
            return sum(1 for c in collected_outputs(session, self.id) if c.task == task)

    def output(self, task: str, name: str = "output") -> Any:
        """The value of one step output (a list for a mapped step)."""
        if task in self.steps and (collected := self._collected(task)):
            raise NotFound(f"step {task!r} of run {self.id[:12]}: {collected} of its outputs were deleted by "
                           "garbage collection (`skyloop artifacts gc`); run the pipeline again to make them again")
        refs = self._refs(task)
        if name not in refs:
            raise NotFound(f"step {task!r} has no output {name!r}; outputs are {list(refs)}")
        ref = refs[name]
        store = self._ws.store
        return [store.get(r) for r in ref] if isinstance(ref, list) else store.get(ref)

    def load(self, ref: ArtifactRef) -> Any:
        """The value stored at `ref` (one of `output_refs`)."""
        return self._ws.store.get(ref)

    def output_refs(self) -> dict[str, ArtifactRef | list[ArtifactRef] | None]:
        """Where the pipeline's declared outputs are stored, without loading them (None: not produced, its
        step skipped, failed or not run yet)."""
        refs: dict[str, ArtifactRef | list[ArtifactRef] | None] = {}
        prior = self._prior()  # read once for every output
        for name, b in self.spec.outputs.items():
            try:
                refs[name] = None if self._skipped(b.task) else self._refs(b.task, prior).get(b.output)
            except NotFound:
                refs[name] = None
        return refs

    @property
    def outputs(self) -> dict[str, Any]:
        """The pipeline's declared outputs, loaded from the artifact store; None for an output of a step its
        condition skipped (`output()` of that step raises NotFound)."""
        return {name: None if self._skipped(b.task) else self.output(b.task, b.output)
                for name, b in self.spec.outputs.items()}

    def _skipped(self, task: str) -> bool:
        info = self.steps.get(task)
        return info is not None and info.state.value == "SKIPPED"

    def logs(self, task: str) -> str:
        """Everything the step's attempts printed, oldest attempt first."""
        info = self.steps.get(task)
        if info is None:
            raise NotFound(f"run {self.id[:12]} has no step {task!r}; steps are {list(self.steps)}")
        parts = []
        for path in info.log_paths:
            file = Path(path)
            if file.exists():
                parts.append(f"==> {file.name} <==\n{file.read_text(errors='replace')}")
        return "\n".join(parts)
