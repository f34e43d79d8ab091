"""What `skyloop` exports is a promise: check the list, and use it the way a user does."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import skyloop


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(skyloop) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(skyloop, name)).__name__ == "module"}
    assert set(skyloop.__all__) == public - modules - {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    for name in skyloop.__all__:
        assert getattr(skyloop, name) is not None
    assert len(skyloop.__all__) == len(set(skyloop.__all__))


def test_every_module_declares_all() -> None:
    missing = []
    for info in pkgutil.walk_packages(skyloop.__path__, "skyloop."):
        if ".migrations" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        if not hasattr(module, "__all__") and not info.ispkg:
            missing.append(info.name)
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{info.name}.__all__ names {name!r}, which it lacks"
    assert missing == []


@skyloop.step
def _double(x: int) -> int:
    return 2 * x


@skyloop.pipeline
def _doubling(x: int = 4):
    return _double(_double(x))


def test_a_user_session_with_public_names_only(tmp_path: Path) -> None:
    settings = skyloop.Settings.for_home(tmp_path)
    result = skyloop.run(_doubling, {"x": 5}, backend="inline", settings=settings)
    assert isinstance(result, skyloop.Run)
    assert result.succeeded and result.outputs == {"output": 20}
    assert result.steps["_double-2"].state is skyloop.TaskState.SUCCEEDED
    spec = _doubling.compile()
    assert isinstance(spec, skyloop.PipelineSpec)
    with pytest.raises(skyloop.SpecError):
        skyloop.run(_doubling, {"x": "five"}, backend="inline", settings=settings)


HEAVY = ["sqlalchemy", "alembic", "numpy", "pandas", "sklearn", "joblib", "cloudpickle", "onnxruntime", "mlflow"]


def test_importing_skyloop_and_its_registry_stays_light() -> None:
    # Worker processes import these for every step; the heavy libraries load on first use of what needs them.
    code = ("import json, sys, skyloop, skyloop.registry; from skyloop import step, pipeline, Settings; "
            "from skyloop.registry import step_context, current_step; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []
    code = ("import sys, skyloop, skyloop.registry; skyloop.log_model; skyloop.registry.infer_signature; "
            "print(sorted(name for name in skyloop.registry.__all__ if getattr(skyloop.registry, name) is None))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["[]"]
