"""The input size recorded for each attempt (what size-scaled estimates are fitted to) is the unit's own."""

from __future__ import annotations

from pathlib import Path

from skyloop import Settings, run
from skyloop.execution.loading import load_file_module
from skyloop.store.models import StepRunRow
from skyloop.store.workspace import Workspace

SWEEP = '''
from skyloop import pipeline, step

@step(cache=False)
def items(n: int) -> list[int]:
    return list(range(n))

@step(cache=False)
def work(i: int) -> int:
    return i

@step(cache=False)
def whole(xs: list[int]) -> int:
    return len(xs)

@step(cache=False)
def total(ys: list[int]) -> int:
    return sum(ys)

@step(cache=False)
def each(y: int) -> int:
    return y

@pipeline
def sweep(n: int = 10):
    xs = items(n)
    ys = work.map(xs)
    return whole(xs), total(ys), each.map(ys)
'''


def test_a_mapped_unit_is_not_sized_by_the_whole_list(settings: Settings, tmp_path: Path) -> None:
    file = tmp_path / "sweep.py"
    file.write_text(SWEEP)
    sizes: dict[int, dict[str, set[int | None]]] = {}
    for n in (10, 300):
        result = run(load_file_module(file).sweep, {"n": n}, backend="inline", settings=settings)
        assert result.status == "SUCCEEDED", result.error
        ws = Workspace.open(settings)
        try:
            with ws.db.read() as session:
                rows = session.query(StepRunRow).filter_by(run_id=result.id).all()
                sizes[n] = {}
                for row in rows:
                    sizes[n].setdefault(row.task, set()).add(row.input_bytes)
        finally:
            ws.close()
    # A unit of `.map` over a list one step returned reads one element, whose size is not known: not sized
    # (it was sized by the whole list, so each unit of a longer sweep looked larger, though it did the same work).
    assert sizes[10]["work"] == sizes[300]["work"] == {None}
    # Whole artifacts are sized, and so is a unit that maps over a mapped step's outputs (one artifact each).
    (small,), (large,) = sizes[10]["whole"], sizes[300]["whole"]
    assert small is not None and large is not None and large > 10 * small
    assert None not in sizes[10]["total"] and None not in sizes[300]["each"]
