"""A long-lived process runs the code a pipeline file holds now: the file is imported again once edited.

Edits here are quick and keep the file's size, the case that a file's stat (whole-second bytecode
caches, coarse file times) can miss.
"""

from __future__ import annotations

import inspect
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import collect

from skyloop.config import ExecutionSettings, Settings
from skyloop.errors import SpecError
from skyloop.execution.agent import Agent
from skyloop.execution.api import submit
from skyloop.execution.backends.local import LocalBackend
from skyloop.execution.loading import load_file_module
from skyloop.execution.run import Run
from skyloop.execution.tasks import Literal_, TaskLaunch, TaskState
from skyloop.pipelines.step import code_hash
from skyloop.spec.pipeline import StepRef
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.workspace import Workspace

STEPS = """\
import os

from skyloop import pipeline, step


@step
def version(x: int) -> str:
    return "{version}:" + str(os.getpid())


@pipeline
def versioned(x: int = 1):
    return version(x)
"""


def write_version(path: Path, version: str) -> None:
    path.write_text(STEPS.format(version=version))


def version_of(output: str) -> tuple[str, int]:
    text, pid = output.split(":")
    return text, int(pid)


@pytest.fixture
def pool() -> Iterator[LocalBackend]:
    backend = LocalBackend(ExecutionSettings(max_workers=1))
    backend.start()
    yield backend
    backend.shutdown()  # reaps its worker by PID


def test_an_edited_file_is_imported_again_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    file = tmp_path / "edited_steps.py"
    write_version(file, "one")
    first = load_file_module(file)
    assert load_file_module(file) is first
    assert first.version.fn(1).startswith("one:")
    first_hash = code_hash(first.version.fn)
    write_version(file, "two")  # same size, at once
    second = load_file_module(file)
    assert second is not first and second.version.fn(1).startswith("two:")
    assert '"two:"' in inspect.getsource(second.version.fn)
    assert code_hash(second.version.fn) != first_hash
    later = time.time() + 5
    os.utime(file, (later, later))  # touched, not changed: the module stays
    assert load_file_module(file) is second


def test_a_broken_edit_fails_to_load_until_it_is_fixed(tmp_path: Path) -> None:
    file = tmp_path / "broken_steps.py"
    write_version(file, "one")
    first = load_file_module(file)
    file.write_text(STEPS.format(version="one").replace("def version", "def version("))
    for _ in range(2):
        with pytest.raises(SpecError, match=r"cannot load .*SyntaxError"):
            load_file_module(file)
    write_version(file, "two")
    assert load_file_module(file).version.fn(1).startswith("two:")
    assert first.version.fn(1).startswith("one:")


@pytest.mark.integration
def test_a_warm_worker_runs_the_edited_code(pool: LocalBackend, tmp_path: Path) -> None:
    file = tmp_path / "worker_steps.py"
    outputs = []
    for version in ("one", "two"):
        write_version(file, version)
        launch = TaskLaunch(
            key=uuid.uuid4().hex, task_name="version", step=StepRef(module=str(file), qualname="version"),
            inputs={"x": Literal_(1)}, output_names=["output"], multi_output=False, resources=Resources(),
            timeout=None, log_path=str(tmp_path / "logs" / f"{version}.log"),
            artifacts_url=str(tmp_path / "artifacts"))
        pool.submit(launch)
        result = collect(pool, 1)[launch.key]
        assert result.state == TaskState.SUCCEEDED, result.error
        outputs.append(version_of(ArtifactStore(str(tmp_path / "artifacts")).get(result.outputs["output"])))
    (first, first_pid), (second, second_pid) = outputs
    assert first_pid == second_pid, "the second launch should have found the worker warm"
    assert (first, second) == ("one", "two")


@pytest.mark.integration
def test_an_agent_runs_the_edited_code_of_a_run_submitted_after_the_edit(pool: LocalBackend, tmp_path: Path,
                                                                          settings: Settings) -> None:
    file = tmp_path / "agent_steps.py"
    workspace = Workspace.open(settings)
    try:
        runs = []
        for version in ("one", "two"):
            write_version(file, version)
            run_id = submit(f"{file}:versioned", settings=settings)
            # One agent after the other in this process, on the same warm pool: what a long-lived agent sees.
            Agent(settings, workspace, pool).serve(once=True)
            runs.append(Run(workspace, run_id))
        for run in runs:
            assert run.status == "SUCCEEDED", run.error
        first, second = runs
        assert second.steps["version"].state == TaskState.SUCCEEDED  # not CACHED with the old code's result
        (old, old_pid), (new, new_pid) = version_of(first.output("version")), version_of(second.output("version"))
        assert (old, new) == ("one", "two")
        assert old_pid == new_pid, "both runs should have used the same warm worker"
    finally:
        workspace.close()


EDITED_MID_RUN = '''
import os
import time
from pathlib import Path

from skyloop import pipeline, step


@step(cache=False)
def first(x: int) -> int:
    gate = Path(os.environ["GATE"])
    while not gate.exists():  # the test edits `second` meanwhile
        time.sleep(0.01)
    return x


@step
def second(x: int) -> str:
    return "{version}"


@pipeline
def edited(x: int = 1):
    return second(first(x))
'''


def test_a_step_edited_during_its_run_is_cached_under_the_code_that_ran(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from skyloop import run

    file = tmp_path / "edited.py"
    file.write_text(EDITED_MID_RUN.format(version="old"))
    gate = tmp_path / "gate"
    monkeypatch.setenv("GATE", str(gate))
    settings = Settings.for_home(tmp_path / "home")

    def edit() -> None:
        time.sleep(0.3)  # while `first` waits
        file.write_text(EDITED_MID_RUN.format(version="new"))
        gate.touch()

    editor = threading.Thread(target=edit)
    editor.start()
    result = run(load_file_module(file).edited, backend="inline", settings=settings)
    editor.join()
    result._ws.close()
    assert result.status == "SUCCEEDED", result.error
    assert result.output("second") == "new"
    ws = Workspace.open(settings)
    try:
        with ws.db.read() as session:
            from skyloop.store.models import StepRunRow

            (row,) = session.query(StepRunRow).filter_by(task="second").all()
    finally:
        ws.close()
    assert row.code_hash == code_hash(load_file_module(file).second.fn)  # the new code's, not the old
