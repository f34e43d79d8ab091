"""Pool planning (`rank_together`) counts a mapped pool task by the units it still has to put through the pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyloop import Resources, Settings, pipeline, step
from skyloop.execution.api import prepare
from skyloop.execution.estimates import rank_together
from skyloop.execution.history import Prior
from skyloop.execution.recorder import Recorder
from skyloop.execution.runstate import RunState
from skyloop.execution.tasks import TaskState
from skyloop.scheduling.candidates import PolicyConfig
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.workspace import Workspace


@step(cache=False)
def items(n: int) -> list[int]:
    return list(range(n))


@step(cache=False, pool="trainer")
def train(i: int) -> int:
    return i


@step(cache=False)
def report(xs: list[int]) -> int:
    return len(xs)


@step(cache=False, pool="trainer")
def fit(x: int) -> int:
    return x


@pipeline
def sweep(n: int = 10):
    return report(train.map(items(n)))


@pipeline
def single(x: int = 1):
    return fit(x)


CAPACITY = Resources(cpus=4, memory=2**33, gpus=0)


@pytest.mark.parametrize(("limit", "ended", "rank"), [  # (a pool of `limit`, units that ended, rank of train)
    (1, 0, 10 * 2.0 + 1.0),  # ten 2 s units one after the other, then the 1 s report (it was 3 s: one unit)
    (5, 0, 2 * 2.0 + 1.0),  # five at a time
    (1, 4, 6 * 2.0 + 1.0),  # the units that ended are past the pool
    (20, 0, 2.0 + 1.0),  # all at once
])
def test_a_mapped_pool_task_is_planned_as_long_as_its_units_take_through_the_pool(
        settings: Settings, tmp_path: Path, limit: int, ended: int, rank: float) -> None:
    ws = Workspace.open(settings)
    try:
        def held(run_id: str, prepared_run: object, estimates: dict[str, tuple[float, str]]) -> RunState:
            return RunState(run_id, prepared_run, Prior(), db=ws.db, store=ws.store,  # type: ignore[arg-type]
                            recorder=Recorder(ws.db), capacity=CAPACITY, backend_name="inline",
                            logs=tmp_path / "logs", estimates=estimates)

        swept = held("sweep", prepare(sweep, {"n": 10}),
                     {"items": (0.1, "history"), "train": (2.0, "history"), "report": (1.0, "history")})
        other = held("single", prepare(single, {}), {"fit": (5.0, "history")})
        # The sweep's list is in and its ten units are out, `ended` of them already through the pool.
        swept.tasks["items"].state = TaskState.SUCCEEDED
        progress = swept.tasks["train"]
        progress.state, progress.size = TaskState.RUNNING, 10
        for i in range(ended):
            progress.unit_outputs[i] = {"output": ArtifactRef(f"{i}", "pickle", "int", 1)}
        assert rank_together([swept, other], PolicyConfig(pools={"trainer": limit}), CAPACITY)
        # At least the time through the pool and the report after it; at most with the single run's 5 s member
        # in front of it, or behind it on the pool's lane (a member carries those queued behind it).
        assert rank - 1e-9 <= swept.ranks["train"] <= rank + 5.0 + 1e-9
    finally:
        ws.close()
