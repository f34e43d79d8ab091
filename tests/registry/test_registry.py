"""The registry end to end on real SQLite and a real artifact store: versions, aliases, tags, URIs,
tamper refusal, garbage collection, lineage and the python flavor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from tests_support import age_blobs

from skyloop import Settings
from skyloop.errors import IntegrityError, ModelLoadError, NotFound, SpecError
from skyloop.registry import (
    ModelRef,
    StepContext,
    load_model,
    log_model,
    step_context,
)
from skyloop.registry.api import materialize
from skyloop.registry.registry import (
    delete_tag,
    get_model,
    list_models,
    list_versions,
    remove_alias,
    resolve,
    set_alias,
    set_tags,
)
from skyloop.registry.signature import infer_signature
from skyloop.store.gc import collect_garbage
from skyloop.store.models import Artifact, ArtifactPin
from skyloop.store.workspace import Workspace

Data = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


def test_log_model_infers_flavor_and_signature(classifier: LogisticRegression, data: Data,
                                               settings: Settings) -> None:
    X, _ = data
    info = log_model(classifier, "iris", input_example=X[:2], metrics={"accuracy": 1.0}, settings=settings)
    assert (info.name, info.version, info.uri, info.flavor) == ("iris", 1, "models:/iris/1", "sklearn")
    signature = info.manifest.signature
    assert signature is not None
    assert [(t.name, t.datatype, t.shape) for t in signature.inputs] == [("input-0", "FP64", [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in signature.outputs] == [("predict", "INT64", [-1])]
    assert info.manifest.metrics == {"accuracy": 1.0}
    assert set(info.files) == {"model.joblib", "model.yaml"}
    assert info.manifest.environment["scikit-learn"]


def test_a_dataframe_example_gives_one_input_per_column(classifier: LogisticRegression, data: Data,
                                                              settings: Settings) -> None:
    X, _ = data
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    fitted = LogisticRegression(max_iter=1000).fit(frame, data[1])
    info = log_model(fitted, "frame", input_example=frame.head(3), settings=settings)
    assert info.manifest.signature is not None
    # One column per input even when every column has the same type: the server rebuilds the frame.
    assert [(t.name, t.datatype, t.shape) for t in info.manifest.signature.inputs] == [
        (c, "FP64", [-1]) for c in "abcd"]
    assert info.manifest.signature.frame is True
    np.testing.assert_array_equal(load_model(info.uri, settings=settings).predict(frame), fitted.predict(frame))


def test_versions_aliases_and_uris(classifier: LogisticRegression, data: Data, settings: Settings,
                                   workspace: Workspace) -> None:
    X, y = data
    first = log_model(classifier, "iris", settings=settings)
    other = LogisticRegression(max_iter=1000, C=0.01).fit(X, y)
    second = log_model(other, "iris", settings=settings, tags={"stage": "new"})
    assert (first.version, second.version) == (1, 2)

    with workspace.db.session() as session:
        assert set_alias(session, "iris", "champion", 1) is None
        set_alias(session, "iris", "challenger", 2)
    champion = load_model("models:/iris@champion", settings=settings)
    latest = load_model("models:/iris", settings=settings)
    assert champion.uri == "models:/iris/1" and latest.uri == "models:/iris/2"
    np.testing.assert_array_equal(champion.predict(X), classifier.predict(X))
    np.testing.assert_allclose(latest.model.predict_proba(X), other.predict_proba(X))  # type: ignore[attr-defined]

    with workspace.db.session() as session:  # promote: the alias moves, the old target is reported
        assert set_alias(session, "iris", "champion", 2) == 1
    assert load_model("models:/iris@champion", settings=settings).uri == "models:/iris/2"
    with workspace.db.read() as session:
        assert resolve(session, ModelRef("iris", version=2)).aliases == ["challenger", "champion"]
        assert resolve(session, ModelRef("iris", version=1)).aliases == []
        model = get_model(session, "iris")
        assert (model.latest_version, model.versions, model.aliases) == (2, 2, {"challenger": 2, "champion": 2})
        assert [m.name for m in list_models(session)] == ["iris"]
        assert [v.version for v in list_versions(session, "iris")] == [1, 2]
        assert resolve(session, ModelRef("iris", version=2)).tags == {"stage": "new"}
    with workspace.db.session() as session:
        assert remove_alias(session, "iris", "challenger") == 2  # the version it pointed at
    with workspace.db.read() as session, pytest.raises(NotFound, match="no alias 'challenger'"):
        resolve(session, ModelRef("iris", alias="challenger"))


def test_tags_on_models_and_versions(classifier: LogisticRegression, settings: Settings,
                                     workspace: Workspace) -> None:
    log_model(classifier, "iris", settings=settings)
    with workspace.db.session() as session:
        assert set_tags(session, ModelRef("iris"), {"team": "ml"}) == {"team": "ml"}
        assert set_tags(session, ModelRef("iris", version=1), {"validated": True}) == {"validated": "True"}
        set_tags(session, ModelRef("iris"), {"owner": "ana"})
        delete_tag(session, ModelRef("iris"), "team")
    with workspace.db.read() as session:
        assert get_model(session, "iris").tags == {"owner": "ana"}
        assert resolve(session, ModelRef("iris", version=1)).tags == {"validated": "True"}
    with workspace.db.session() as session, pytest.raises(NotFound):
        delete_tag(session, ModelRef("iris"), "nope")


def test_unknown_names_are_not_found(classifier: LogisticRegression, settings: Settings,
                                     workspace: Workspace) -> None:
    with pytest.raises(NotFound, match="no model named 'ghost'"):
        load_model("models:/ghost", settings=settings)
    log_model(classifier, "iris", settings=settings)
    with pytest.raises(NotFound, match="has no version 7"):
        load_model("models:/iris/7", settings=settings)
    with pytest.raises(NotFound, match="no alias 'champion'"):
        load_model("models:/iris@champion", settings=settings)
    with workspace.db.session() as session, pytest.raises(NotFound, match="no version 3"):
        set_alias(session, "iris", "champion", 3)
    with workspace.db.session() as session, pytest.raises(SpecError, match="cannot be set"):
        set_alias(session, "iris", "latest", 1)


def test_the_model_survives_its_source_folder(classifier: LogisticRegression, data: Data, settings: Settings,
                                              tmp_path: Path) -> None:
    first = log_model(classifier, "iris", settings=settings)
    source = load_model(first.uri, settings=settings).path
    packaged = tmp_path / "copy"
    shutil.copytree(source, packaged)
    shutil.rmtree(settings.home / "models")  # the extracted copy goes: it comes back from the store
    again = log_model(packaged, "iris-copy", settings=settings)  # a model directory registers as it is
    shutil.rmtree(packaged)
    np.testing.assert_array_equal(load_model(again.uri, settings=settings).predict(data[0]),
                                  classifier.predict(data[0]))
    assert again.files["model.joblib"] == first.files["model.joblib"]


def test_a_tampered_blob_is_refused(classifier: LogisticRegression, settings: Settings,
                                    workspace: Workspace) -> None:
    info = log_model(classifier, "iris", settings=settings)
    blob = Path(workspace.store._path(info.files["model.joblib"]))
    blob.write_bytes(blob.read_bytes() + b"evil")
    with pytest.raises(IntegrityError, match=r"model iris/1: file model.joblib is corrupt in the artifact store"):
        load_model("models:/iris/1", settings=settings)


def test_a_tampered_extracted_file_is_refused(classifier: LogisticRegression, settings: Settings) -> None:
    info = load_model(log_model(classifier, "iris", settings=settings).uri, settings=settings)
    (info.path / "model.joblib").write_bytes(b"not a model")
    with pytest.raises(IntegrityError, match=r"extracted file model\.joblib .* was altered"):
        load_model("models:/iris", settings=settings)
    shutil.rmtree(info.path)  # the fix the message names: extract again from the store
    assert load_model("models:/iris", settings=settings).flavor == "sklearn"


def test_a_model_directory_with_an_altered_or_missing_file_is_refused(classifier: LogisticRegression,
                                                                       settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(load_model(log_model(classifier, "iris", settings=settings).uri, settings=settings).path, folder)
    assert load_model(folder).name == "iris"
    (folder / "model.joblib").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"file model\.joblib was altered"):
        load_model(str(folder))
    (folder / "model.joblib").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.joblib listed in model\.yaml is missing"):
        load_model(folder)


def test_a_model_directory_with_an_unlisted_file_is_refused(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(load_model(log_model(Zeros(), "py", settings=settings).uri, settings=settings).path, folder)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["files"] = {}  # and now the pickle could say anything
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(IntegrityError, match=r"file python_model\.pkl in .* is not listed in model\.yaml"):
        load_model(folder)
    with pytest.raises(IntegrityError, match=r"not listed in model\.yaml"):
        log_model(str(folder), "again", settings=settings)


def test_re_registering_a_model_directory_with_a_new_reference_replaces_it(settings: Settings) -> None:
    X = np.ones((10, 2))
    first = load_model(log_model(Zeros(), "rr", input_example=X, reference=X, settings=settings).uri,
                       settings=settings)
    second = log_model(str(first.path), "rr2", reference=X * 2, settings=settings)
    reference = pd.read_parquet(load_model(second.uri, settings=settings).path / "reference.parquet")
    assert reference.columns.tolist() == ["input-0_0", "input-0_1"]
    assert (reference.to_numpy() == 2.0).all()
    assert second.files["reference.parquet"] != first.metadata.files["reference.parquet"]


def test_gc_keeps_a_registered_models_artifacts(classifier: LogisticRegression, settings: Settings,
                                                workspace: Workspace) -> None:
    info = log_model(classifier, "iris", settings=settings)
    age_blobs(workspace.store)
    report = collect_garbage(workspace, timedelta(0))
    assert not set(info.files.values()) & set(report.digests)
    with workspace.db.read() as session:
        holders = {(p.artifact, p.holder) for p in session.query(ArtifactPin)}
        assert {(d, "model:iris/1") for d in info.files.values()} <= holders
        assert all(session.get(Artifact, d).deleted_at is None for d in info.files.values())  # type: ignore[union-attr]
    shutil.rmtree(settings.home / "models", ignore_errors=True)
    assert load_model("models:/iris", settings=settings).flavor == "sklearn"


class Doubler:
    """A user model: reads its factor from a file of the model directory at load time."""

    def __init__(self) -> None:
        self.factor = 0

    def load(self, model_dir: Path) -> bool:
        self.factor = int((model_dir / "factor.txt").read_text())
        return True

    def predict(self, data: Any) -> Any:
        return np.asarray(data) * self.factor


class Zeros:
    """A user model with nothing to load, for any input."""

    def predict(self, data: Any) -> Any:
        return np.zeros(len(data))


CUSTOM_ESTIMATOR = '''
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from skyloop.registry import log_model

class Doubler(BaseEstimator, TransformerMixin):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2

X = np.arange(10.0).reshape(5, 2)
print(log_model(make_pipeline(Doubler(), LinearRegression()).fit(X, X.sum(axis=1)), "custom", input_example=X).uri)
'''


@pytest.mark.integration
def test_an_sklearn_model_with_a_class_of_the_training_script_loads_in_another_process(
        settings: Settings, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(CUSTOM_ESTIMATOR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env["SKYLOOP_HOME"] = str(settings.home)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["models:/custom/1"]
    loaded = load_model("models:/custom/1", settings=settings)  # this process has no __main__.Doubler
    assert loaded.flavor == "sklearn"
    np.testing.assert_allclose(loaded.predict(np.array([[1.0, 2.0]])), [3.0])


def test_an_importable_sklearn_model_is_still_saved_with_joblib(classifier: LogisticRegression,
                                                                 settings: Settings) -> None:
    assert set(log_model(classifier, "iris", settings=settings).files) == {"model.joblib", "model.yaml"}


@pytest.mark.parametrize(("column", "datatype"), [
    (pd.Categorical(["x", "y"]), "BYTES"),
    (pd.Categorical([1, 2]), "INT64"),
    (pd.array(["x", "y"], dtype="string"), "BYTES"),
])
def test_categorical_and_string_columns_have_a_datatype(column: Any, datatype: str, settings: Settings) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "c": column})
    info = log_model(Zeros(), "cols", input_example=frame[["a"]], settings=settings)
    assert info.manifest.signature is not None and info.manifest.signature.frame is True
    assert infer_signature(frame).inputs[1].model_dump() == {"name": "c", "datatype": datatype, "shape": [-1]}


def test_a_column_of_no_v2_datatype_is_a_spec_error_naming_it(settings: Settings) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "when": pd.to_datetime(["2020-01-01", "2020-01-02"])})
    with pytest.raises(SpecError, match=r"column 'when': dtype datetime64\[ns\] has no V2 datatype"):
        log_model(Zeros(), "dates", input_example=frame, settings=settings)
    with pytest.raises(SpecError, match=r"not one rectangular array"):
        infer_signature([[1, 2], [3]])


def test_the_python_flavor_with_a_user_class(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "factor.txt").write_text("2")
    info = log_model(Doubler(), "doubler", extra_files={"factor.txt": tmp_path / "factor.txt"},
                     input_example=np.array([[1, 2]], dtype=np.int32), settings=settings)
    assert info.flavor == "python"
    assert set(info.files) == {"python_model.pkl", "factor.txt", "model.yaml"}
    assert info.manifest.signature is not None
    assert info.manifest.signature.outputs[0].datatype == "INT32"
    loaded = load_model("models:/doubler", settings=settings)
    np.testing.assert_array_equal(loaded.predict([[1, 2], [3, 4]]), [[2, 4], [6, 8]])


def test_a_python_model_whose_load_fails_is_a_load_error(settings: Settings) -> None:
    log_model(Doubler(), "broken", settings=settings)  # no factor.txt
    with pytest.raises(ModelLoadError, match="cannot load the python model"):
        load_model("models:/broken", settings=settings)


def test_log_model_inside_a_step_records_its_producer(classifier: LogisticRegression, settings: Settings,
                                                      workspace: Workspace) -> None:
    context = StepContext(step_run_id="s1", run_id="r1", task="train", inputs={"data": "ab" * 32},
                          settings=settings)
    with step_context(context):
        info = log_model(classifier, "iris")
    producer = info.manifest.producer
    assert producer is not None
    assert (producer.run_id, producer.step_run_id, producer.task, producer.inputs) == \
        ("r1", "s1", "train", {"data": "ab" * 32})
    assert (info.run_id, info.step_run_id) == ("r1", "s1")
    outside = log_model(classifier, "iris", settings=settings, run_id="r9")
    assert outside.run_id == "r9" and outside.step_run_id is None
    assert log_model(classifier, "iris", settings=settings).manifest.producer is None


@pytest.mark.parametrize(("flavor", "extra"), [("onnx", "onnx"), ("mlflow", "mlflow")])
def test_optional_flavors_name_their_extra(flavor: str, extra: str, settings: Settings, tmp_path: Path) -> None:
    if flavor == "onnx":
        model: Any = tmp_path / "m.onnx"
        model.write_bytes(b"\x08\x07")  # not a valid graph: with onnxruntime installed, a load error too
    else:
        model = tmp_path / "mlflow-model"
        model.mkdir()
        (model / "MLmodel").write_text("flavors: {}\n")
    info = log_model(model, "opt", settings=settings)
    assert info.flavor == flavor
    try:
        __import__("onnxruntime" if flavor == "onnx" else "mlflow")
    except ImportError:
        with pytest.raises(ModelLoadError, match=rf"pip install 'skyloop\[{extra}\]'"):
            load_model(info.uri, settings=settings)
    else:
        with pytest.raises(ModelLoadError):
            load_model(info.uri, settings=settings)


def test_bad_arguments_are_spec_errors(classifier: LogisticRegression, settings: Settings) -> None:
    with pytest.raises(SpecError, match="model name"):
        log_model(classifier, "bad/name", settings=settings)
    with pytest.raises(SpecError, match="unknown model flavor"):
        log_model(classifier, "iris", flavor="tensorflow", settings=settings)
    with pytest.raises(SpecError, match="cannot tell the flavor"):
        log_model(object(), "iris", settings=settings)
    with pytest.raises(SpecError, match=r"invalid model: metrics\.acc"):
        log_model(classifier, "iris", metrics={"acc": "high"}, settings=settings)  # type: ignore[dict-item]
    with pytest.raises(SpecError, match=r"invalid signature: inputs\.0\.datatype"):
        log_model(classifier, "iris", signature={"inputs": [{"name": "x"}]}, settings=settings)
    with pytest.raises(SpecError, match=r"extra file 'notes\.txt': cannot copy"):
        log_model(classifier, "iris", extra_files={"notes.txt": "/nonexistent/notes.txt"}, settings=settings)
    with pytest.raises(SpecError, match="model name"):
        log_model(classifier, "iris\n", settings=settings)


def test_a_version_past_a_64_bit_integer_is_not_found(classifier: LogisticRegression, settings: Settings,
                                                      workspace: Workspace) -> None:
    log_model(classifier, "iris", settings=settings)
    huge = 2**63
    with pytest.raises(NotFound, match=f"has no version {huge}"):  # not SQLite's OverflowError
        load_model(f"models:/iris/{huge}", settings=settings)
    with workspace.db.session() as session, pytest.raises(NotFound, match=f"has no version {huge}"):
        set_alias(session, "iris", "champion", huge)
    with workspace.db.session() as session, pytest.raises(NotFound, match=f"has no version {huge}"):
        set_tags(session, ModelRef("iris", version=huge), {"a": "b"})


def test_load_model_tells_a_path_from_a_reference(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="names no model"):  # not the current folder
        load_model("", settings=settings)
    with pytest.raises(ModelLoadError, match="is not a model directory"):  # not "version 'model' must be ..."
        load_model(str(tmp_path / "no" / "model"), settings=settings)
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        load_model("./no-such-folder", settings=settings)


def test_an_input_example_the_model_refuses_is_a_spec_error(classifier: LogisticRegression,
                                                            settings: Settings, workspace: Workspace) -> None:
    with pytest.raises(SpecError, match=r"input_example: the model's predict failed on it \(ValueError: X has 5 "
                                        r"features.*or signature= instead"):
        log_model(classifier, "iris", input_example=np.zeros((2, 5)), settings=settings)
    with workspace.db.read() as session:
        assert list_models(session) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_metric_that_is_not_a_finite_number_is_a_spec_error(classifier: LogisticRegression, value: float,
                                                               settings: Settings) -> None:
    with pytest.raises(SpecError, match=r"metrics\.auc: .* is not a finite number"):
        log_model(classifier, "iris", metrics={"accuracy": 0.9, "auc": value}, settings=settings)
    assert log_model(classifier, "iris", metrics={"big": 1e308, "acc": np.float32(0.5)},
                     settings=settings).manifest.metrics == {"big": 1e308, "acc": 0.5}


@pytest.mark.parametrize("target", ["model.yaml", "./model.yaml"])
def test_an_extra_file_named_model_yaml_is_refused_not_silently_replaced(
        classifier: LogisticRegression, target: str, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "notes.yaml").write_text("owner: ana\n")
    with pytest.raises(SpecError, match=r"extra file '\./model\.yaml'|extra file 'model\.yaml'"):
        log_model(classifier, "iris", extra_files={target: tmp_path / "notes.yaml"}, settings=settings)


def test_a_load_error_names_the_python_that_saved_the_model(settings: Settings, workspace: Workspace,
                                                            tmp_path: Path) -> None:
    info = log_model(Doubler(), "broken", settings=settings)  # no factor.txt: its load() fails
    copy = tmp_path / "broken"
    shutil.copytree(materialize(workspace, info), copy)
    with pytest.raises(ModelLoadError, match="cannot load the python model") as same:
        load_model(copy)
    assert "saved with Python" not in str(same.value)
    manifest = yaml.safe_load((copy / "model.yaml").read_text())
    manifest["environment"]["python"] = "3.6.15"
    (copy / "model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ModelLoadError, match=r"saved with Python 3\.6\.15, this is Python 3\.\d+\.\d+: load it with "
                                             r"Python 3\.6, or save it again here"):
        load_model(copy)


def test_an_interrupted_extraction_left_in_a_model_directory_is_not_registered(
        classifier: LogisticRegression, settings: Settings, workspace: Workspace, tmp_path: Path) -> None:
    info = log_model(classifier, "iris", settings=settings)
    copy = tmp_path / "iris"
    shutil.copytree(materialize(workspace, info), copy)
    (copy / ".tmp-0123abcd-model.joblib").write_bytes(b"half a file")  # what a killed write_atomic leaves
    load_model(copy)  # loads: the leftover is no model file
    again = log_model(copy, "iris-copy", settings=settings)
    assert set(again.files) == {"model.joblib", "model.yaml"}


def test_an_mlflow_directory_with_a_symbolic_link_is_refused_not_copied(settings: Settings, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("a key that lives outside the model")
    model = tmp_path / "mlflow-model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "leak.txt").symlink_to(secret)
    with pytest.raises(SpecError, match=r"mlflow model directory .* holds a symbolic link leak\.txt"):
        log_model(str(model), "leaky", settings=settings)
    (model / "leak.txt").unlink()
    (model / "data").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SpecError, match="holds a symbolic link data"):
        log_model(str(model), "leaky", settings=settings)


@pytest.mark.parametrize("target", ["sub/../model.yaml", "../outside.txt", "sub/../../outside.txt"])
def test_an_extra_file_name_with_dot_dot_is_refused(classifier: LogisticRegression, target: str,
                                                     settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "notes.yaml").write_text("owner: ana\n")
    with pytest.raises(SpecError, match=r"without '\.\.'"):
        log_model(classifier, "iris", extra_files={target: tmp_path / "notes.yaml"}, settings=settings)
