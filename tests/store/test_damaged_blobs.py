"""Blobs a crash or the disk damaged: never a cache hit, named when a step reads them, and healed by the next run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from skyloop import Run, Settings, run
from skyloop.errors import IntegrityError
from skyloop.store.artifacts import ArtifactRef, ArtifactStore

ARRAY = '''
import numpy as np
from skyloop import pipeline, step


@step
def make(n: int) -> np.ndarray:
    return np.arange(float(n))


@step
def total(xs: np.ndarray, k: int) -> float:
    return float(xs.sum()) * k


@pipeline
def arrays(n: int = 1000, k: int = 1):
    return total(make(n), k)
'''

EXPECTED = float(sum(range(1000)))


@pytest.fixture
def arrays(write_module: Any) -> ModuleType:
    """`make(n) -> np.arange(n)` (an 8 KB blob) feeding `total(xs, k) -> sum(xs) * k`."""
    module: ModuleType = write_module("arrays_pipeline", ARRAY)
    return module


def run_arrays(arrays: ModuleType, settings: Settings, k: int) -> Run:
    result = run(arrays.arrays, {"k": k}, backend="inline", settings=settings)
    result._ws.close()  # the returned Run keeps its workspace open for lazy output loading
    return result


def states(result: Run) -> dict[str, str]:
    return {task: info.state.value for task, info in result.steps.items()}


def made_blob(settings: Settings) -> Path:
    """The blob file of `make`'s array."""
    blobs = [p for p in (settings.home / "artifacts").rglob("*") if p.is_file() and len(p.name) == 64]
    assert len(blobs) == 1, blobs
    return blobs[0]


@pytest.mark.parametrize("damage", ["emptied", "cut short"])
def test_a_blob_emptied_or_cut_short_is_no_cache_hit_and_the_next_run_heals_it(
        arrays: ModuleType, settings: Settings, damage: str) -> None:
    # Before, the blob's mere presence made `make` CACHED: `total` then failed on it in every run, for good.
    first = run_arrays(arrays, settings, k=1)
    assert first.status == "SUCCEEDED" and first.outputs == {"output": EXPECTED}
    blob = made_blob(settings)
    good = blob.read_bytes()
    blob.write_bytes(b"" if damage == "emptied" else good[: len(good) // 2])  # what a power loss can leave
    second = run_arrays(arrays, settings, k=2)
    assert states(second) == {"make": "SUCCEEDED", "total": "SUCCEEDED"}, second.error
    assert second.outputs == {"output": 2 * EXPECTED}
    assert blob.read_bytes() == good  # written whole again
    assert states(run_arrays(arrays, settings, k=3))["make"] == "CACHED"


def test_a_damaged_blob_a_step_cannot_load_fails_it_by_name_and_the_next_run_makes_it_again(
        arrays: ModuleType, settings: Settings) -> None:
    assert run_arrays(arrays, settings, k=1).status == "SUCCEEDED"
    blob = made_blob(settings)
    good = blob.read_bytes()
    blob.write_bytes(b"\0" * len(good))  # the same size (a torn page): still a cache hit, until it is read
    second = run_arrays(arrays, settings, k=2)
    assert states(second) == {"make": "CACHED", "total": "FAILED"}
    error = second.steps["total"].error or ""
    assert "IntegrityError" in error and "is damaged" in error and "runs again on the next run" in error, error
    assert not blob.exists()  # no cache hands it out any more
    third = run_arrays(arrays, settings, k=3)
    assert states(third) == {"make": "SUCCEEDED", "total": "SUCCEEDED"}, third.error
    assert third.outputs == {"output": 3 * EXPECTED}
    assert blob.read_bytes() == good


def test_an_intact_blob_that_fails_to_load_keeps_its_own_error_and_stays(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    ref = store.put(np.arange(1000.0))
    assert ref.data is None and ref.serializer == "npy"
    with pytest.raises(ValueError) as raised:  # read as what it is not (JSON): its bytes are intact
        store.get(ArtifactRef(ref.digest, "json", ref.type_name, ref.size))
    assert not isinstance(raised.value, IntegrityError)
    assert store.exists(ref.digest)


def test_touch_with_a_size_refuses_a_blob_of_another_size(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    data = b"weights " * 1000
    digest = store.put_bytes(data)
    assert store.touch(digest, len(data)) and store.touch(digest)
    path = tmp_path / "artifacts" / digest[:2] / digest
    path.write_bytes(b"")
    assert not store.touch(digest, len(data))
    assert store.touch(digest)  # without a size: only whether it is there


def test_storing_a_small_value_again_repairs_damage_that_kept_its_size(tmp_path: Path) -> None:
    # Blobs up to VERIFY_REUSE_LIMIT are compared before they are reused, not only measured.
    store = ArtifactStore(str(tmp_path / "artifacts"))
    data = b"model weights " * 1000
    assert len(data) <= store.VERIFY_REUSE_LIMIT
    digest = store.put_bytes(data)
    path = tmp_path / "artifacts" / digest[:2] / digest
    path.write_bytes(data[:-1] + b"!")
    store.put_bytes(data)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


LISTS = '''
from skyloop import pipeline, step


@step
def make(n: int) -> list[float]:
    return [float(i) for i in range(n)]


@step
def double(x: float) -> float:
    return 2 * x


@step
def other() -> int:
    return 7


@pipeline
def mapped(n: int = 1000):
    return {"doubled": double.map(make(n)), "other": other()}
'''


def test_a_damaged_blob_read_to_start_a_step_fails_that_step_not_the_run(write_module: Any,
                                                                          settings: Settings) -> None:
    # A map reads its list when the step starts, in the orchestrator: a damaged blob there raised out of the
    # orchestrator, which ended every run it drove (an agent: all it held) as an internal error.
    module = write_module("lists_pipeline", LISTS)
    first = run(module.mapped, {}, backend="inline", settings=settings)
    first.workspace.close()
    assert first.status == "SUCCEEDED"
    blob = made_blob(settings)
    good = blob.read_bytes()
    blob.write_bytes(b"\0" * len(good))
    second = run(module.mapped, {}, backend="inline", settings=settings)
    second.workspace.close()
    assert states(second) == {"make": "CACHED", "double": "FAILED", "other": "CACHED"}
    error = second.steps["double"].error or ""
    assert "is damaged" in error and "runs again on the next run" in error, error
    third = run(module.mapped, {}, backend="inline", settings=settings)
    third.workspace.close()
    assert third.status == "SUCCEEDED" and states(third)["make"] == "SUCCEEDED"


FRAGILE = '''
import os

from skyloop import pipeline, step, when


class Fragile:
    """An output that only a step's process can load back (say it needs a license server the workers reach)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):
        return (_rebuild, (self.n,))


def _rebuild(n: int) -> "Fragile":
    if "SKYLOOP_WORKER_TAG" not in os.environ:  # set in the local backend's workers
        raise RuntimeError("needs the license server")
    return Fragile(n)


@step
def make() -> Fragile:
    return Fragile(3)


@step
def use(x: Fragile) -> int:
    return x.n


@step
def other() -> int:
    return 7


@pipeline
def fragile():
    f = make()
    with when(f):
        use(f)
    return other()
'''


def test_an_input_the_orchestrator_cannot_read_fails_that_step_not_the_run(write_module: Any,
                                                                           settings: Settings) -> None:
    # A condition reads its value in the orchestrator. Any error there other than skyloop's own raised out of
    # the orchestrator: `skyloop run` exited 70 ("internal error"), and an agent failed every run it held.
    module = write_module("fragile_pipeline", FRAGILE)
    result = run(module.fragile, {}, backend="local", settings=settings)
    result.workspace.close()
    assert states(result) == {"make": "SUCCEEDED", "use": "FAILED", "other": "SUCCEEDED"}
    error = result.steps["use"].error or ""
    assert "RuntimeError: needs the license server" in error and "condition" in error, error
    assert result.status == "FAILED"
