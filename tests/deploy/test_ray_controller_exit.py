"""A controller process that started its own local Ray for a `backend: ray` deployment stops that Ray when it
stops: its raylet and agents do not outlive it (they held ports, orphaned, for minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import psutil
import pytest
from deploy_support import NODES, Env, controller, stop_pid
from ray_support import RAY_ENV
from tests_support import write

from skyloop.config import Settings

pytestmark = pytest.mark.integration


def test_a_controller_stops_the_local_ray_it_started(settings: Settings, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Not imported here: Ray reads its loopback setting once, at import, and this process's later Ray tests need it.
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs the ray extra")
    for name, value in RAY_ENV.items():  # for the controller's Ray: loopback only, no usage report
        monkeypatch.setenv(name, value)
    write(tmp_path / "specs" / "nodes.py", NODES)
    env = Env(settings, tmp_path / "specs", np.zeros((1, 4)), np.zeros(1))
    doc = {"name": "rayexit", "backend": "ray", "predictors": [{
        "name": "main", "traffic": 100, "resources": {"cpus": 0.5},
        "graph": {"name": "const", "type": "MODEL", "implementation": "nodes.py:Constant"}}]}
    started: list[psutil.Process] = []
    try:
        with controller(env) as proc:
            info = env.apply(doc, timeout=180)
            assert info.status == "Healthy", info.reason
            started = psutil.Process(proc.pid).children(recursive=True)
            names = " ".join(p.name() for p in started)
            assert "raylet" in names and "gcs_server" in names, names  # the controller's own Ray
            env.delete("rayexit")
            proc.terminate()
            assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        for process in started:
            stop_pid(process.pid)
