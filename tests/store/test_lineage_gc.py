"""Lineage of real pipeline runs, pins, and garbage collection that never takes what is still needed."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import select
from tests_support import age_blobs

from skyloop import Run, Settings, run
from skyloop.errors import NotFound, SpecError
from skyloop.execution import runstate
from skyloop.store import gc, lineage
from skyloop.store.artifacts import ArtifactRef, ArtifactStore
from skyloop.store.gc import collect_garbage, parse_age
from skyloop.store.models import Artifact, ArtifactPin, Lineage, StepRunRow
from skyloop.store.runs import create_run, release_run, utcnow
from skyloop.store.serializers import serialize
from skyloop.store.workspace import Workspace

NOW = timedelta(0)
N = 3000
LISTED = list(range(N))  # make's output: large enough to be a blob file
SUMMED = sum(LISTED)  # total's output: small enough to be kept inline in the DB


def run_chain(chain: ModuleType, settings: Settings, n: int = N) -> Run:
    """Run the chain, its blobs aged past what garbage collection keeps as possibly in flight."""
    result = run(chain.chain, {"n": n}, backend="inline", settings=settings)
    result._ws.close()  # the returned Run keeps its workspace open for lazy output loading
    assert result.status == "SUCCEEDED", result.error
    age_blobs(result._ws.store)
    return result


def states(result: Run) -> dict[str, str]:
    return {task: info.state.value for task, info in result.steps.items()}


def digest_of(value: object) -> str:
    """The digest the store gives `value` (equal values, equal digests), without storing anything."""
    return hashlib.sha256(serialize(value)[1]).hexdigest()


def artifact_row(workspace: Workspace, digest: str) -> Artifact:
    with workspace.db.session() as session:
        row = session.get(Artifact, digest)
    assert row is not None
    return row


def stored(workspace: Workspace, digest: str) -> bool:
    """Whether the artifact is live: its row not marked deleted and its bytes in the DB or a blob file."""
    row = artifact_row(workspace, digest)
    present = row.data is not None or workspace.store.exists(digest)
    assert present == (row.deleted_at is None), "a live row must have its bytes, a deleted one none"
    return present


def test_producers_and_consumers_name_the_steps(chain: ModuleType, settings: Settings,
                                                workspace: Workspace) -> None:
    first = run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    with workspace.db.session() as session:
        made = lineage.producers(session, listed)
        assert [(e.run_id, e.task, e.map_index, e.name, e.direction) for e in made] == \
            [(first.id, "make", -1, "output", "out")]
        read = lineage.consumers(session, listed)
        assert [(e.run_id, e.task, e.name, e.direction) for e in read] == [(first.id, "total", "xs", "in")]
        assert [e.task for e in lineage.producers(session, summed)] == ["total"]
        assert lineage.consumers(session, summed) == []
        step = session.get(StepRunRow, made[0].step_run_id)
        assert step is not None and (step.run_id, step.task, step.state) == (first.id, "make", "SUCCEEDED")
        with pytest.raises(NotFound):
            lineage.producers(session, "0" * 64)
    row = artifact_row(workspace, listed)
    assert (row.serializer, row.type_name, row.deleted_at) == ("json", "list", None)
    assert row.size == len(workspace.store.get_bytes(listed))


def test_a_cached_rerun_adds_lineage_and_touches_the_artifacts(chain: ModuleType, settings: Settings,
                                                               workspace: Workspace) -> None:
    first = run_chain(chain, settings)
    listed = digest_of(LISTED)
    used = artifact_row(workspace, listed).last_used_at
    second = run_chain(chain, settings)
    assert states(second) == {"make": "CACHED", "total": "CACHED"}
    with workspace.db.session() as session:
        assert [e.run_id for e in lineage.producers(session, listed)] == [first.id, second.id]
        assert [e.run_id for e in lineage.consumers(session, listed)] == [first.id, second.id]
    assert artifact_row(workspace, listed).last_used_at > used


def test_record_artifacts_upserts_and_revives(workspace: Workspace) -> None:
    ref = workspace.store.put({"v": 1})
    assert ref.data is not None
    with workspace.db.session() as session:
        lineage.record_artifacts(session, [ref, ref])  # the same digest twice in one batch
    created = artifact_row(workspace, ref.digest)
    assert created.data == ref.data
    with workspace.db.session() as session:
        row = session.get(Artifact, ref.digest)
        assert row is not None
        row.deleted_at, row.data = utcnow(), None  # what garbage collection leaves
    with workspace.db.session() as session:
        lineage.record_artifacts(session, [ref])
    again = artifact_row(workspace, ref.digest)
    assert (again.deleted_at, again.data) == (None, ref.data)
    assert again.created_at == created.created_at
    assert again.last_used_at >= created.last_used_at


def test_gc_deletes_unreferenced_artifacts_of_finished_runs(chain: ModuleType, settings: Settings,
                                                            workspace: Workspace) -> None:
    run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    dry = collect_garbage(workspace, NOW, dry_run=True)
    assert (dry.dry_run, dry.artifacts, sorted(dry.digests)) == (True, 2, sorted([listed, summed]))
    assert stored(workspace, listed) and stored(workspace, summed)

    report = collect_garbage(workspace, NOW)
    assert (report.dry_run, report.artifacts, sorted(report.digests)) == (False, 2, sorted([listed, summed]))
    assert report.bytes == artifact_row(workspace, listed).size + artifact_row(workspace, summed).size
    for digest in (listed, summed):
        assert not stored(workspace, digest)
    with workspace.db.session() as session:  # lineage stays: the history of a run is never rewritten
        assert [e.task for e in lineage.producers(session, listed)] == ["make"]
    assert collect_garbage(workspace, NOW).artifacts == 0


def test_gc_keeps_recently_used_artifacts(chain: ModuleType, settings: Settings, workspace: Workspace) -> None:
    run_chain(chain, settings)
    assert collect_garbage(workspace, timedelta(hours=1)).artifacts == 0
    assert collect_garbage(workspace, parse_age("1d")).artifacts == 0


@pytest.mark.parametrize("pinned_task", ["make", "total"])  # a blob file, an inline value
def test_gc_never_takes_a_pinned_artifact(chain: ModuleType, settings: Settings, workspace: Workspace,
                                          pinned_task: str) -> None:
    run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    kept, taken = (listed, summed) if pinned_task == "make" else (summed, listed)
    with workspace.db.session() as session:
        lineage.pin(session, kept, "model:adder/1")
        lineage.pin(session, kept, "model:adder/2")
    assert collect_garbage(workspace, NOW).digests == [taken]
    assert stored(workspace, kept) and not stored(workspace, taken)
    with workspace.db.session() as session:
        lineage.unpin(session, kept, "model:adder/1")
    assert collect_garbage(workspace, NOW).artifacts == 0  # another holder still pins it
    with workspace.db.session() as session:
        lineage.unpin(session, kept, "model:adder/2")
        assert session.scalars(select(ArtifactPin)).all() == []
    assert collect_garbage(workspace, NOW).digests == [kept]
    assert not stored(workspace, kept)


def test_gc_never_takes_an_artifact_a_running_run_uses(chain: ModuleType, settings: Settings,
                                                       workspace: Workspace) -> None:
    run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    with workspace.db.session() as session:
        create_run(session, run_id="live", pipeline="consumer", spec={}, params={}, backend="local",
                   owner="other-host:1:abc", lease_seconds=60)
        session.add(StepRunRow(id="live-step", run_id="live", task="use", map_index=-1, attempt=1, state="RUNNING",
                               step_ref="mod:use", resources={}, created_at=utcnow(), started_at=utcnow()))
        session.flush()
        lineage.record_edges(session, "live-step", "in", [("xs", listed, -1)])
    assert collect_garbage(workspace, NOW).digests == [summed]
    assert stored(workspace, listed)
    with workspace.db.session() as session:
        assert [e.run_id for e in lineage.consumers(session, listed)][-1] == "live"
        release_run(session, "live", "other-host:1:abc", "FAILED", "gave up")
    assert collect_garbage(workspace, NOW).digests == [listed]
    assert not stored(workspace, listed)


def test_a_rerun_after_gc_recomputes_what_was_collected(chain: ModuleType, settings: Settings,
                                                        workspace: Workspace) -> None:
    first = run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    with workspace.db.session() as session:
        lineage.pin(session, summed, "model:adder/1")
    assert collect_garbage(workspace, NOW).digests == [listed]
    with pytest.raises(NotFound, match="1 of its outputs were deleted by garbage collection"):
        Run(workspace, first.id).output("make")

    second = run_chain(chain, settings)
    # make's output was collected, so make runs again; total's inputs have the same digest and
    # its pinned output survived, so total is still a cache hit.
    assert states(second) == {"make": "SUCCEEDED", "total": "CACHED"}
    assert workspace.store.get(ArtifactRef(listed, "json", "list", 0), verify=True) == LISTED
    assert stored(workspace, listed)
    again = Run(workspace, second.id)
    assert again.output("make") == LISTED
    assert again.output("total") == SUMMED
    assert Run(workspace, first.id).output("make") == LISTED  # equal bytes: the blob is back
    with workspace.db.session() as session:
        makers = lineage.producers(session, listed)
    assert [(e.run_id, e.task) for e in makers] == [(first.id, "make"), (second.id, "make")]


def test_a_rerun_after_gc_of_an_inline_output_recomputes_it(chain: ModuleType, settings: Settings,
                                                            workspace: Workspace) -> None:
    run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    with workspace.db.session() as session:
        lineage.pin(session, listed, "dataset:numbers/1")
    assert collect_garbage(workspace, NOW).digests == [summed]
    second = run_chain(chain, settings)
    assert states(second) == {"make": "CACHED", "total": "SUCCEEDED"}
    assert stored(workspace, summed)
    assert Run(workspace, second.id).output("total") == SUMMED


def test_a_rerun_after_collecting_everything_runs_every_step(chain: ModuleType, settings: Settings,
                                                             workspace: Workspace) -> None:
    run_chain(chain, settings)
    assert collect_garbage(workspace, NOW).artifacts == 2
    second = run_chain(chain, settings)
    assert states(second) == {"make": "SUCCEEDED", "total": "SUCCEEDED"}
    assert Run(workspace, second.id).output("total") == SUMMED
    third = run_chain(chain, settings)
    assert states(third) == {"make": "CACHED", "total": "CACHED"}


def test_gc_of_nothing_is_an_empty_report(workspace: Workspace) -> None:
    report = collect_garbage(workspace, NOW)
    assert (report.artifacts, report.bytes, report.digests) == (0, 0, [])


def test_gc_keeps_every_lineage_edge(chain: ModuleType, settings: Settings, workspace: Workspace) -> None:
    run_chain(chain, settings)
    with workspace.db.session() as session:
        count = len(session.scalars(select(Lineage)).all())
    collect_garbage(workspace, NOW)
    with workspace.db.session() as session:
        assert len(session.scalars(select(Lineage)).all()) == count


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400), ("12h", 12 * 3600), ("15m", 900), ("90s", 90), ("2w", 14 * 86400), (" 1.5h ", 5400),
])
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "3 days", "1y"])
def test_parse_age_rejects_nonsense(text: str) -> None:
    with pytest.raises(SpecError, match="30d"):
        parse_age(text)


def _last_used(workspace: Workspace, digest: str, hours_ago: float) -> None:
    with workspace.db.session() as session:
        row = session.get(Artifact, digest)
        assert row is not None
        row.last_used_at = utcnow() - timedelta(hours=hours_ago)


def test_gc_keeps_a_blob_a_writer_reuses_while_it_collects(chain: ModuleType, settings: Settings,
                                                           workspace: Workspace) -> None:
    # An old output's bytes are those a new writer is storing (a step's result, a model file): the writer
    # finds the blob, gc marks the old row and would delete the blob, then the writer records its row.
    run_chain(chain, settings)
    listed = digest_of(LISTED)
    _last_used(workspace, listed, hours_ago=2)
    ref = workspace.store.put(LISTED)  # the writer, before it records
    report = collect_garbage(workspace, timedelta(hours=1))
    assert listed not in report.digests
    with workspace.db.session() as session:
        lineage.record_artifacts(session, [ref])  # the writer records it
    assert stored(workspace, listed) and workspace.store.get(ref, verify=True) == LISTED


def test_gc_deletes_only_the_blobs_of_rows_it_marked(chain: ModuleType, settings: Settings,
                                                     workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between the query for victims and the marking, a writer used one of them (PostgreSQL lets it in).
    run_chain(chain, settings)
    listed = digest_of(LISTED)
    with workspace.db.read() as session:
        listed_before = session.get(Artifact, listed)
    _last_used(workspace, listed, hours_ago=0)  # the writer's use, after the query saw it old
    monkeypatch.setattr(gc, "collectable_artifacts", lambda session, cutoff: [listed_before])
    report = collect_garbage(workspace, timedelta(minutes=30))
    assert (report.artifacts, report.digests) == (0, [])
    assert stored(workspace, listed)


@pytest.mark.parametrize("lands", ["after make's lookup", "after total's lookup", "before make's blob is touched"])
def test_a_gc_that_lands_while_a_rerun_takes_a_cache_hit_never_fails_the_run(
        chain: ModuleType, settings: Settings, workspace: Workspace, monkeypatch: pytest.MonkeyPatch,
        lands: str) -> None:
    # Another process's `skyloop artifacts gc` runs between the rerun's cache query and its use of the hit.
    run_chain(chain, settings)
    listed, summed = digest_of(LISTED), digest_of(SUMMED)
    collected: list[list[str]] = []

    def collect() -> None:
        if not collected:
            collected.append(sorted(collect_garbage(workspace, NOW).digests))

    if lands.startswith("after"):
        real_find = runstate.find_cached
        found = listed if lands == "after make's lookup" else summed

        def find_then_collect(*args: Any, **kwargs: Any) -> Any:
            hits = real_find(*args, **kwargs)
            if any(ref.digest == found for _, outputs in hits.values() for ref in outputs.values()):
                collect()
            return hits

        monkeypatch.setattr(runstate, "find_cached", find_then_collect)
    else:
        real_touch = ArtifactStore.touch

        def collect_then_touch(self: ArtifactStore, digest: str, size: int | None = None) -> bool:
            collect()
            return real_touch(self, digest, size)

        monkeypatch.setattr(ArtifactStore, "touch", collect_then_touch)

    second = run_chain(chain, settings)
    expected = {
        # The lookup touched make's blob, so the collection kept it; total's row it marked deleted before
        # total's lookup: total runs again.
        "after make's lookup": ([summed], {"make": "CACHED", "total": "SUCCEEDED"}),
        # total's inline row, marked deleted after its lookup found it, is taken back when the hit is recorded.
        "after total's lookup": ([summed], {"make": "CACHED", "total": "CACHED"}),
        # Both collected before the hit was used: the steps run again instead of failing on a missing blob.
        "before make's blob is touched": (sorted([listed, summed]), {"make": "SUCCEEDED", "total": "SUCCEEDED"}),
    }[lands]
    assert (collected, states(second)) == ([expected[0]], expected[1])
    assert stored(workspace, listed) and stored(workspace, summed)
    again = Run(workspace, second.id)
    assert (again.output("make"), again.output("total")) == (LISTED, SUMMED)
    assert states(run_chain(chain, settings)) == {"make": "CACHED", "total": "CACHED"}
