"""`skyloop deploy promote|rollback` act on a rollout in progress and refuse, with a non-zero exit, a deployment that
has none (or does not exist). No controller runs here: a spec version it has not applied yet stands for the state
the command is checked against. (Refusing a finished rollout, and a stale command, are in `test_deployments`.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from deploy_support import NODES
from tests_support import write

from skyloop.config import Settings
from skyloop.deploy.api import apply_deployment
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace

CONSTANT = {"name": "const", "type": "MODEL", "implementation": "nodes.py:Constant"}


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env.update(COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "skyloop", "--home", str(settings.home), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def _apply(settings: Settings, folder: Path, doc: dict[str, Any]) -> None:
    write(folder / "nodes.py", NODES)
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    apply_deployment(path, settings, wait=False, start=False)


def _commands(settings: Settings, name: str) -> list[str]:
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            return [e.kind for e in store.deployment_history(session, name) if e.kind.startswith("command.")]
    finally:
        workspace.close()


def test_a_canary_about_to_start_takes_commands(settings: Settings, tmp_path: Path) -> None:
    _apply(settings, tmp_path, {
        "name": "pending-canary",
        "predictors": [{"name": "stable", "graph": CONSTANT, "traffic": 100}, {"name": "canary", "graph": CONSTANT}],
        "rollout": {"strategy": "canary", "target": "canary", "steps": [{"pause": {}}]}})
    promoted = _cli(settings, "deploy", "promote", "pending-canary")
    assert promoted.returncode == 0, promoted.stderr
    assert "promotion of pending-canary requested" in promoted.stdout
    rolled = _cli(settings, "deploy", "rollback", "pending-canary")
    assert rolled.returncode == 0, rolled.stderr
    assert _commands(settings, "pending-canary") == ["command.promote", "command.rollback"]


def test_a_rolling_deployment_has_no_rollout_to_promote_or_roll_back(settings: Settings, tmp_path: Path) -> None:
    _apply(settings, tmp_path, {"name": "plain", "predictors": [{"name": "main", "graph": CONSTANT, "traffic": 100}]})
    for args in (["promote", "plain"], ["promote", "plain", "--full"], ["rollback", "plain"]):
        refused = _cli(settings, "deploy", *args)
        assert refused.returncode == 4, (args, refused.stdout, refused.stderr)  # Conflict
        assert refused.stdout == "" and "Traceback" not in refused.stderr
        assert "deployment 'plain' has no rollout in progress (its status is Pending: waiting for a controller): " \
               "its rollout strategy is rolling" in refused.stderr
        assert "`skyloop deploy apply` a spec with a canary or blue_green rollout to start one" in refused.stderr
    assert _commands(settings, "plain") == []  # nothing was queued


def test_an_unknown_deployment_is_named(settings: Settings) -> None:
    for command in ("promote", "rollback"):
        refused = _cli(settings, "deploy", command, "nowhere")
        assert refused.returncode == 3, refused.stderr  # NotFound
        assert "no deployment 'nowhere'" in refused.stderr and "skyloop deploy status" in refused.stderr
