"""Bad input refused with one line that names it: a `package.module` whose own code raises on import (as a
`.py` file already was), and a run lease too short for the heartbeat that renews it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests_support import agent_env, write

from skyloop import Settings
from skyloop.config import ExecutionSettings
from skyloop.errors import SpecError
from skyloop.execution.loading import resolve
from skyloop.spec.pipeline import StepRef

RAISES_ON_IMPORT = '''
    import os
    from skyloop import pipeline, step

    REGION = os.environ["REGION"]  # set where the run was submitted, missing here

    @step
    def work(x: int) -> int:
        return x + 1

    @pipeline
    def p(x: int = 1):
        return work(x)
    '''


@pytest.mark.integration
@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_module_whose_code_raises_on_import_is_refused_with_exit_2(settings: Settings, tmp_path: Path,
                                                                    command: str) -> None:
    """Before: `envmod.py:p` gave a one-line error and exit 2, `envmod:p` 'internal error: KeyError' and exit 70."""
    write(tmp_path / "envmod.py", RAISES_ON_IMPORT)
    env = agent_env(settings.home, tmp_path / "calls")
    for target, message in (("envmod:p", "cannot import module 'envmod' for pipeline 'envmod:p': KeyError: 'REGION'"),
                            ("envmod.py:p", "cannot load 'envmod.py': KeyError: 'REGION'")):
        done = subprocess.run([sys.executable, "-m", "skyloop", command, target], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert message in out and "internal error" not in out


def test_a_step_module_whose_code_raises_on_import_is_a_spec_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What an agent meets when a queued run's step module raises in its environment: before, the KeyError
    left `resolve` as it was, and crashed the agent."""
    write(tmp_path / "raises_on_import_here.py", RAISES_ON_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match="cannot import 'raises_on_import_here' for step "
                                        "'raises_on_import_here:work': KeyError: 'REGION'"):
        resolve(StepRef(module="raises_on_import_here", qualname="work"))
    assert "raises_on_import_here" not in sys.modules


@pytest.mark.parametrize(("lease", "heartbeat"), [(3.0, 5.0), (5.0, 5.0), (14.9, 5.0), (1.0, 0.5)])
def test_a_lease_shorter_than_three_heartbeats_is_refused_naming_both_settings(tmp_path: Path, lease: float,
                                                                               heartbeat: float) -> None:
    """Before: any lease was taken; one at or under the heartbeat ran out between renewals, and another agent
    adopted live runs and ran their steps a second time."""
    with pytest.raises(SpecError) as refused:
        Settings.load(home=tmp_path, execution={"lease_seconds": lease, "heartbeat_seconds": heartbeat})
    message = str(refused.value)
    assert "SKYLOOP_EXECUTION__LEASE_SECONDS" in message and "SKYLOOP_EXECUTION__HEARTBEAT_SECONDS" in message
    assert f"at least 3 times heartbeat_seconds ({heartbeat:g}" in message
    assert f"raise the lease to {3 * heartbeat:g} or more, or lower the heartbeat" in message


def test_leases_of_three_heartbeats_or_more_are_taken() -> None:
    assert ExecutionSettings().lease_seconds == 30.0  # the defaults: 30 s, renewed every 5 s
    assert ExecutionSettings(lease_seconds=15, heartbeat_seconds=5).lease_seconds == 15
    assert ExecutionSettings(lease_seconds=2, heartbeat_seconds=0.5).lease_seconds == 2  # the tests' agents
    with pytest.raises(ValueError, match="heartbeat_seconds\n  Input should be greater than 0"):
        ExecutionSettings(heartbeat_seconds=0)


@pytest.mark.integration
def test_an_agent_given_a_lease_under_its_heartbeat_exits_2_naming_both_variables(settings: Settings,
                                                                                  tmp_path: Path) -> None:
    env = agent_env(settings.home, tmp_path / "calls", SKYLOOP_EXECUTION__LEASE_SECONDS="3",
                    SKYLOOP_EXECUTION__HEARTBEAT_SECONDS="5")
    done = subprocess.run([sys.executable, "-m", "skyloop", "agent", "--once"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "SKYLOOP_EXECUTION__LEASE_SECONDS" in out and "SKYLOOP_EXECUTION__HEARTBEAT_SECONDS" in out
