"""`log_model` and `load_model`: package a model, register it, and load it back verified."""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from skyloop.config import Settings
from skyloop.errors import IntegrityError, ModelLoadError, NotFound, SpecError
from skyloop.registry.context import StepContext, current_step, running_steps
from skyloop.registry.flavors import Flavor, Predictor, detect_flavor, get_flavor
from skyloop.registry.package import (
    MANIFEST,
    ModelManifest,
    Producer,
    Signature,
    hash_file,
    hash_files,
    read_manifest,
    verify_directory,
    write_atomic,
    write_manifest,
)
from skyloop.registry.registry import ModelVersionInfo, create_version, resolve
from skyloop.registry.signature import check_signature, infer_signature
from skyloop.registry.uri import SCHEME, check_name, parse_model_ref
from skyloop.spec.files import format_validation
from skyloop.store.artifacts import ArtifactRef
from skyloop.store.lineage import record_artifacts
from skyloop.store.models import StepRunRow
from skyloop.store.serializers import RAW
from skyloop.store.workspace import Workspace

__all__ = ["LoadedModel", "load_model", "log_model", "materialize", "verify_model"]

M = TypeVar("M", bound=BaseModel)


@dataclass
class LoadedModel:
    """A model loaded from a verified directory: call `predict`; `metadata` is its `model.yaml`."""

    metadata: ModelManifest
    path: Path
    """The verified directory it was loaded from."""
    model: Predictor
    """The flavor's own object (a scikit-learn estimator, the user's class, an onnxruntime wrapper, ...)."""
    uri: str | None = None
    """`models:/name/version` when it came from the registry."""

    @property
    def name(self) -> str:
        """The model's name."""
        return self.metadata.name

    @property
    def flavor(self) -> str:
        """How it was saved."""
        return self.metadata.flavor

    @property
    def signature(self) -> Signature | None:
        """Its inputs and outputs, when known."""
        return self.metadata.signature

    def predict(self, data: Any) -> Any:
        """Predict for a batch of inputs."""
        return self.model.predict(data)


def _step() -> StepContext | None:
    """The step `log_model` runs in: this thread's, or the one step running in this process (see `context`)."""
    context = current_step()
    if context is None and running_steps() > 1:
        raise SpecError(f"log_model was called in a thread of no step while {running_steps()} steps run in this "
                        "process, so it cannot tell which step the model belongs to; call it in the step's own "
                        "thread, start the thread with contextvars.copy_context().run(...), or pass settings= "
                        "and run_id=/step_run_id=")
    return context


def _producer(run_id: str | None, step_run_id: str | None, inputs: Mapping[str, str] | None) -> Producer | None:
    given = run_id is not None or step_run_id is not None or inputs is not None
    context = current_step() if given else _step()
    if context is not None:
        run_id = run_id or context.run_id
        step_run_id = step_run_id or context.step_run_id
        inputs = inputs if inputs is not None else context.inputs
    if run_id is None and step_run_id is None and not inputs:
        return None
    return Producer(run_id=run_id, step_run_id=step_run_id, task=context.task if context else None,
                    inputs=dict(inputs or {}))


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    context = _step()
    if context is not None and context.settings is not None:
        return context.settings
    return Settings.load()


def _package(model: object, root: Path, name: str, flavor: str | None) -> ModelManifest | None:
    """Write the model's files into `root`; returns the manifest when `model` was already a model directory."""
    if isinstance(model, str | Path) and (Path(model) / MANIFEST).is_file():
        source = Path(model)
        existing = read_manifest(source)
        verify_directory(source, existing)
        if flavor is not None and flavor != existing.flavor:
            raise SpecError(f"{source} holds a {existing.flavor} model, not {flavor}; drop flavor= or fix it")
        # `.tmp-*`: a `write_atomic` that was interrupted (or is in flight) in the source, not a model file.
        shutil.copytree(source, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".tmp-*"))
        return existing.model_copy(update={"name": name})
    chosen = get_flavor(flavor) if flavor is not None else detect_flavor(model)
    chosen.save(model, root)
    return None


def log_model(model: object, name: str, flavor: str | None = None,
              signature: Signature | Mapping[str, Any] | None = None, input_example: Any = None,
              metrics: Mapping[str, float] | None = None, settings: Settings | None = None, *,
              tags: Mapping[str, str] | None = None, description: str | None = None,
              extra_files: Mapping[str, str | Path] | None = None, run_id: str | None = None,
              step_run_id: str | None = None, inputs: Mapping[str, str] | None = None,
              reference: Any = None) -> ModelVersionInfo:
    """Package `model` as a directory with `model.yaml` and register it as the next version of `name`.

    The flavor is inferred when not given (sklearn estimators, objects with `predict`, `.onnx` paths,
    MLflow model directories, or an existing skyloop model directory). With `input_example` and no
    `signature`, the saved model is loaded back, run on the example, and the signature inferred.
    Inside a running step, the version records the run, the step run and the artifacts the step read;
    outside one, pass `run_id` / `step_run_id` / `inputs` to record them.
    `reference` (a frame or 2-D array of training inputs) is stored as `reference.parquet`, the data that
    drift detection compares live inputs with (at most 5,000 rows, sampled).
    """
    check_name(name)
    settings = _settings(settings)
    with tempfile.TemporaryDirectory(prefix="skyloop-model-") as tmp:
        root = Path(tmp)
        manifest = _package(model, root, name, flavor)
        if reference is not None and manifest is not None:
            (root / REFERENCE).unlink(missing_ok=True)  # a new reference replaces the copied directory's
        chosen = get_flavor(manifest.flavor if manifest else flavor or detect_flavor(model).name)
        for target, source in (extra_files or {}).items():
            dest = root / target
            parts = PurePosixPath(Path(target).as_posix()).parts
            _check_extra_target(target, parts, chosen)
            # `..` is refused outright: `sub/../model.yaml` would pass a check on the name as given and then be
            # silently replaced by the manifest (written last), and `sub/..` names no file of its own.
            if (not parts or ".." in parts or dest.exists() or not dest.resolve().is_relative_to(root.resolve())
                    or Path(target).as_posix() == MANIFEST):  # written last, it would silently replace the file
                raise SpecError(f"extra file {target!r} clashes with a model file or leaves the model directory; "
                                "name it with a relative path inside the model directory, without '..'")
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, dest)
            except OSError as exc:
                raise SpecError(f"extra file {target!r}: cannot copy {str(source)!r} ({exc.strerror or exc}); "
                                "give the path of a readable file") from exc
        spec: Signature | None = (_validated(Signature, signature, "signature") if isinstance(signature, Mapping)
                                  else signature)
        if spec is None and manifest is not None:
            spec = manifest.signature
        if spec is None and input_example is not None:
            spec = infer_signature(input_example, _predict_example(chosen.load(root), input_example))
        if spec is not None:
            check_signature(spec)
        if reference is not None:
            _write_reference(reference, root / REFERENCE, spec)
        workspace = Workspace.open(settings)
        try:
            producer = _producer(run_id, step_run_id, inputs)
            if producer is not None and producer.step_run_id and not producer.run_id:
                with workspace.db.read() as session:
                    step = session.get(StepRunRow, producer.step_run_id)
                    if step is not None:
                        producer = producer.model_copy(update={"run_id": step.run_id, "task": step.task})
            manifest = _validated(ModelManifest, dict(
                name=name, flavor=chosen.name, signature=spec,
                metrics={**(manifest.metrics if manifest else {}), **(metrics or {})},
                files=hash_files(root), producer=producer or (manifest.producer if manifest else None),
                environment=manifest.environment if manifest else chosen.environment(),
            ), "model")
            _check_finite(manifest.metrics)
            write_manifest(root, manifest)
            # Blobs first, rows after: a crash in between leaves an unreferenced blob, never a dangling row.
            files: dict[str, str] = {}
            refs: list[ArtifactRef] = []
            for rel in [*manifest.files, MANIFEST]:
                data = (root / rel).read_bytes()
                digest = workspace.store.put_bytes(data, verify=True)  # repairs a damaged blob of the same file
                files[rel] = digest
                refs.append(ArtifactRef(digest, RAW, f"model-file:{rel}", len(data)))
            with workspace.db.session() as session:
                record_artifacts(session, refs)
                return create_version(session, manifest, files[MANIFEST], files, tags=tags, description=description)
        finally:
            workspace.close()


def _check_extra_target(target: str, parts: tuple[str, ...], flavor: Flavor) -> None:
    """Refuse an extra file the model directory would not keep, or that the flavor would take for the model."""
    if any(part == "__pycache__" or part.startswith(".tmp-") for part in parts):
        # Neither is hashed nor stored (`package._model_files`, `verify_directory`): it would vanish silently.
        raise SpecError(f"extra file {target!r}: files under __pycache__ or named .tmp-* are not kept in a model "
                        "directory; give it another name")
    if flavor.clashes(PurePosixPath(*parts).as_posix() if parts else ""):
        raise SpecError(f"extra file {target!r} has a name the {flavor.name} flavor keeps for its own files "
                        f"({', '.join(flavor.reserved)}): it would be loaded as the model; give it another name, "
                        "or put it in a folder (e.g. assets/)")


def _predict_example(model: Predictor, example: Any) -> Any:
    """What `model` returns for `input_example`; its failure is the example's (or the model's) fault, said so."""
    try:
        return model.predict(example)
    except Exception as exc:
        raise SpecError(f"input_example: the model's predict failed on it ({type(exc).__name__}: {exc}); give an "
                        "example of the inputs the model takes, or signature= instead") from exc


def _check_finite(metrics: Mapping[str, float]) -> None:
    # NaN and infinity compare false with everything (an evaluation gate would never pass or fail on them),
    # are not JSON (`models show --json`), and PostgreSQL's JSON refuses them.
    for key, value in metrics.items():
        if not math.isfinite(value):
            raise SpecError(f"invalid model: metrics.{key}: {value} is not a finite number; drop the metric or "
                            "log a number")


def _validated(model: type[M], data: Any, what: str) -> M:
    """`model` built from `data`, or a SpecError naming the fields at fault (metrics=, signature=, ...)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation(exc, what)) from None


REFERENCE = "reference.parquet"
"""The file of a model directory holding its training reference data (for drift detection)."""
_REFERENCE_ROWS = 5000


def _write_reference(data: Any, path: Path, signature: Signature | None) -> None:
    """Write the reference with the column names payload logs will have (see `monitoring.payloads`)."""
    import pandas as pd

    named = hasattr(data, "columns")
    frame = pd.DataFrame(data) if named else pd.DataFrame(np.asarray(data))
    if frame.ndim != 2 or frame.empty:
        raise SpecError("reference must be a non-empty frame or 2-D array of the model's inputs")
    # Columns carry names unless they are positions: a numpy array, or a frame built from one (integer labels).
    # Unnamed columns are taken in the signature's order; named ones are matched by name, never by position
    # (a reordered or renamed frame would store one column's data under another's name).
    positional = not named or all(isinstance(c, int | np.integer) for c in frame.columns)
    frame.columns = [str(c) for c in frame.columns]
    if frame.columns.has_duplicates:
        raise SpecError(f"reference has the column {frame.columns[frame.columns.duplicated()][0]!r} more than "
                        "once; give each column a distinct name")
    specs = signature.inputs if signature is not None else []
    if len(specs) == 1 and len(specs[0].shape) == 2:  # one [n, k] tensor: its columns by position
        spec = specs[0]
        if spec.shape[1] != -1 and frame.shape[1] != spec.shape[1]:
            raise SpecError(f"reference has {frame.shape[1]} columns, the signature's input {spec.name!r} "
                            f"{spec.shape[1]}; give the model's inputs only (no label column)")
        frame.columns = [f"{spec.name}_{j}" for j in range(frame.shape[1])]
    elif specs and all(len(s.shape) == 1 for s in specs):
        names = [s.name for s in specs]
        missing = [n for n in names if n not in set(frame.columns)]
        if missing and positional:
            if frame.shape[1] != len(names):
                raise SpecError(f"reference has {frame.shape[1]} unnamed columns, the signature {len(names)} "
                                f"inputs ({', '.join(names)}); give the model's inputs only, in that order")
            frame.columns = names
        elif missing:
            raise SpecError(f"reference lacks the signature's input column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))} (it has {', '.join(map(repr, frame.columns))}); "
                            "give a frame with the columns the model takes, named as in its signature")
        frame = frame[names]
    if path.exists():
        raise SpecError(f"{path.name} is reserved for the reference data; rename that extra file")
    if len(frame) > _REFERENCE_ROWS:
        frame = frame.sample(n=_REFERENCE_ROWS, random_state=0)
    frame.reset_index(drop=True).to_parquet(path, index=False)


def materialize(workspace: Workspace, info: ModelVersionInfo) -> Path:
    """The verified local directory of a registered version, extracted from the artifact store when needed.

    Files already extracted are checked against their sha256; a changed one is refused, never silently
    replaced, because something on this machine altered it. A directory holding another registration of
    the same name and version (a DB that was reset, another `SKYLOOP_DB_URL` on the same home: its
    `model.yaml` differs, and its files match that one) is extracted over with this one.
    """
    root = workspace.settings.home / "models" / info.name / str(info.version)
    label = f"model {info.name}/{info.version}"
    other = _other_registration(root, info, label)
    # model.yaml last: until every file is in place, a reader of the directory sees the registration it had.
    for rel, digest in sorted(info.files.items(), key=lambda item: item[0] == MANIFEST):
        path = root / rel
        if not path.resolve().is_relative_to(root.resolve()):
            raise IntegrityError(f"{label}: file name {rel!r} leaves the model directory")
        if path.is_file() and not other:
            actual = hash_file(path)
            if actual != digest:
                raise IntegrityError(f"{label}: extracted file {rel} in {root} was altered (sha256 {actual[:12]}, "
                                     f"expected {digest[:12]}); delete {root} to extract it again")
            continue
        if path.is_file() and hash_file(path) == digest:
            continue
        try:
            data = workspace.store.get_bytes(digest, verify=True)
        except IntegrityError as exc:
            raise IntegrityError(f"{label}: file {rel} is corrupt in the artifact store (blob {digest[:12]} no "
                                 "longer matches its sha256); register the model again from its source") from exc
        except NotFound as exc:
            raise ModelLoadError(f"{label}: file {rel} (blob {digest[:12]}) is missing from the artifact store "
                                 f"{workspace.store.url}; register the model again from its source") from exc
        write_atomic(path, data)
    for rel in other:  # the other registration's files that this one does not have
        if rel not in info.files:
            (root / rel).unlink(missing_ok=True)
    return root


def _other_registration(root: Path, info: ModelVersionInfo, label: str) -> list[str]:
    """The files of another registration of this name and version extracted in `root` (none: not one).

    Writing the registry's files over them is what any process loading this version does, so two at once
    leave the same directory.
    """
    manifest_file, expected = root / MANIFEST, info.files.get(MANIFEST)
    if expected is None or not manifest_file.is_file() or hash_file(manifest_file) == expected:
        return []
    try:
        extracted = read_manifest(root)
        with contextlib.suppress(ModelLoadError):  # a file of it was deleted: still that registration
            verify_directory(root, extracted)
    except (ModelLoadError, IntegrityError) as exc:
        raise IntegrityError(f"{label}: {root} holds a model.yaml other than the registry's for this version, "
                             f"and files that do not match it ({exc}); delete {root} to extract this version "
                             "again") from exc
    return [*extracted.files, MANIFEST]


def verify_model(root: Path, expected: Mapping[str, str] | None = None, uri: str | None = None) -> ModelManifest:
    """Check a model directory without loading it: every file against `model.yaml` (and the registry's list)."""
    manifest = read_manifest(root)
    if expected is not None:
        listed = {k: v for k, v in expected.items() if k != MANIFEST}
        if manifest.files != listed:
            raise IntegrityError(f"{root / MANIFEST} does not list the files registered for {uri}")
    verify_directory(root, manifest)
    return manifest


def _load_directory(root: Path, expected: Mapping[str, str] | None = None, uri: str | None = None) -> LoadedModel:
    manifest = verify_model(root, expected, uri)
    try:
        model = get_flavor(manifest.flavor).load(root)
    except ModelLoadError as exc:
        # Pickled code (cloudpickle's by-value classes and functions) only loads on the Python that wrote it.
        saved, here = manifest.environment.get("python", ""), platform.python_version()
        if saved and saved.split(".")[:2] != here.split(".")[:2]:
            raise ModelLoadError(f"{exc} (it was saved with Python {saved}, this is Python {here}: load it with "
                                 f"Python {'.'.join(saved.split('.')[:2])}, or save it again here)") from exc
        raise
    return LoadedModel(manifest, root, model, uri)


def _is_path(text: str) -> bool:
    """Whether `text` names a folder rather than a model: it starts as no model name can, or it is a folder
    and no model reference.

    A valid reference (`iris`, `iris/2`) always means the registry, even with a folder of that name in the
    working directory: what `load_model("iris")` loads must not depend on where the program runs (and a
    stray `./iris` holding an older model.yaml would load silently). Write `./iris` for the folder.
    """
    if not text.strip() or text.startswith(SCHEME):
        return False
    if text.startswith(("/", ".", "~", "\\")):
        return True
    try:
        parse_model_ref(text)
    except SpecError:
        return Path(text).is_dir()
    return False


def load_model(uri: str | Path, settings: Settings | None = None) -> LoadedModel:
    """Load `models:/name/3`, `models:/name@alias`, `models:/name` (latest) or a model directory.

    Every file is checked against its sha256 first; a missing or altered file is refused.
    """
    if isinstance(uri, Path) or _is_path(uri):
        return _load_directory(Path(uri).expanduser())
    ref = parse_model_ref(uri)
    workspace = Workspace.open(_settings(settings))
    try:
        with workspace.db.read() as session:
            info = resolve(session, ref)
        root = materialize(workspace, info)
    finally:
        workspace.close()
    return _load_directory(root, info.files, info.uri)
