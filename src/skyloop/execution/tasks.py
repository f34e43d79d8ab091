"""What a backend is given (`TaskLaunch`) and what it gives back (`TaskResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactRef

__all__ = ["After", "Element", "Gathered", "InputValue", "Literal_", "TaskLaunch", "TaskResult", "TaskState",
           "input_digests", "input_edges"]


class TaskState(StrEnum):
    """States of one step attempt. The terminal ones say why it ended."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    CACHED = "CACHED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CRASHED = "CRASHED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    CANCELLED = "CANCELLED"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"

    @property
    def done(self) -> bool:
        """Whether the attempt has ended."""
        return self not in (TaskState.PENDING, TaskState.RUNNING)

    @property
    def ok(self) -> bool:
        """Whether the step's outputs are available (or the step was rightly skipped)."""
        return self in (TaskState.SUCCEEDED, TaskState.CACHED, TaskState.SKIPPED)


@dataclass(frozen=True)
class Literal_:
    """A parameter or constant passed by value."""

    value: Any


@dataclass(frozen=True)
class Gathered:
    """The outputs of a mapped task, passed on as one list."""

    refs: tuple[ArtifactRef, ...]


@dataclass(frozen=True)
class Element:
    """Item `index` of a list-valued input (the fan-out of `.map`)."""

    source: ArtifactRef | Literal_
    index: int
    key: str | None = None
    """A digest of the item's own value, where it has one (a plain value): units are then cached by their item,
    not by its place in the whole list (one item added re-runs one unit, not all)."""


InputValue = ArtifactRef | Gathered | Element | Literal_


def input_edges(inputs: dict[str, InputValue]) -> list[tuple[str, str, int]]:
    """Lineage edges `(name, digest, position)` for the artifacts an attempt reads."""
    edges: list[tuple[str, str, int]] = []
    for name, value in inputs.items():
        if isinstance(value, ArtifactRef):
            edges.append((name, value.digest, -1))
        elif isinstance(value, Gathered):
            edges.extend((name, ref.digest, i) for i, ref in enumerate(value.refs))
        elif isinstance(value, Element) and isinstance(value.source, ArtifactRef):
            edges.append((name, value.source.digest, value.index))
    return edges


def input_digests(inputs: dict[str, InputValue]) -> dict[str, str]:
    """Input name -> digest of the artifact it reads; a gathered input gives `name[0]`, `name[1]`, ...

    An element of a list-valued artifact names the whole list's digest (that is the artifact read).
    """
    digests: dict[str, str] = {}
    for name, value in inputs.items():
        if isinstance(value, ArtifactRef):
            digests[name] = value.digest
        elif isinstance(value, Gathered):
            digests.update((f"{name}[{i}]", ref.digest) for i, ref in enumerate(value.refs))
        elif isinstance(value, Element) and isinstance(value.source, ArtifactRef):
            digests[name] = value.source.digest
    return digests


@dataclass(frozen=True)
class After:
    """What an attempt sent before its upstream attempt ended (see `skyloop.execution.lookahead`) takes from it.

    The worker fills `inputs` (input name -> output name of the upstream step) from the upstream's result
    once it has one, and looks the attempt up in the cache (it could not be looked up before the
    upstream's outputs were known): on a hit it ends CACHED without running.
    """

    key: str
    """The upstream attempt's key."""
    inputs: dict[str, str]
    outputs: tuple[str, ...]
    """Every output the upstream step declares: without all of them its attempt did not succeed."""
    code_hash: str
    cache_version: str | None
    """The step's cache version; None when its cache is off."""


@dataclass
class TaskLaunch:
    """One step attempt for a backend to run."""

    key: str
    """Unique id of the attempt (the step run id)."""
    task_name: str
    step: StepRef
    inputs: dict[str, InputValue]
    output_names: list[str]
    multi_output: bool
    resources: Resources
    timeout: float | None
    log_path: str
    artifacts_url: str
    fn_payload: bytes | None = None
    """The function pickled by value, when it cannot be imported by reference (a notebook, `__main__`)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the step (e.g. `CUDA_VISIBLE_DEVICES`)."""
    run_id: str | None = None
    """The run the attempt belongs to, for `log_model` inside the step."""
    db_url: str | None = None
    """The run's metadata DB, where `log_model` inside the step registers; None: the environment's."""
    home: str | None = None
    """The run's skyloop home (with `db_url` and `artifacts_url`, the settings `log_model` uses)."""
    estimate: float | None = None
    """Expected seconds of the attempt, when learned (from history or finished siblings); None if not."""
    after: After | None = None
    """Set when the attempt is sent before its upstream ended: the inputs it still lacks."""


@dataclass
class TaskResult:
    """How an attempt ended."""

    key: str
    state: TaskState
    outputs: dict[str, ArtifactRef] = field(default_factory=dict)
    error: str | None = None
    """One line saying what went wrong."""
    traceback: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker: str | None = None
    max_rss: int | None = None
    code_hash: str | None = None
    """For an attempt sent ahead (`After`): the hash of the code its worker ran, when it is not the one the
    attempt was sent with (its file changed while it waited); the row and the cache key take it."""
    """Peak resident memory of the attempt in bytes, where the backend measures it."""
    cached_from: str | None = None
    """For a CACHED end: the earlier attempt whose outputs these are."""

    @property
    def seconds(self) -> float | None:
        """How long the attempt ran, when both ends are known."""
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)
