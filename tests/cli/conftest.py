"""Run the real `skyloop` command in a subprocess against a temporary home."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env.update(SKYLOOP_HOME=str(home), COLUMNS="200", NO_COLOR="1")
    return env


@pytest.fixture
def cli(cli_env: dict[str, str], tmp_path: Path) -> Cli:
    def invoke(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "skyloop", *args], capture_output=True, text=True,
                              env=cli_env, cwd=tmp_path, timeout=timeout)

    return invoke
