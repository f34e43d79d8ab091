"""The files of a model directory: what a python model's `load` may write, which extra files are refused,
where a version is extracted, and when `load_model` reads a folder rather than the registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from skyloop import Settings
from skyloop.errors import IntegrityError, SpecError
from skyloop.registry import load_model, log_model

CACHING = '''
import sys
from pathlib import Path
import numpy as np
from skyloop.registry import load_model, log_model

class Cache:
    """Unpacks (here: writes) a cache file into the directory load() is given, as a tarball model would."""

    def load(self, model_dir):
        cache = Path(model_dir) / "cache.bin"
        if not cache.exists():
            cache.write_bytes((Path(model_dir) / "weights.txt").read_bytes() * 2)
        self.weight = len(cache.read_bytes())

    def predict(self, X):
        return np.full(len(X), self.weight)

if sys.argv[1] == "log":
    info = log_model(Cache(), "cache", input_example=np.zeros((2, 1)), extra_files={"weights.txt": sys.argv[2]})
    print(sorted(info.files))
elif sys.argv[1] == "killed":
    import os, signal
    loaded = load_model("models:/cache/1")
    os.kill(os.getpid(), signal.SIGKILL)
else:
    for _ in range(2):
        loaded = load_model("models:/cache/1")
        print(loaded.predict([[1]]).tolist(), sorted(p.name for p in loaded.path.iterdir()))
'''


@pytest.mark.integration
def test_a_python_model_whose_load_writes_a_cache_file_loads_every_time(settings: Settings,
                                                                        tmp_path: Path) -> None:
    script, weights = tmp_path / "caching.py", tmp_path / "w.txt"
    script.write_text(CACHING)
    weights.write_text("abc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env["SKYLOOP_HOME"] = str(settings.home)

    def python(*args: str) -> list[str]:
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    # The input_example check loaded it too: its cache file is not registered as a model file.
    assert python("log", str(weights)) == ["['model.yaml', 'python_model.pkl', 'weights.txt']"]
    listed = "['model.yaml', 'python_model.pkl', 'weights.txt']"
    for _ in range(2):  # two loads in a process, then again after a restart (was: "cache.bin ... not listed")
        assert python("load") == [f"[6] {listed}", f"[6] {listed}"]
    assert not list(Path(tempfile.gettempdir()).glob("skyloop-model-1-*/model/cache.bin"))  # the copies are removed

    # Killed, a process cannot remove its copy (as large as the model): the next one to make a copy does.
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    killed = subprocess.run([sys.executable, str(script), "killed"], env=env, cwd=tmp_path, timeout=120)
    assert killed.returncode == -9
    left = sorted(p.name for p in (tmp_path / "tmp").glob("skyloop-model-1-*/model/*"))
    assert left == ["cache.bin", "model.yaml", "python_model.pkl", "weights.txt"]
    assert python("load") == [f"[6] {listed}", f"[6] {listed}"]
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(("model", "name"), [
    (LogisticRegression(), "model.pkl"),  # joblib writes model.joblib, but load prefers model.pkl
    (LogisticRegression(), "model.joblib"),
])
def test_an_extra_file_with_a_name_the_flavor_keeps_is_refused(model: LogisticRegression, name: str,
                                                               settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "vocab.pkl"
    source.write_bytes(b"not a model")
    model.fit(np.eye(3), [0, 1, 2])
    with pytest.raises(SpecError, match=rf"extra file '{name}' has a name the sklearn flavor keeps for its own "
                                        r"files \(model.joblib, model.pkl\).*give it another name"):
        log_model(model, "ex", extra_files={name: source}, settings=settings)
    info = log_model(model, "ex", extra_files={"assets/model.pkl": source}, settings=settings)
    assert load_model(info.uri, settings=settings).predict(np.eye(3)).tolist() == [0, 1, 2]


@pytest.mark.parametrize("target", ["__pycache__/vocab.txt", "sub/__pycache__/v.txt", ".tmp-vocab.txt",
                                    "sub/.tmp-x/v.txt"])
def test_an_extra_file_the_model_directory_would_drop_is_refused(target: str, settings: Settings,
                                                                 tmp_path: Path) -> None:
    source = tmp_path / "vocab.txt"
    source.write_text("hello")
    model = LogisticRegression().fit(np.eye(3), [0, 1, 2])
    with pytest.raises(SpecError, match=r"files under __pycache__ or named \.tmp-\* are not kept"):
        log_model(model, "pyc", extra_files={target: source}, settings=settings)


def test_a_version_registered_again_after_a_reset_is_extracted_anew(settings: Settings, tmp_path: Path) -> None:
    X = np.eye(3)
    notes = tmp_path / "notes.txt"
    notes.write_text("first registration")
    first = load_model(log_model(LogisticRegression().fit(X, [0, 1, 2]), "iris", extra_files={"notes.txt": notes},
                                 settings=settings).uri, settings=settings)
    (settings.home / "skyloop.db").unlink()  # a reset DB: iris/1 is another registration now
    shutil.rmtree(settings.home / "artifacts")
    again = Settings.for_home(settings.home)
    second = log_model(LogisticRegression(C=0.01).fit(X, [0, 0, 1]), "iris", settings=again)
    assert second.version == 1
    loaded = load_model("models:/iris/1", settings=again)  # was: "extracted file ... was altered"
    assert loaded.path == first.path
    assert loaded.metadata.files == {k: v for k, v in second.files.items() if k != "model.yaml"}
    assert not (loaded.path / "notes.txt").exists()
    assert load_model("models:/iris/1", settings=again).predict(X).tolist() == loaded.predict(X).tolist()

    # A directory whose files match neither registration is still refused, with the way out.
    third = log_model(LogisticRegression().fit(X, [0, 1, 2]), "other", settings=again)
    shutil.copytree(loaded.path, settings.home / "models" / "other" / "1")
    (settings.home / "models" / "other" / "1" / "model.joblib").write_bytes(b"changed")
    with pytest.raises(IntegrityError, match=r"holds a model.yaml other than the registry's for this version, and "
                                             r"files that do not match it .*; delete .* to extract this version"):
        load_model(third.uri, settings=again)


def test_a_model_name_means_the_registry_even_with_a_folder_of_that_name(settings: Settings, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    info = log_model(LogisticRegression().fit(np.eye(3), [0, 1, 2]), "iris", settings=settings)
    work = tmp_path / "work"
    (work / "iris").mkdir(parents=True)  # an unrelated folder (data, a checkout) named like the model
    monkeypatch.chdir(work)
    assert load_model("iris", settings=settings).uri == info.uri  # was: "iris is not a model directory"
    shutil.copytree(load_model("iris", settings=settings).path, work / "out" / "kept")
    assert load_model("./out/kept").uri is None  # a path, written as one
    assert load_model("out/kept").uri is None  # no model reference ("kept" is no version): the folder
