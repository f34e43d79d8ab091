"""How a worker loads a step's inputs: the items of a `.map` come from one load of the list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skyloop.execution import worker
from skyloop.execution.tasks import Element, Literal_
from skyloop.store.artifacts import ArtifactRef, ArtifactStore


class CountingStore(ArtifactStore):
    """A real store that counts how often a value is loaded."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.loads = 0

    def get(self, ref: ArtifactRef, verify: bool = False) -> Any:
        self.loads += 1
        return super().get(ref, verify)


def test_the_units_of_a_map_load_its_list_once_and_each_gets_its_own_item(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "artifacts"))
    records = store.put([{"id": i, "tags": [i]} for i in range(50)])
    items = [worker.load_input(Element(records, i), store) for i in range(50)]
    assert items == [{"id": i, "tags": [i]} for i in range(50)]
    assert store.loads == 1
    # A step that changes its item in place changes neither the kept list nor a retry's item.
    items[3]["tags"].append("changed")
    assert worker.load_input(Element(records, 3), store) == {"id": 3, "tags": [3]}
    assert store.loads == 1
    assert worker.load_input(Element(Literal_([7, 8]), 1), store) == 8


def test_only_the_last_few_lists_are_kept_and_large_ones_never(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "artifacts"))
    lists = [store.put(list(range(k, k + 3))) for k in range(worker.MAPPED_CACHE + 1)]
    assert [worker.load_input(Element(ref, 0), store) for ref in lists] == list(range(worker.MAPPED_CACHE + 1))
    loads = store.loads
    assert worker.load_input(Element(lists[-1], 2), store) == worker.MAPPED_CACHE + 2  # kept
    assert store.loads == loads
    assert worker.load_input(Element(lists[0], 1), store) == 1  # pushed out by the newer ones: loaded again
    assert store.loads == loads + 1
    big = store.put(list(range(10)))
    limit, worker.MAPPED_CACHE_BYTES = worker.MAPPED_CACHE_BYTES, big.size - 1
    try:
        before = store.loads
        assert [worker.load_input(Element(big, i), store) for i in (0, 9)] == [0, 9]
        assert store.loads == before + 2
    finally:
        worker.MAPPED_CACHE_BYTES = limit
