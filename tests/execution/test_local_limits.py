"""Limits of the `local` backend with real processes: memory requests are enforced, GPUs handed out."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import collect, gone, output, run_one

from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.backends import limits
from skyloop.execution.backends.limits import GpuPool, MemoryWatch
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskResult, TaskState
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources

STEPS = str(Path(__file__).with_name("steps_for_backend.py"))
MiB = 2**20


def make_launch(tmp_path: Path, qualname: str, memory: str | int = 0, gpus: int = 0,
                env: dict[str, str] | None = None, **inputs: object) -> TaskLaunch:
    key = f"{qualname}-{uuid.uuid4().hex[:8]}"
    return TaskLaunch(
        key=key, task_name=qualname, step=StepRef(module=STEPS, qualname=qualname),
        inputs={name: Literal_(value) for name, value in inputs.items()}, output_names=["output"],
        multi_output=False, resources=Resources(memory=memory, gpus=gpus), timeout=None,
        log_path=str(tmp_path / "logs" / f"{key}.log"), artifacts_url=str(tmp_path / "artifacts"), env=env or {},
    )





def worker_pid(result: TaskResult) -> int:
    assert result.worker is not None
    return int(result.worker.split(":")[1])


# -- memory --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    pool = LocalBackend(ExecutionSettings(max_workers=2, memory_poll_seconds=0.05))
    pool.start()
    yield pool
    pool.shutdown()


@pytest.mark.integration
def test_a_step_over_its_memory_request_is_killed(backend: LocalBackend, tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_one(backend, make_launch(tmp_path, "hold", memory="64Mi", megabytes=300, seconds=30))
    assert result.state == TaskState.OUT_OF_MEMORY
    assert result.error is not None and result.error.startswith("used ")
    assert "over its memory request of 64Mi (+25% margin = 80Mi); raise resources.memory" in result.error
    assert result.max_rss is not None and result.max_rss > 80 * MiB
    assert time.monotonic() - started < 10
    assert gone(worker_pid(result), within=0)
    after = run_one(backend, make_launch(tmp_path, "pid"))
    assert output(tmp_path, after) == worker_pid(after) != worker_pid(result)


@pytest.mark.integration
@pytest.mark.parametrize("new_session", [False, True])  # True: the child left the worker's process group
def test_memory_of_child_processes_counts(backend: LocalBackend, tmp_path: Path, new_session: bool) -> None:
    pid_file = tmp_path / "child.pid"
    result = run_one(backend, make_launch(tmp_path, "hold_in_child", memory="64Mi", megabytes=300, seconds=30,
                                          pid_file=str(pid_file), new_session=new_session))
    assert result.state == TaskState.OUT_OF_MEMORY, result.error
    assert result.error is not None and "64Mi" in result.error
    assert gone(worker_pid(result), within=0)
    assert gone(int(pid_file.read_text()))


@pytest.mark.integration
def test_forked_children_sharing_memory_count_it_once(backend: LocalBackend, tmp_path: Path) -> None:
    # Resident sizes would count the 100 MB five times (~500 MB, over 320Mi); PSS counts it once.
    launch = make_launch(tmp_path, "hold_then_fork", memory="256Mi", megabytes=100, children=4, seconds=0.8)
    assert output(tmp_path, run_one(backend, launch)) == 100 * MiB


@pytest.mark.integration
@pytest.mark.parametrize(("memory", "megabytes"), [("256Mi", 20), (0, 200)])
def test_steps_within_their_request_or_without_one_run(backend: LocalBackend, tmp_path: Path,
                                                       memory: str | int, megabytes: int) -> None:
    result = run_one(backend, make_launch(tmp_path, "hold", memory=memory, megabytes=megabytes, seconds=0.3))
    assert output(tmp_path, result) == megabytes * MiB


@pytest.mark.integration
def test_the_idle_worker_does_not_count_against_the_step(backend: LocalBackend, tmp_path: Path) -> None:
    # The worker's interpreter and skyloop already take more than this request's 10Mi limit.
    run_one(backend, make_launch(tmp_path, "noop"))  # a warm worker
    result = run_one(backend, make_launch(tmp_path, "hold", memory="8Mi", megabytes=1, seconds=0.3))
    assert output(tmp_path, result) == MiB


@pytest.mark.integration
@pytest.mark.parametrize(("counts", "state"), [((0, 1), TaskState.OUT_OF_MEMORY), ((0, 0), TaskState.CRASHED)])
def test_a_sigkill_is_blamed_on_memory_only_if_the_kernel_oom_killer_struck(
        backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        counts: tuple[int, int], state: TaskState) -> None:
    readings = itertools.chain(counts, itertools.repeat(counts[-1]))
    run_one(backend, make_launch(tmp_path, "noop"))  # a ready worker: the watch starts once
    monkeypatch.setattr(limits, "_oom_kills", lambda: next(readings))
    result = run_one(backend, make_launch(tmp_path, "kill_self", memory="1Gi"))
    assert result.state == state
    assert result.error is not None
    if state == TaskState.OUT_OF_MEMORY:
        assert result.error.startswith("killed by the kernel's out-of-memory killer")
        assert "of its 1280Mi limit" in result.error
    else:
        assert "SIGKILL" in result.error


CACHING_STEPS = """
import subprocess, sys, time

CACHE = []

HOLD = '''
import sys, time
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("holding", flush=True)
time.sleep(5)
'''


def cache(megabytes):
    \"\"\"Keep `megabytes` in this module: the warm worker stays that much larger (the next attempt's baseline).\"\"\"
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    CACHE.append(block)
    return len(block)


def free_then_hold_in_child(megabytes, pid_file):
    \"\"\"Free the cache (the worker shrinks below its baseline), then have a child hold `megabytes`.\"\"\"
    CACHE.clear()
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(megabytes)], stdout=subprocess.PIPE)
    with open(pid_file, "w") as fh:
        fh.write(str(child.pid))
    child.stdout.readline()
    return child.wait()
"""


@pytest.mark.integration
def test_a_worker_shrinking_below_its_baseline_does_not_hide_its_childrens_memory(tmp_path: Path) -> None:
    steps = tmp_path / "caching_steps.py"
    steps.write_text(CACHING_STEPS)
    pid_file = tmp_path / "child.pid"

    def launch(qualname: str, memory: str | int, **inputs: object) -> TaskLaunch:
        made = make_launch(tmp_path, qualname, memory=memory, **inputs)
        made.step = StepRef(module=str(steps), qualname=qualname)
        return made

    with LocalBackend(ExecutionSettings(max_workers=1, memory_poll_seconds=0.05)) as pool:
        cached = run_one(pool, launch("cache", 0, megabytes=300))
        assert output(tmp_path, cached) == 300 * MiB
        result = run_one(pool, launch("free_then_hold_in_child", "64Mi", megabytes=200, pid_file=str(pid_file)))
        assert result.worker == cached.worker  # the warm worker, whose baseline holds the 300 MiB
        assert result.state == TaskState.OUT_OF_MEMORY, result.error
        assert result.max_rss is not None and result.max_rss > 80 * MiB
        assert gone(int(pid_file.read_text()))


def test_a_watch_reports_usage_above_the_baseline() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    baseline = limits.resident(sleeper.pid)
    assert baseline is not None
    watch = MemoryWatch(sleeper.pid, request=MiB, margin=0.5, baseline=baseline + 10 * MiB)
    assert watch.limit == int(1.5 * MiB)
    try:
        assert watch.check() is None and watch.last == 0  # below its baseline counts as nothing
        watch.baseline = baseline - 4 * MiB
        error = watch.check()
        assert error is not None and "over its memory request of 1Mi (+50% margin = 2Mi)" in error
        assert watch.peak >= 3 * MiB
    finally:
        watch.close()
        watch.close()
        sleeper.kill()
        sleeper.wait()
    assert limits.resident(sleeper.pid) is None and limits.descendants(sleeper.pid) == []


# -- GPUs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_backend() -> Iterator[LocalBackend]:
    # More workers than GPUs: only the pool can keep a fourth one-GPU step waiting.
    pool = LocalBackend(ExecutionSettings(max_workers=4, gpu_ids=[0, 1, 2]))
    pool.start()
    yield pool
    pool.shutdown()


def held(tmp_path: Path, results: dict[str, TaskResult]) -> list[tuple[list[int], float, float]]:
    spans = []
    for result in results.values():
        devices, start, end = output(tmp_path, result)
        spans.append(([int(i) for i in devices.split(",")], start, end))
    return spans


@pytest.mark.integration
def test_concurrent_steps_get_distinct_gpus(gpu_backend: LocalBackend, tmp_path: Path) -> None:
    assert gpu_backend.capacity().gpus == 3
    launches = [make_launch(tmp_path, "devices", gpus=1, seconds=0.5) for _ in range(3)]
    for launch in launches:
        gpu_backend.submit(launch)
    spans = held(tmp_path, collect(gpu_backend, 3))
    assert sorted(ids[0] for ids, _, _ in spans) == [0, 1, 2]
    assert max(start for _, start, _ in spans) < min(end for _, _, end in spans)  # they did overlap


@pytest.mark.integration
def test_a_step_asking_two_gpus_gets_two(gpu_backend: LocalBackend, tmp_path: Path) -> None:
    (ids, _, _), = held(tmp_path, {"one": run_one(gpu_backend, make_launch(tmp_path, "devices", gpus=2, seconds=0))})
    assert len(set(ids)) == 2 and set(ids) <= {0, 1, 2}


@pytest.mark.integration
def test_gpus_are_reused_and_never_shared(gpu_backend: LocalBackend, tmp_path: Path) -> None:
    launches = [make_launch(tmp_path, "devices", gpus=1, seconds=0.3) for _ in range(6)]
    launches.insert(3, make_launch(tmp_path, "devices", gpus=2, seconds=0.2))
    for launch in launches:
        gpu_backend.submit(launch)
    spans = held(tmp_path, collect(gpu_backend, len(launches)))
    assert {i for ids, _, _ in spans for i in ids} <= {0, 1, 2}
    for (ids, start, end), (other, o_start, o_end) in itertools.combinations(spans, 2):
        if start < o_end and o_start < end:
            assert not set(ids) & set(other), f"{ids} and {other} were held at once"


@pytest.mark.integration
def test_steps_without_gpus_pass_those_waiting_for_gpus(gpu_backend: LocalBackend, tmp_path: Path) -> None:
    holding = [make_launch(tmp_path, "devices", gpus=1, seconds=1.0) for _ in range(3)]
    waiting = make_launch(tmp_path, "devices", gpus=1, seconds=0)
    cpu_only = make_launch(tmp_path, "noop")
    for launch in [*holding, waiting, cpu_only]:
        gpu_backend.submit(launch)
    results = collect(gpu_backend, 5)
    assert results[cpu_only.key].state == TaskState.SUCCEEDED
    _, waited_from, _ = output(tmp_path, results[waiting.key])
    assert results[cpu_only.key].ended_at is not None and results[cpu_only.key].ended_at < waited_from


@pytest.mark.integration
def test_one_gpu_steps_in_a_row_reuse_the_warm_worker_and_its_device(gpu_backend: LocalBackend,
                                                                      tmp_path: Path) -> None:
    results = [run_one(gpu_backend, make_launch(tmp_path, "devices", gpus=1, seconds=0)) for _ in range(3)]
    assert len({output(tmp_path, result)[0] for result in results}) == 1
    assert len({result.worker for result in results}) == 1


@pytest.mark.integration
def test_steps_without_gpus_see_none_when_gpus_are_declared(gpu_backend: LocalBackend, tmp_path: Path,
                                                            backend: LocalBackend) -> None:
    hidden = run_one(gpu_backend, make_launch(tmp_path, "getenv", name="CUDA_VISIBLE_DEVICES"))
    assert output(tmp_path, hidden) == ""
    untouched = run_one(backend, make_launch(tmp_path, "getenv", name="CUDA_VISIBLE_DEVICES"))
    assert output(tmp_path, untouched) == os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.integration
def test_an_explicit_cuda_visible_devices_wins(gpu_backend: LocalBackend, tmp_path: Path) -> None:
    launch = make_launch(tmp_path, "getenv", gpus=1, env={"CUDA_VISIBLE_DEVICES": "7"}, name="CUDA_VISIBLE_DEVICES")
    assert output(tmp_path, run_one(gpu_backend, launch)) == "7"


@pytest.mark.integration
def test_a_launch_asking_more_gpus_than_exist_fails(gpu_backend: LocalBackend, tmp_path: Path) -> None:
    result = run_one(gpu_backend, make_launch(tmp_path, "noop", gpus=4))
    assert result.state == TaskState.FAILED
    assert result.error == "asks for 4 GPUs but this backend has 3 (execution settings gpu_ids / max_gpus)"


def test_the_pool_prefers_devices_of_warm_workers_and_takes_ids_in_order() -> None:
    pool = GpuPool([3, 1, 2])
    assert pool.pick(2) == (3, 1)
    assert pool.pick(1, warm=[None, "", "0", "1,2", "2"]) == (2,)
    assert pool.pick(2, warm=["1,2"]) == (1, 2)
    pool.take((3, 1))
    assert pool.available == 1 and pool.pick(2) is None
    pool.give_back((3, 1))
    assert pool.available == 3


@pytest.mark.parametrize(("settings", "ids"), [
    (ExecutionSettings(), ()),
    (ExecutionSettings(max_gpus=2), (0, 1)),
    (ExecutionSettings(gpu_ids=[4, 5, 6]), (4, 5, 6)),
    (ExecutionSettings(gpu_ids=[4, 5, 6], max_gpus=2), (4, 5)),
])
def test_the_pool_follows_the_settings(settings: ExecutionSettings, ids: tuple[int, ...],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the devices this process was given: below
    assert GpuPool.from_settings(settings).ids == ids


@pytest.mark.parametrize(("given", "settings", "ids"), [
    ("2,3", ExecutionSettings(max_gpus=2), (2, 3)),
    ("6, 4,5", ExecutionSettings(max_gpus=2), (6, 4)),  # the first ones, in the order given
    ("2,3", ExecutionSettings(gpu_ids=[0, 1]), (0, 1)),  # gpu_ids named explicitly win
    ("2,3", ExecutionSettings(), ()),  # no GPUs declared: none handed out, the variable left alone
    ("1,-1,0", ExecutionSettings(max_gpus=1), (1,)),  # CUDA reads up to the first invalid number
])
def test_the_pool_hands_out_the_devices_this_process_was_given(
        given: str, settings: ExecutionSettings, ids: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", given)
    assert GpuPool.from_settings(settings).ids == ids


@pytest.mark.parametrize(("given", "message"), [
    ("2", "max_gpus is 2 but this process was started with CUDA_VISIBLE_DEVICES='2', which gives it 1 GPU(s)"),
    ("", "which gives it 0 GPU(s)"),
    ("-1", "which gives it 0 GPU(s)"),
    ("GPU-5e0a1c2d,GPU-77b1", "names a device by 'GPU-5e0a1c2d'; the local backend hands out device numbers"),
    ("3,3", "names device 3 twice"),
])
def test_the_pool_refuses_more_gpus_than_this_process_was_given(given: str, message: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", given)
    with pytest.raises(BackendError, match=re.escape(message)):
        GpuPool.from_settings(ExecutionSettings(max_gpus=2))


@pytest.mark.integration
def test_steps_get_the_gpus_the_backend_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What Slurm or a container runtime does: this process may use devices 5 and 3 only.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,3")
    with LocalBackend(ExecutionSettings(max_workers=2, max_gpus=2)) as pool:
        launches = [make_launch(tmp_path, "devices", gpus=1, seconds=0.5) for _ in range(2)]
        for launch in launches:
            pool.submit(launch)
        spans = held(tmp_path, collect(pool, 2))
        assert sorted(ids[0] for ids, _, _ in spans) == [3, 5]
        (both, _, _), = held(tmp_path, {"one": run_one(pool, make_launch(tmp_path, "devices", gpus=2, seconds=0))})
        assert sorted(both) == [3, 5]


@pytest.mark.parametrize("settings", [ExecutionSettings(gpu_ids=[0, 0]), ExecutionSettings(gpu_ids=[1], max_gpus=2)])
def test_the_pool_rejects_inconsistent_settings(settings: ExecutionSettings) -> None:
    with pytest.raises(BackendError):
        GpuPool.from_settings(settings)
