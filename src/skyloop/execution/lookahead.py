"""Attempts sent before their upstream attempt ends, and what the worker does with them once it has.

On a backend that queues work and can make one task wait for another's result (Ray), a step whose
last missing upstream step is running may be sent at once, to start as soon as that upstream ends:
the orchestrator's own work for it (taking the upstream's end, activating the step, building and
sending its launch: most of a short step's cost in a chain) then happens while the upstream runs,
not between the two. What the step cannot know before its upstream ended travels as `After`:

- its inputs from the upstream, which the worker fills from the upstream's result;
- its cache lookup, which the worker makes against the metadata DB once the inputs are known; on a
  hit the attempt ends CACHED without running, as it would have without lookahead (a lookup that
  fails fails the attempt, which does not run);
- whether it runs at all: after an upstream that did not succeed it ends `NOT_RUN` (or with Ray's
  error, when the upstream's task itself was lost), and the orchestrator forgets it (no row was
  written for it) and goes on as without lookahead (a retry, or UPSTREAM_FAILED).

The orchestrator sends ahead only a step that nothing else competes with (its ready queue is empty,
so the policy has no order to keep), that waits on exactly one running attempt (not a `.map`), and
that has no `when` condition (its value is only known at the upstream's end), no pool and no timeout
(which must not run while it waits). Its attempt row is written when the orchestrator next activates
it after taking the upstream's end, and from then on the policy counts it as running.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from skyloop.errors import SkyloopError
from skyloop.execution.cache import cache_key, find_cached, lookup_connection
from skyloop.execution.tasks import InputValue, TaskLaunch, TaskResult, TaskState
from skyloop.execution.worker import loaded_code_hash
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.db import Database

__all__ = ["NOT_RUN", "Outcome", "fill", "not_run", "run_after"]

Outcome = tuple[TaskResult, bytes | None]
"""An attempt's result and, when it ran on another node, the tail of its log."""

NOT_RUN = "not run: its upstream attempt did not succeed"
"""The error of an attempt sent ahead whose upstream failed (the orchestrator drops it, unrecorded)."""

_databases: dict[str, Database] = {}
"""The metadata DBs this process looked up cache entries in, by URL (the last `DATABASES_KEPT`)."""
DATABASES_KEPT = 4
_stores: dict[str, ArtifactStore] = {}
"""The artifact stores whose blobs a cache hit here touched, by URL."""


def not_run(key: str, at: float | None = None) -> TaskResult:
    """How an attempt sent ahead ends when its upstream did not succeed (at `at`, or now): it never started."""
    return TaskResult(key=key, state=TaskState.CANCELLED, error=NOT_RUN, ended_at=time.time() if at is None else at)


def run_after(launch: TaskLaunch, upstream: TaskResult, run: Callable[[TaskLaunch], Outcome]) -> Outcome:
    """Run the attempt sent ahead of `upstream` with `run` once its inputs are filled in (see `fill`). When
    its file changed while it waited, the result names the code that ran (`TaskResult.code_hash`), so that
    its row and cache key are those of that code, not of the code it was sent with."""
    started = time.time()
    after = launch.after
    assert after is not None
    code = loaded_code_hash(launch) if upstream.state in (TaskState.SUCCEEDED, TaskState.CACHED) else None
    code = code if code != after.code_hash else None
    attempt = fill(launch, upstream, started, code)
    outcome = (attempt, None) if isinstance(attempt, TaskResult) else run(attempt)
    if code is not None and outcome[0].state != TaskState.CANCELLED:
        outcome[0].code_hash = code
    return outcome


def fill(launch: TaskLaunch, upstream: TaskResult, started: float, code: str | None = None) -> TaskLaunch | TaskResult:
    """`launch` with the inputs it takes from `upstream`; or how it ended without running (its upstream
    failed, or the cache has its result: looked up under `code`, the code hash of the function the worker
    loaded, when it differs from the one the attempt was sent with)."""
    after = launch.after
    assert after is not None
    if upstream.state not in (TaskState.SUCCEEDED, TaskState.CACHED) or not set(after.outputs) <= set(upstream.outputs):
        return not_run(launch.key, started)
    inputs: dict[str, InputValue] = {**launch.inputs,
                                     **{name: upstream.outputs[output] for name, output in after.inputs.items()}}
    if after.cache_version is not None and launch.db_url is not None:
        key = cache_key(code or after.code_hash, after.cache_version, inputs)
        try:
            db = _databases.pop(launch.db_url, None) or Database(launch.db_url, migrate=False)
            _databases[launch.db_url] = db  # the newest last
            while len(_databases) > DATABASES_KEPT:
                _databases.pop(next(iter(_databases))).dispose()
            with lookup_connection(db) as conn:
                store = _stores.get(launch.artifacts_url)
                if store is None:
                    store = _stores[launch.artifacts_url] = ArtifactStore(launch.artifacts_url)
                hit = find_cached(conn, [key], launch.output_names, store).get(key)
        except SkyloopError as exc:  # not run: it may be cached, and a cached step must not run again
            return TaskResult(key=launch.key, state=TaskState.FAILED, started_at=started, ended_at=time.time(),
                              error=f"the worker could not look the step up in the cache: {exc}; if workers "
                                    "cannot reach the metadata DB, set SKYLOOP_EXECUTION__LOOKAHEAD=false")
        if hit is not None:
            return TaskResult(key=launch.key, state=TaskState.CACHED, outputs=hit[1], cached_from=hit[0],
                              started_at=started, ended_at=started)
    return replace(launch, inputs=inputs, after=None)
