"""Run one step attempt: resolve the function, load its inputs, call it, store its outputs.

Shared by every backend; it knows nothing of processes, timeouts or the metadata DB.
"""

from __future__ import annotations

import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

from skyloop.execution.loading import resolve
from skyloop.execution.tasks import Element, Gathered, InputValue, Literal_, TaskLaunch, TaskResult, TaskState
from skyloop.store.artifacts import ArtifactRef, ArtifactStore

__all__ = ["execute", "load_function", "load_input"]

_functions: dict[tuple[str, bytes | None], Callable[..., Any]] = {}


def load_function(launch: TaskLaunch) -> Callable[..., Any]:
    """The plain function behind the launch's step (cached per process)."""
    key = (launch.step.path, launch.fn_payload)
    fn = _functions.get(key)
    if fn is None:
        obj = pickle.loads(launch.fn_payload) if launch.fn_payload is not None else resolve(launch.step)
        fn = getattr(obj, "fn", obj)  # a @step object wraps the user's function
        if not callable(fn):
            raise TypeError(f"{launch.step.path} is not callable")
        _functions[key] = fn
    return fn


def load_input(value: InputValue, store: ArtifactStore) -> Any:
    """The Python value an input binding stands for."""
    if isinstance(value, Literal_):
        return value.value
    if isinstance(value, ArtifactRef):
        return store.get(value)
    if isinstance(value, Gathered):
        return [store.get(ref) for ref in value.refs]
    if isinstance(value, Element):
        whole = value.source.value if isinstance(value.source, Literal_) else store.get(value.source)
        return whole[value.index]
    raise TypeError(f"unknown input binding {value!r}")


def _split_outputs(launch: TaskLaunch, result: Any) -> dict[str, Any]:
    if not launch.multi_output:
        return {launch.output_names[0]: result}
    if not isinstance(result, tuple) or len(result) != len(launch.output_names):
        raise TypeError(f"step {launch.task_name!r} must return its {len(launch.output_names)} outputs "
                        f"{launch.output_names} as a NamedTuple, got {type(result).__name__}")
    return dict(zip(launch.output_names, result, strict=True))


def execute(launch: TaskLaunch, store: ArtifactStore) -> TaskResult:
    """Run the attempt in this process and report how it ended (never raises for step errors)."""
    started = time.time()
    try:
        fn = load_function(launch)
        kwargs = {name: load_input(value, store) for name, value in launch.inputs.items()}
        result = fn(**kwargs)
        outputs = {name: store.put(value) for name, value in _split_outputs(launch, result).items()}
    except Exception as exc:
        return TaskResult(
            key=launch.key, state=TaskState.FAILED, error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(), started_at=started, ended_at=time.time(),
        )
    return TaskResult(key=launch.key, state=TaskState.SUCCEEDED, outputs=outputs,
                      started_at=started, ended_at=time.time())
