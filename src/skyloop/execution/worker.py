"""Run one step attempt: resolve the function, load its inputs, call it, store its outputs.

Shared by every backend; it knows nothing of processes, timeouts or the metadata DB. The step runs
inside `step_context(...)`, so that `log_model` in it records the run, the step run and its inputs,
and registers in the run's DB.
"""

from __future__ import annotations

import copy
import pickle
import time
import traceback
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from skyloop.config import ExecutionSettings, Settings
from skyloop.execution.loading import load_file_module, resolve
from skyloop.execution.tasks import (
    Element,
    Gathered,
    InputValue,
    Literal_,
    TaskLaunch,
    TaskResult,
    TaskState,
    input_digests,
)
from skyloop.pipelines.types import fits, type_str
from skyloop.registry.context import StepContext, step_context
from skyloop.store.artifacts import ArtifactRef, ArtifactStore
from skyloop.store.serializers import type_name

__all__ = ["execute", "load_function", "load_input", "step_context_of"]

_functions: dict[tuple[str, bytes | None], tuple[Callable[..., Any], ModuleType | None]] = {}
"""(step path, pickled function) -> the function, and the `.py` file module it was taken from (if any)."""
_settings: dict[tuple[str, str | None, str], Settings] = {}
_mapped: OrderedDict[str, Any] = OrderedDict()
"""Digest -> the loaded list a `.map` fans out over (the last few, newest last): without it, every unit
of a fan-out over n items would load all n, O(n^2) for the whole map (1,000 units: 0.14 ms each)."""
MAPPED_CACHE = 4
"""How many such lists a process keeps."""
MAPPED_CACHE_BYTES = 64 * 2**20
"""Lists stored larger than this are loaded again for each unit rather than kept."""
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


def load_function(launch: TaskLaunch) -> Callable[..., Any]:
    """The plain function behind the launch's step (cached per process).

    A step from a `.py` file is taken from the file as it is now: if the file has changed since the
    function was cached, it is imported again (see `load_file_module`), as a new process would.
    """
    key = (launch.step.path, launch.fn_payload)
    module = None
    if launch.fn_payload is None and launch.step.module.endswith(".py"):
        module = load_file_module(launch.step.module)
    cached = _functions.get(key)
    if cached is not None and cached[1] is module:
        return cached[0]
    obj = pickle.loads(launch.fn_payload) if launch.fn_payload is not None else resolve(launch.step)
    fn: Callable[..., Any] = getattr(obj, "fn", obj)  # a @step object wraps the user's function
    if not callable(fn):
        raise TypeError(f"{launch.step.path} is not callable")
    _functions[key] = (fn, module)
    return fn


_hashes: dict[Callable[..., Any], str] = {}
"""Function -> its code hash (see `loaded_code_hash`)."""


def loaded_code_hash(launch: TaskLaunch) -> str | None:
    """The code hash of the step's function as this worker loads it now, for a step from a `.py` file (which
    workers import again once it changed); None for any other step, or a file that no longer loads (the
    attempt reports why when it runs)."""
    if launch.fn_payload is not None or not launch.step.module.endswith(".py"):
        return None
    from skyloop.pipelines.step import code_hash

    try:
        fn = load_function(launch)
    except Exception:
        return None
    found = _hashes.get(fn)
    if found is None:
        found = _hashes[fn] = code_hash(fn)
    return found


def load_input(value: InputValue, store: ArtifactStore) -> Any:
    """The Python value an input binding stands for."""
    if isinstance(value, Literal_):
        return _own(value.value)
    if isinstance(value, ArtifactRef):
        return store.get(value)
    if isinstance(value, Gathered):
        return [store.get(ref) for ref in value.refs]
    if isinstance(value, Element):
        if isinstance(value.source, Literal_):
            return _own(value.source.value[value.index])
        return _element(value.source, value.index, store)
    raise TypeError(f"unknown input binding {value!r}")


def _own(value: Any) -> Any:
    """A parameter or constant for one step to keep: the run's own value is shared by every step (in this very
    process on the inline backend, and it is the pipeline's default), so a step that changes its input in place
    must change a copy, as it does on a backend that sends each attempt its inputs."""
    return value if type(value) in _IMMUTABLE else copy.deepcopy(value)  # JSON-like: deepcopy cannot fail


def _element(source: ArtifactRef, index: int, store: ArtifactStore) -> Any:
    """Item `index` of a stored list, from the list kept since an earlier unit of the same map if any.

    A kept list is shared by the units a process runs, so each gets a deep copy of its item: a step
    that changes its input in place (or a retry of it) must not see another's changes.
    """
    whole = _mapped.get(source.digest)
    if whole is None:
        whole = store.get(source)
        if source.size > MAPPED_CACHE_BYTES:
            return whole[index]
        _mapped[source.digest] = whole
        while len(_mapped) > MAPPED_CACHE:
            _mapped.popitem(last=False)
    else:
        _mapped.move_to_end(source.digest)
    item = whole[index]
    if type(item) in _IMMUTABLE:
        return item
    try:
        return copy.deepcopy(item)
    except Exception:  # an item deepcopy cannot copy: load it afresh, as if nothing were kept
        return store.get(source)[index]


def _split_outputs(launch: TaskLaunch, result: Any) -> dict[str, Any]:
    if not launch.multi_output:
        return {launch.output_names[0]: result}
    if not isinstance(result, tuple) or len(result) != len(launch.output_names):
        raise TypeError(f"step {launch.task_name!r} must return its {len(launch.output_names)} outputs "
                        f"{launch.output_names} as a NamedTuple, got {type(result).__name__}")
    return dict(zip(launch.output_names, result, strict=True))


_declared: dict[Callable[..., Any], dict[str, Any]] = {}
"""Function -> the type its return annotation declares for each output (see `_output_types`)."""


def _output_types(fn: Callable[..., Any]) -> dict[str, Any]:
    """Output name -> declared type: one `output`, or the fields of a NamedTuple; empty when unresolvable."""
    found = _declared.get(fn)
    if found is None:
        try:
            ret = typing.get_type_hints(fn).get("return", Any)
            if isinstance(ret, type) and issubclass(ret, tuple) and hasattr(ret, "_fields"):
                hints = typing.get_type_hints(ret)
                found = {name: hints.get(name, Any) for name in ret._fields}
            else:
                found = {"output": ret}
        except Exception:  # forward references that do not resolve here: nothing to check against
            found = {}
        _declared[fn] = found
    return found


def _check_types(launch: TaskLaunch, fn: Callable[..., Any], outputs: dict[str, Any]) -> None:
    """Refuse an output that is not of its declared type, before it is stored: a step downstream (or a cached
    rerun) would take it for what the annotation promises."""
    declared = _output_types(fn)
    for name, value in outputs.items():
        tp = declared.get(name, Any)
        if not fits(value, tp):
            what = f"for its output {name!r}, declared" if launch.multi_output else "where its return annotation says"
            raise TypeError(f"step {launch.task_name!r} returned a {type_name(value)} {what} {type_str(tp)}; "
                            "return that type, or change the annotation")


def _store_outputs(launch: TaskLaunch, outputs: dict[str, Any], store: ArtifactStore) -> dict[str, ArtifactRef]:
    """Store every output, or fail naming the one that cannot be serialized."""
    refs: dict[str, ArtifactRef] = {}
    for name, value in outputs.items():
        try:
            refs[name] = store.put(value)
        except TypeError as exc:  # what `serialize` raises; a StoreError (disk full...) passes as it is
            hint = "a list instead (e.g. list(...))" if isinstance(value, Iterator) else \
                "data that pickle can store instead (e.g. a file's path, not the open file)"
            raise TypeError(f"step {launch.task_name!r}: output {name!r} cannot be stored ({exc}); return "
                            f"{hint}") from exc
    return refs


def _run_settings(launch: TaskLaunch) -> Settings | None:
    """The settings of the launch's run (its home, DB and artifact store), built once per process."""
    if launch.home is None:
        return None
    key = (launch.home, launch.db_url, launch.artifacts_url)
    settings = _settings.get(key)
    if settings is None:
        # Not `Settings(...)`: the run's stores are given, and nothing here may read the environment.
        settings = _settings[key] = Settings.model_construct(
            home=Path(launch.home), db_url=launch.db_url, artifacts_url=launch.artifacts_url,
            execution=ExecutionSettings())
    return settings


def step_context_of(launch: TaskLaunch) -> StepContext:
    """What `current_step()` says while the launch's step runs."""
    return StepContext(step_run_id=launch.key, run_id=launch.run_id, task=launch.task_name,
                       inputs=input_digests(launch.inputs), settings=_run_settings(launch))


def execute(launch: TaskLaunch, store: ArtifactStore) -> TaskResult:
    """Run the attempt in this process and report how it ended (never raises for step errors)."""
    started = time.time()
    try:
        fn = load_function(launch)
        kwargs = {name: load_input(value, store) for name, value in launch.inputs.items()}
        with step_context(step_context_of(launch)):
            result = fn(**kwargs)
        values = _split_outputs(launch, result)
        _check_types(launch, fn, values)
        outputs = _store_outputs(launch, values, store)
    except Exception as exc:
        return TaskResult(
            key=launch.key, state=TaskState.FAILED, error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(), started_at=started, ended_at=time.time(),
        )
    return TaskResult(key=launch.key, state=TaskState.SUCCEEDED, outputs=outputs,
                      started_at=started, ended_at=time.time())
