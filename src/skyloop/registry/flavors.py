"""Flavors: how a model object is saved into a directory and loaded back as something with `predict`.

`sklearn` (joblib) and `python` (a user class with `predict` and optionally `load`) need nothing extra;
`onnx` needs onnxruntime and `mlflow` needs mlflow, both imported only when such a model is loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.metadata
import inspect
import io
import pickle
import platform
import shutil
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol

import cloudpickle
import joblib
import numpy as np

from skyloop.errors import ModelLoadError, SpecError
from skyloop.scratch import Scratch

__all__ = ["FLAVORS", "Flavor", "Predictor", "detect_flavor", "get_flavor", "import_extra"]


class Predictor(Protocol):
    """A loaded model: anything with `predict`."""

    def predict(self, data: Any) -> Any:
        """Predict for a batch of inputs."""


def import_extra(module: str, extra: str, flavor: str) -> Any:
    """Import an optional dependency, or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(f"the {flavor} flavor needs {module.split('.')[0]} ({exc}); "
                             f"install it with: pip install 'skyloop[{extra}]'") from exc


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Flavor(ABC):
    """One way of saving and loading models."""

    name: ClassVar[str]
    libraries: ClassVar[tuple[str, ...]] = ()
    """Distributions whose versions `model.yaml` records."""
    reserved: ClassVar[tuple[str, ...]] = ()
    """The names (files or folders at the top of the model directory) that the flavor writes or reads: an
    extra file of one of these names would be taken for the model (see `clashes`)."""

    def clashes(self, target: str) -> bool:
        """Whether an extra file at `target` (relative POSIX path) would be, or be inside, one of `reserved`."""
        parts = PurePosixPath(target).parts
        return bool(parts) and parts[0] in self.reserved

    @abstractmethod
    def accepts(self, model: object) -> bool:
        """Whether this flavor can save `model` (used to infer the flavor)."""

    @abstractmethod
    def save(self, model: object, root: Path) -> None:
        """Write the model's files into the (empty) directory `root`."""

    @abstractmethod
    def load(self, root: Path) -> Predictor:
        """Load the model from a verified directory."""

    def environment(self) -> dict[str, str]:
        """Python's version and the flavor's libraries' versions."""
        found = {"python": platform.python_version()}
        for dist in self.libraries:
            version = _version(dist)
            if version:
                found[dist] = version
        return found


def _wrap_load_errors(flavor: str, root: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot load the {flavor} model in {root}: {type(exc).__name__}: {exc}")


class _Sink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


USER_MODULE_PREFIX = "skyloop_user_"
"""How `execution.loading` names the module of a pipeline `.py` file (`skyloop_user_<stem>_<hash>`): no other
process can import it by that name (a server, `load_model` elsewhere), so its code is pickled by value."""

_by_value_lock = threading.Lock()


@contextlib.contextmanager
def _user_modules_by_value() -> Iterator[None]:
    """Make cloudpickle pickle the code of every pipeline file module by value for the block.

    cloudpickle's registry is process-wide: the lock keeps one thread's block from unregistering a module
    while another thread pickles with it.
    """
    with _by_value_lock:
        already = cloudpickle.list_registry_pickle_by_value()
        added = [module for name, module in list(sys.modules.items())
                 if name.startswith(USER_MODULE_PREFIX) and module is not None and name not in already]
        for module in added:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)


def _dumps_by_value(model: object) -> bytes:
    """`model` pickled by cloudpickle with the code of `__main__` and of pipeline files by value."""
    with _user_modules_by_value():
        data: bytes = cloudpickle.dumps(model)
    return data


class _ByReferenceScan(pickle.Pickler):
    """Pickles into nothing, noting the first class or function that only the saving process can import."""

    def __init__(self) -> None:
        super().__init__(_Sink(), protocol=pickle.HIGHEST_PROTOCOL)
        self.local: str | None = None

    def reducer_override(self, obj: Any) -> Any:
        if self.local is None and (isinstance(obj, type) or inspect.isfunction(obj)):
            module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
            if (module in (None, "__main__") or "<locals>" in qualname
                    or str(module).startswith(USER_MODULE_PREFIX)):
                self.local = f"{module}.{qualname}"
        return NotImplemented


def _defined_locally(model: object) -> bool:
    """Whether pickling `model` by reference would name code that other processes cannot import.

    A custom estimator defined in the training script lives in `__main__`: joblib would record
    `__main__.Doubler`, which no server has. One defined in a pipeline file run by skyloop lives in that
    file's `skyloop_user_...` module, which no server has either.
    """
    scan = _ByReferenceScan()
    try:
        scan.dump(model)
    except Exception:  # e.g. a lambda or a local class, which pickle refuses outright
        return True
    return scan.local is not None


class SklearnFlavor(Flavor):
    """scikit-learn estimators and pipelines, saved with joblib.

    A model that uses code of the training script itself (a custom transformer defined in `__main__` or in
    a pipeline file, a lambda) is pickled by value with cloudpickle instead, as `model.pkl`, so that other
    processes load it.
    """

    name = "sklearn"
    libraries = ("scikit-learn", "joblib", "numpy", "cloudpickle")
    FILE = "model.joblib"
    BY_VALUE_FILE = "model.pkl"
    reserved = (FILE, BY_VALUE_FILE)

    def accepts(self, model: object) -> bool:
        return any(cls.__module__.startswith("sklearn.") for cls in type(model).__mro__)

    def save(self, model: object, root: Path) -> None:
        if not _defined_locally(model):
            joblib.dump(model, root / self.FILE)
            return
        try:
            data = _dumps_by_value(model)
        except Exception as exc:
            raise SpecError(f"cannot pickle the sklearn model {type(model).__name__}: {type(exc).__name__}: "
                            f"{exc}; move its custom classes into an importable module") from exc
        (root / self.BY_VALUE_FILE).write_bytes(data)

    def load(self, root: Path) -> Predictor:
        try:
            by_value = root / self.BY_VALUE_FILE
            model: Predictor = (cloudpickle.loads(by_value.read_bytes()) if by_value.is_file()
                                else joblib.load(root / self.FILE))
        except Exception as exc:
            raise _wrap_load_errors(self.name, root, exc) from exc
        return model


class PythonFlavor(Flavor):
    """A user object with `predict(data)` and optionally `load()` or `load(model_dir)`, pickled by cloudpickle.

    A class (rather than an instance) is instantiated without arguments at load time. `load` is called once
    after unpickling, with a directory when it takes an argument, so it can read extra files: a private,
    writable copy of the model directory, so that what `load` unpacks or caches there never changes the
    verified directory (which every process loading the version shares, and which is refused once it holds
    a file `model.yaml` does not list). The copy is removed when the model object is collected or this
    process exits.
    """

    name = "python"
    libraries = ("cloudpickle",)
    FILE = "python_model.pkl"
    reserved = (FILE,)

    def accepts(self, model: object) -> bool:
        return callable(getattr(model, "predict", None))

    def save(self, model: object, root: Path) -> None:
        if not callable(getattr(model, "predict", None)):
            raise SpecError(f"a python-flavor model needs a predict(data) method; {type(model).__name__} has none")
        try:
            data = _dumps_by_value(model)
        except Exception as exc:
            raise SpecError(f"cannot pickle the python model {type(model).__name__}: {exc}") from exc
        (root / self.FILE).write_bytes(data)

    def load(self, root: Path) -> Predictor:
        scratch: Scratch | None = None
        try:
            obj = cloudpickle.loads((root / self.FILE).read_bytes())
            if isinstance(obj, type):
                obj = obj()
            load = getattr(obj, "load", None)
            if callable(load):
                takes_dir = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                for p in inspect.signature(load).parameters.values())
                if takes_dir:
                    scratch = _scratch_copy(root)
                ready = load(Path(scratch.path) / "model") if scratch is not None else load()
                if ready is False:
                    raise ModelLoadError(f"the python model in {root}: load() returned False")
        except BaseException as exc:
            if scratch is not None:
                scratch.remove()
            if isinstance(exc, ModelLoadError) or not isinstance(exc, Exception):
                raise
            raise _wrap_load_errors(self.name, root, exc) from exc
        if scratch is not None:
            _remove_with(obj, scratch)
        model: Predictor = obj
        return model


def _scratch_copy(root: Path) -> Scratch:
    """A private, writable copy of the model directory `root` (as `model` in the scratch folder) for a python
    model's `load(model_dir)`; removed even when this process is killed (by the next to make one)."""
    scratch = Scratch(f"model-{root.name}")
    try:
        shutil.copytree(root, Path(scratch.path) / "model", ignore=shutil.ignore_patterns("__pycache__", ".tmp-*"))
    except BaseException:
        scratch.remove()
        raise
    return scratch


def _remove_with(obj: object, scratch: Scratch) -> None:
    """Remove `scratch` when `obj` is collected, or at the latest when this process exits (in the process that
    made it: a forked server worker inherits the finalizers of its parent)."""
    try:
        weakref.finalize(obj, scratch.remove)  # also runs at exit
    except TypeError:  # an object without weak references (a class with __slots__)
        atexit.register(scratch.remove)


_ONNX_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}
"""The numpy dtype of each numeric ONNX tensor type (onnxruntime refuses any other dtype, float64 for float32)."""


class _OnnxPredictor:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self.dtypes = {i.name: _ONNX_DTYPES.get(i.type) for i in session.get_inputs()}
        self.shapes = {i.name: list(i.shape) for i in session.get_inputs()}

    def _tensor(self, name: str, value: Any) -> Any:
        """`value` as input `name` takes it: numpy's default int64/float64 (a list, a frame) cast to the graph's
        type within the same kind, and a column given to a `[N, 1]` input as one."""
        array = np.asarray(value)
        dtype = self.dtypes.get(name)
        if dtype is not None and array.dtype != dtype and np.can_cast(array.dtype, dtype, "same_kind"):
            array = array.astype(dtype)
        shape = self.shapes.get(name, [])
        if array.ndim == 1 and len(shape) == 2 and shape[1] == 1:
            array = array.reshape(-1, 1)
        return array

    def predict(self, data: Any) -> Any:
        columns = getattr(data, "columns", None)
        if isinstance(data, dict):
            feed = {k: self._tensor(k, v) for k, v in data.items()}
        elif columns is not None and len(self.inputs) > 1 and set(self.inputs) <= {str(c) for c in columns}:
            # A frame for a graph with one input per column (skl2onnx's for a ColumnTransformer).
            feed = {name: self._tensor(name, data[name].to_numpy()) for name in self.inputs}
        else:
            feed = {self.inputs[0]: self._tensor(self.inputs[0], data)}
        results = self.session.run(None, feed)
        return results[0] if len(results) == 1 else dict(zip(self.outputs, results, strict=True))


class OnnxFlavor(Flavor):
    """An ONNX graph (a `.onnx` path, its bytes as an `onnx.ModelProto`), run by onnxruntime."""

    name = "onnx"
    libraries = ("onnxruntime", "onnx")
    FILE = "model.onnx"
    reserved = (FILE,)

    def accepts(self, model: object) -> bool:
        if isinstance(model, str | Path):
            return str(model).endswith(".onnx") and Path(model).is_file()
        return type(model).__name__ == "ModelProto" and hasattr(model, "SerializeToString")

    def save(self, model: object, root: Path) -> None:
        if isinstance(model, str | Path):
            shutil.copyfile(model, root / self.FILE)
        elif isinstance(model, bytes):
            (root / self.FILE).write_bytes(model)
        elif hasattr(model, "SerializeToString"):
            (root / self.FILE).write_bytes(model.SerializeToString())
        else:
            raise SpecError("an onnx model must be a .onnx path, its bytes or an onnx.ModelProto")

    def load(self, root: Path) -> Predictor:
        ort = import_extra("onnxruntime", "onnx", self.name)
        try:
            session = ort.InferenceSession(str(root / self.FILE), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise _wrap_load_errors(self.name, root, exc) from exc
        return _OnnxPredictor(session)


class MlflowFlavor(Flavor):
    """An MLflow model directory (one with an `MLmodel` file), loaded as an MLflow pyfunc."""

    name = "mlflow"
    libraries = ("mlflow",)
    FOLDER = "mlflow"
    reserved = (FOLDER,)

    def accepts(self, model: object) -> bool:
        return isinstance(model, str | Path) and (Path(model) / "MLmodel").is_file()

    def save(self, model: object, root: Path) -> None:
        if not self.accepts(model):
            raise SpecError("an mlflow model must be the path of an MLflow model directory (one with MLmodel)")
        source = Path(model)  # type: ignore[arg-type]
        # A link would be copied as the file it points to, wherever that is (a key in ~/.ssh, another user's
        # data) and stored in the registry: refused, as in a skyloop model directory (`package._model_files`).
        for path in sorted(source.rglob("*")):
            if path.is_symlink():
                raise SpecError(f"mlflow model directory {source} holds a symbolic link {path.relative_to(source)}; "
                                "copy the file in instead")
        shutil.copytree(source, root / self.FOLDER, symlinks=True)

    def load(self, root: Path) -> Predictor:
        pyfunc = import_extra("mlflow.pyfunc", "mlflow", self.name)
        try:
            model: Predictor = pyfunc.load_model(str(root / self.FOLDER))
        except Exception as exc:
            raise _wrap_load_errors(self.name, root, exc) from exc
        return model


FLAVORS: dict[str, Flavor] = {f.name: f for f in (MlflowFlavor(), OnnxFlavor(), SklearnFlavor(), PythonFlavor())}
"""Every flavor by name, in the order `detect_flavor` tries them."""


def get_flavor(name: str) -> Flavor:
    """The flavor called `name`."""
    try:
        return FLAVORS[name]
    except KeyError:
        raise SpecError(f"unknown model flavor {name!r}; use one of {', '.join(sorted(FLAVORS))}") from None


def detect_flavor(model: object) -> Flavor:
    """The first flavor that accepts `model`."""
    for flavor in FLAVORS.values():
        if flavor.accepts(model):
            return flavor
    raise SpecError(f"cannot tell the flavor of a {type(model).__name__}: pass flavor= one of "
                    f"{', '.join(sorted(FLAVORS))} (a python model needs a predict method)")
