"""Lookahead on a real Ray: steps sent before their upstream ended, and chains run in one Ray task.

Each test checks what a run without lookahead gives too (outputs, states, attempts, cache keys),
what ran (each step appends to a trace file when it runs), and that lookahead really happened (a
spy on the backend's `submit_after` and `_send`, which it does not change).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests_support import collect

from skyloop import Settings, run
from skyloop.cli.render import run_json
from skyloop.config import ExecutionSettings
from skyloop.execution.backends.ray import RayBackend
from skyloop.execution.loading import load_file_module
from skyloop.execution.lookahead import NOT_RUN
from skyloop.execution.run import Run
from skyloop.execution.tasks import After, Literal_, TaskLaunch, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.models import Lineage, StepRunRow
from skyloop.store.workspace import Workspace

HERE = Path(__file__).parent
CHAINS = str(HERE / "chain_pipelines.py")
STEPS = str(HERE / "ray_steps.py")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chains() -> ModuleType:
    return load_file_module(CHAINS)


class Spy:
    """What the Ray backend was asked to send ahead, and the chains it sent (it still does all of it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.after: list[tuple[str, bool]] = []
        self.chains: list[list[str]] = []
        submit_after, send = RayBackend.submit_after, RayBackend._send

        def spy_submit_after(backend: RayBackend, launch: TaskLaunch, upstream: str) -> bool:
            taken = submit_after(backend, launch, upstream)
            self.after.append((launch.task_name, taken))
            return taken

        def spy_send(backend: RayBackend, *launches: TaskLaunch, **options: Any) -> None:
            if options.get("chained"):
                self.chains.append([launch.task_name for launch in launches])
            send(backend, *launches, **options)

        monkeypatch.setattr(RayBackend, "submit_after", spy_submit_after)
        monkeypatch.setattr(RayBackend, "_send", spy_send)

    def sent_ahead(self) -> list[str]:
        return [name for name, taken in self.after if taken]


def _run(target: Any, params: dict[str, Any], home: Path, lookahead: bool = True) -> Run:
    settings = Settings.for_home(home)
    settings.execution.lookahead = lookahead
    return run(target, params, backend="ray", settings=settings)


def _rows(home: Path, run_id: str) -> list[StepRunRow]:
    workspace = Workspace.open(Settings.for_home(home))
    try:
        with workspace.db.read() as session:
            return list(session.query(StepRunRow).filter_by(run_id=run_id).order_by(StepRunRow.created_at))
    finally:
        workspace.close()


def _inputs_recorded(home: Path, run_id: str) -> dict[str, int]:
    workspace = Workspace.open(Settings.for_home(home))
    try:
        with workspace.db.read() as session:
            rows = session.query(StepRunRow.task, Lineage.name).join(Lineage, Lineage.step_run_id == StepRunRow.id) \
                .filter(StepRunRow.run_id == run_id, Lineage.direction == "in").all()
            counts: dict[str, int] = {}
            for task, _ in rows:
                counts[task] = counts.get(task, 0) + 1
            return counts
    finally:
        workspace.close()


def _trace(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_chain_runs_in_one_task_and_is_recorded_as_without_lookahead(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    trace = tmp_path / "trace"
    ahead = _run(chains.counting, {"trace": str(trace)}, tmp_path / "on")
    assert ahead.status == "SUCCEEDED", ahead.error
    assert ahead.output("add_one-6") == 6
    assert _trace(trace) == [f"add_one({i})" for i in range(6)]  # each once, in order
    assert len(spy.sent_ahead()) == 5 and spy.chains and max(len(c) for c in spy.chains) >= 2
    spy.after.clear()
    plain = _run(chains.counting, {"trace": str(tmp_path / "trace2")}, tmp_path / "off", lookahead=False)
    assert spy.after == []  # turned off: nothing sent ahead
    assert plain.outputs == ahead.outputs
    assert {n: (s.state, s.attempts) for n, s in ahead.steps.items()} == \
        {n: (s.state, s.attempts) for n, s in plain.steps.items()}
    # The rows say the same: one SUCCEEDED attempt per step, with its cache key (the same inputs but
    # the trace's path give the same keys), inputs recorded in the lineage, and the worker that ran it.
    on, off = _rows(tmp_path / "on", ahead.id), _rows(tmp_path / "off", plain.id)
    assert [(r.task, r.attempt, r.state) for r in on] == [(r.task, r.attempt, r.state) for r in off]
    assert all(r.cache_key and r.worker and r.log_path and r.ended_at for r in on)
    assert _inputs_recorded(tmp_path / "on", ahead.id) == _inputs_recorded(tmp_path / "off", plain.id)


def test_a_worker_finds_the_cached_result_of_a_step_sent_ahead_and_does_not_run_it(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace, home = tmp_path / "trace", tmp_path / "home"
    first = _run(chains.cached_tail, {"x": 5, "trace": str(trace)}, home)
    assert first.status == "SUCCEEDED", first.error
    spy = Spy(monkeypatch)
    second = _run(chains.cached_tail, {"x": 5, "trace": str(trace)}, home)
    assert second.status == "SUCCEEDED", second.error
    assert second.output("add_one-2") == 7
    assert {n: s.state.value for n, s in second.steps.items()} == \
        {"origin": "SUCCEEDED", "add_one": "CACHED", "add_one-2": "CACHED"}
    assert _trace(trace) == ["origin", "add_one(5)", "add_one(6)", "origin"]  # the origin only ran again
    assert spy.sent_ahead() == ["add_one", "add_one-2"]  # their workers found the results
    earlier = {r.task: r.id for r in _rows(home, first.id)}
    again = {r.task: r for r in _rows(home, second.id)}
    assert again["add_one"].cached_from == earlier["add_one"]
    assert again["add_one-2"].cached_from == earlier["add_one-2"]


def test_a_retried_upstream_runs_its_follower_once_after_it(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    trace = tmp_path / "trace"
    result = _run(chains.retried_middle, {"x": 1, "trace": str(trace)}, tmp_path / "home")
    assert result.status == "SUCCEEDED", result.error
    assert result.output("add_one-2") == 21
    assert _trace(trace) == ["add_one(1)", "fails_first", "fails_first", "add_one(20)"]
    assert (result.steps["fails_first"].attempts, result.steps["add_one-2"].attempts) == (2, 1)
    assert spy.sent_ahead().count("add_one-2") == 2  # sent ahead of each attempt; the first one never ran
    rows = _rows(tmp_path / "home", result.id)
    assert [(r.attempt, r.state) for r in rows if r.task == "add_one-2"] == [(1, "SUCCEEDED")]


def test_two_steps_sent_ahead_of_one_upstream_are_each_retried(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    result = _run(chains.two_retried, {"x": 1, "trace": str(tmp_path / "trace")}, tmp_path / "home")
    assert result.status == "SUCCEEDED", result.error
    assert result.output("pair") == 20020
    assert {"flaky", "flaky-2"} <= set(spy.sent_ahead())
    assert (result.steps["flaky"].attempts, result.steps["flaky-2"].attempts) == (2, 2)


def test_steps_sent_ahead_do_not_hold_back_other_work(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    result = _run(chains.chain_beside_map, {"seconds": 0.5}, tmp_path / "home")
    assert result.status == "SUCCEEDED", result.error
    assert len(spy.sent_ahead()) >= 10  # most of the chain went ahead: counted as held, 10+ CPUs on 2
    rows = {(r.task, r.map_index): r for r in _rows(tmp_path / "home", result.id)}
    listed = rows[("spread", -1)].ended_at
    first = min(r.started_at for (task, index), r in rows.items() if index >= 0)
    assert listed is not None and first is not None
    # The map's units start as soon as their list is there, on the CPU the chain leaves free, not
    # after chain steps (0.5 s each) have ended to make room.
    assert (first - listed).total_seconds() < 0.25


def test_a_failed_upstream_leaves_the_steps_sent_ahead_unrun_and_unrecorded(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    trace = tmp_path / "trace"
    result = _run(chains.failed_middle, {"x": 1, "trace": str(trace)}, tmp_path / "home")
    assert result.status == "FAILED"
    assert "always_fails" in (result.error or "")
    assert _trace(trace) == ["add_one(1)", "always_fails"]
    assert {"add_one-2", "add_one-3"} <= set(spy.sent_ahead())
    rows = _rows(tmp_path / "home", result.id)
    assert [(r.task, r.attempt, r.state) for r in rows] == [
        ("add_one", 1, "SUCCEEDED"), ("always_fails", 1, "FAILED"),
        ("add_one-2", 1, "UPSTREAM_FAILED"), ("add_one-3", 1, "UPSTREAM_FAILED")]


def test_a_worker_dying_in_a_chain_is_retried_and_the_rest_runs_after(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    trace = tmp_path / "trace"
    result = _run(chains.crashed_middle, {"x": 1, "trace": str(trace)}, tmp_path / "home")
    assert result.status == "SUCCEEDED", result.error
    assert result.output("add_one-2") == 201
    assert any("dies_first" in chain for chain in spy.chains)  # it died inside a chain
    rows = _rows(tmp_path / "home", result.id)
    assert [(r.task, r.attempt, r.state) for r in rows] == [
        ("add_one", 1, "SUCCEEDED"), ("dies_first", 1, "CRASHED"), ("dies_first", 2, "SUCCEEDED"),
        ("add_one-2", 1, "SUCCEEDED")]
    assert _trace(trace).count("add_one(200)") == 1


@pytest.mark.parametrize("chained", [True, False])
def test_a_step_whose_worker_is_killed_started_when_its_upstream_ended_not_when_it_was_sent_ahead(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        chained: bool) -> None:
    spy = Spy(monkeypatch)
    trace, home = tmp_path / "trace", tmp_path / "home"
    target = chains.killed_after_slow if chained else chains.killed_alone_after_slow
    result = _run(target, {"seconds": 1.0, "trace": str(trace)}, home)
    assert result.status == "SUCCEEDED", result.error
    assert result.output("add_one") == 101
    # It was sent ahead of `slow`, in a chain with it or as a Ray task waiting on it, and so was `add_one`
    # after it: the worker SIGKILLed while it ran took `add_one` along, which never started then.
    assert {"killed_first", "add_one"} <= set(spy.sent_ahead())
    assert any("killed_first" in chain for chain in spy.chains) == chained
    assert _trace(trace) == ["slow", "killed_first", "killed_first", "add_one(100)"]
    rows = _rows(home, result.id)
    assert [(r.task, r.attempt, r.state) for r in rows] == [
        ("slow", 1, "SUCCEEDED"), ("killed_first", 1, "CRASHED"), ("killed_first", 2, "SUCCEEDED"),
        ("add_one", 1, "SUCCEEDED")]  # nothing recorded of the `add_one` that never started
    slow, killed, again = rows[:3]
    assert slow.ended_at is not None and killed.started_at is not None and killed.ended_at is not None
    # Not when it was sent (before `slow` even started): it could only start once `slow` ended.
    assert slow.ended_at <= killed.started_at <= killed.ended_at
    assert (killed.ended_at - killed.started_at).total_seconds() < 1.0  # `slow`'s second is not counted
    # `runs show` times the step from there to its retry's end.
    shown = run_json(result)["steps"]["killed_first"]
    assert again.ended_at is not None
    assert shown["seconds"] == pytest.approx((again.ended_at - killed.started_at).total_seconds())


def test_a_step_with_a_timeout_is_not_sent_ahead_and_its_clock_runs_once_it_was_sent(
        ray_session: ModuleType, chains: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    # Sent ahead, it would wait 1.5 s in Ray's queue with a 1 s timeout: it goes once its upstream ended.
    fine = _run(chains.timed_after_slow, {"trace": str(tmp_path / "t1")}, tmp_path / "home")
    assert fine.status == "SUCCEEDED", fine.error
    assert ("timed", False) in spy.after and "timed" not in spy.sent_ahead()
    slow = _run(chains.timed_after_slow, {"trace": str(tmp_path / "t2"), "slow_seconds": 0.5, "timed_seconds": 30.0},
                tmp_path / "home")
    info = slow.steps["timed"]
    assert (slow.status, info.state.value) == ("FAILED", "TIMED_OUT")
    assert info.seconds is not None and info.seconds < 10


# -- the backend on its own ------------------------------------------------------------------------

def _launch(tmp_path: Path, qualname: str, after: TaskLaunch | None = None, input_name: str = "a",
            **inputs: object) -> TaskLaunch:
    key = f"{qualname}-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name=qualname, step=StepRef(module=STEPS, qualname=qualname),
        inputs={name: Literal_(value) for name, value in inputs.items()}, output_names=["output"],
        multi_output=False, resources=Resources(), timeout=None, log_path=str(tmp_path / "logs" / f"{key}.log"),
        artifacts_url=str(tmp_path / "artifacts"),
        after=None if after is None else After(key=after.key, inputs={input_name: "output"}, outputs=("output",),
                                                code_hash="-", cache_version=None),
    )



def test_cancelling_a_step_in_a_chain_sends_those_before_it_again_and_ends_those_after(
        ray_session: ModuleType, tmp_path: Path) -> None:
    backend = RayBackend(ExecutionSettings())
    backend.start()
    try:
        first = _launch(tmp_path, "sleep", seconds=1.0)
        middle = _launch(tmp_path, "add", after=first, b=1)
        last = _launch(tmp_path, "add", after=middle, b=1)
        backend.submit(first)
        assert backend.submit_after(middle, first.key) and backend.submit_after(last, middle.key)
        assert backend.wait(0.3) == []  # the chain is sent and its first step runs
        backend.cancel(middle.key)
        results = collect(backend, 3)
        assert results[first.key].state == TaskState.SUCCEEDED  # sent again on its own, and ran
        assert (results[middle.key].state, results[middle.key].error) == (TaskState.CANCELLED, "cancelled")
        assert (results[last.key].state, results[last.key].error) == (TaskState.CANCELLED, NOT_RUN)
        # Uncut, a chain hands each result on: the step after reads the one before.
        again = _launch(tmp_path, "add", a=1, b=1)
        then = _launch(tmp_path, "add", after=again, b=10)
        backend.submit(again)
        assert backend.submit_after(then, again.key)
        outputs = collect(backend, 2)
        assert outputs[then.key].state == TaskState.SUCCEEDED, outputs[then.key].error
        store = ArtifactStore(str(tmp_path / "artifacts"))
        assert store.get(outputs[then.key].outputs["output"]) == 12
    finally:
        backend.shutdown()


EDITED = '''
import time
from pathlib import Path

from skyloop import pipeline, step


@step(cache=False)
def prepare(path: str, edit: bool) -> int:
    if edit:  # the file of the step sent ahead of this one changes while it waits
        source = Path(path).read_text()
        Path(path).write_text(source.replace('return "v" + "1"', 'return "v" + "2"'))
    time.sleep(0.5)
    return 1


@step
def report(x: int) -> str:
    return "v" + "1"


@pipeline
def edited(path: str = "", edit: bool = False):
    return report(prepare(path, edit))
'''


def test_a_step_sent_ahead_whose_file_changed_while_it_waited_is_recorded_and_cached_as_the_code_that_ran(
        ray_session: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skyloop.pipelines.step import code_hash

    spy = Spy(monkeypatch)
    file = tmp_path / "edited.py"
    file.write_text(EDITED)
    first = _run(load_file_module(str(file)).edited, {"path": str(file), "edit": True}, tmp_path / "home")
    assert first.status == "SUCCEEDED", first.error
    assert "report" in spy.sent_ahead()
    assert first.outputs == {"output": "v2"}  # the worker ran the file as it was once `prepare` ended
    ran = code_hash(load_file_module(str(file)).report.fn)
    (row,) = [r for r in _rows(tmp_path / "home", first.id) if r.task == "report"]
    assert row.code_hash == ran  # not the hash of the code it was sent with

    file.write_text(EDITED)  # back to v1: v2's result must not be taken for it
    second = _run(load_file_module(str(file)).edited, {"path": str(file), "edit": False}, tmp_path / "home")
    assert second.status == "SUCCEEDED", second.error
    assert (second.outputs, second.steps["report"].state.value) == ({"output": "v1"}, "SUCCEEDED")
    third = _run(load_file_module(str(file)).edited, {"path": str(file), "edit": False}, tmp_path / "home")
    assert (third.outputs, third.steps["report"].state.value) == ({"output": "v1"}, "CACHED")


def test_attempts_waiting_on_another_hold_no_room_from_a_launch_with_a_timeout(
        ray_session: ModuleType, tmp_path: Path) -> None:
    # Three steps sent ahead of a 2 s step wait on it in Ray, holding no CPU: a launch with a timeout must
    # not be held back for them (on 2 CPUs, the running step leaves one free).
    backend = RayBackend(ExecutionSettings())
    backend.start()
    try:
        first = _launch(tmp_path, "sleep", seconds=2.0)
        backend.submit(first)
        previous = first
        for _ in range(3):
            follower = _launch(tmp_path, "add", after=previous, b=1)
            assert backend.submit_after(follower, previous.key)
            previous = follower
        timed = dataclasses.replace(_launch(tmp_path, "add", a=1, b=2), timeout=30.0)
        backend.submit(timed)
        results = collect(backend, 5)
        assert {r.state for r in results.values()} == {TaskState.SUCCEEDED}
        assert results[timed.key].started_at < results[first.key].ended_at  # it ran beside the first step
    finally:
        backend.shutdown()
