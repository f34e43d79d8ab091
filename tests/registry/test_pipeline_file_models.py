"""Models logged by steps of a pipeline file, loaded as `skyloop run file.py:...` loads it.

The file is imported under a synthetic module name (`skyloop_user_<stem>_<hash>`) that no other process
has: its classes are pickled by value, so a fresh process (a server) loads and runs the model. A thread the
step starts registers into the run's registry, with the step as its producer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sklearn.linear_model import LogisticRegression

from skyloop import Settings, run
from skyloop.errors import SpecError
from skyloop.execution.loading import load_file_module
from skyloop.registry import StepContext, current_step, load_model, log_model, step_context
from skyloop.registry.registry import list_models, resolve
from skyloop.registry.uri import parse_model_ref
from skyloop.store.models import StepRunRow
from skyloop.store.workspace import Workspace

CUSTOM = '''
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from skyloop import pipeline, step
from skyloop.registry import log_model

OFFSET = 0.5

def above(column):
    return (np.asarray(column) > OFFSET).astype(int)

class Doubler(BaseEstimator, TransformerMixin):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2

class Thresh:
    def predict(self, X):
        return above(np.asarray(X)[:, 0])

@step(cache=False)
def fit_and_log(kind: str) -> str:
    X = np.random.RandomState(0).rand(40, 2)
    y = (X[:, 0] > 0.5).astype(int)
    model = make_pipeline(Doubler(), LogisticRegression()).fit(X, y) if kind == "sk" else Thresh()
    return log_model(model, f"custom-{kind}", input_example=X[:3]).uri

@pipeline
def p(kind: str = "sk") -> str:
    return fit_and_log(kind)
'''

LOAD = """
import sys
import numpy as np
from skyloop.registry import load_model
loaded = load_model(sys.argv[1])
print(loaded.flavor, loaded.predict(np.array([[0.9, 0.1], [0.1, 0.9]])).tolist())
"""


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env["SKYLOOP_HOME"] = str(settings.home)
    return env


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "flavor"), [("py", "python"), ("sk", "sklearn")])
def test_a_model_class_of_the_pipeline_file_loads_in_a_fresh_process(kind: str, flavor: str,
                                                                      tmp_path: Path) -> None:
    file = tmp_path / "mytrain.py"
    file.write_text(CUSTOM)
    settings = Settings.for_home(tmp_path / "home")
    module = load_file_module(file)
    assert module.__name__.startswith("skyloop_user_mytrain_")

    result = run(module.p, {"kind": kind}, backend="inline", settings=settings)
    result._ws.close()
    assert result.status == "SUCCEEDED", result.error
    uri = result.output("fit_and_log")

    elsewhere = tmp_path / "elsewhere"  # not next to mytrain.py: nothing there to import it by
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", LOAD, uri], capture_output=True, text=True,
                          env=_env(settings), cwd=elsewhere, timeout=120)
    assert done.returncode == 0, done.stderr  # was: No module named 'skyloop_user_mytrain_...'
    assert done.stdout.split(maxsplit=1) == [flavor, "[1, 0]\n"]
    import cloudpickle
    assert not any(name.startswith("skyloop_user_") for name in cloudpickle.list_registry_pickle_by_value())


THREADED = '''
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from sklearn.linear_model import LogisticRegression
from skyloop import pipeline, step
from skyloop.registry import log_model

@step
def rows() -> list[list[float]]:
    return np.random.RandomState(0).rand(40, 2).tolist()

@step(cache=False)
def fit_and_log(X: list[list[float]]) -> list[str]:
    y = [int(r[0] > 0.5) for r in X]

    def one(c):
        return log_model(LogisticRegression(C=c).fit(X, y), f"thr-{c}").uri

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, [0.1, 1.0]))

@pipeline
def p() -> list[str]:
    return fit_and_log(rows())
'''


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["inline", "local"])
def test_log_model_in_a_thread_of_a_step_registers_in_the_runs_registry(backend: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "thr.py"
    file.write_text(THREADED)
    environment_home = tmp_path / "home_env"
    monkeypatch.setenv("SKYLOOP_HOME", str(environment_home))  # where a version without the context lands
    settings = Settings.for_home(tmp_path / "home_run")

    result = run(load_file_module(file).p, backend=backend, settings=settings)
    result._ws.close()
    assert result.status == "SUCCEEDED", result.error
    assert sorted(result.output("fit_and_log")) == ["models:/thr-0.1/1", "models:/thr-1.0/1"]

    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            step = session.query(StepRunRow).filter_by(run_id=result.id, task="fit_and_log").one()
            rows = session.query(StepRunRow).filter_by(run_id=result.id, task="rows").one()
            for name in ("thr-0.1", "thr-1.0"):
                info = resolve(session, parse_model_ref(name))
                producer = info.manifest.producer
                assert producer is not None
                assert (producer.run_id, producer.step_run_id, producer.task) == (result.id, step.id, "fit_and_log")
                assert set(producer.inputs) == {"X"}
            assert rows.id != step.id
    finally:
        workspace.close()
    assert not (environment_home / "skyloop.db").exists()


def test_a_thread_of_no_step_is_refused_while_two_steps_run_in_the_process(
        classifier: LogisticRegression, settings: Settings) -> None:
    # Two inline runs in two threads of one program: a third thread must not take either step's context.
    entered, release = threading.Barrier(3), threading.Event()
    contexts = [StepContext(step_run_id=f"step-{i}", run_id=f"run-{i}", settings=settings) for i in range(2)]
    seen: dict[str, StepContext | None] = {}

    def step_thread(context: StepContext) -> None:
        with step_context(context):
            entered.wait(timeout=30)
            seen[context.step_run_id] = current_step()  # its own, never the other one
            release.wait(timeout=30)

    threads = [threading.Thread(target=step_thread, args=(c,)) for c in contexts]
    for t in threads:
        t.start()
    try:
        entered.wait(timeout=30)
        assert current_step() is None
        with pytest.raises(SpecError, match=r"called in a thread of no step while 2 steps run in this process"):
            log_model(classifier, "ambiguous")
        # Told which registry and run, it needs no context.
        info = log_model(classifier, "explicit", settings=settings, run_id="run-x")
        assert info.manifest.producer is not None and info.manifest.producer.run_id == "run-x"
    finally:
        release.set()
        for t in threads:
            t.join(timeout=30)
    assert seen == {c.step_run_id: c for c in contexts}
    assert current_step() is None

    with step_context(contexts[0]):  # one step running: a thread it starts falls back to it
        box: list[StepContext | None] = []
        worker = threading.Thread(target=lambda: box.append(current_step()))
        worker.start()
        worker.join(timeout=30)
    assert box == [contexts[0]]
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            assert [m.name for m in list_models(session)] == ["explicit"]
    finally:
        workspace.close()
    assert load_model("models:/explicit/1", settings=settings).flavor == "sklearn"
