"""Refused commands leave the home as it was: one line, exit 2, and the stored deployment, aliases and files
unchanged."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from tests_support import write

from skyloop.config import Settings
from skyloop.deploy.spec import load_deployment_spec
from skyloop.store import deployments as store
from skyloop.store.models import DeploymentRow
from skyloop.store.runs import utcnow
from skyloop.store.workspace import Workspace

NODES = """
class Constant:
    def predict(self, X):
        return [0 for _ in X]
"""

SPEC = """
name: live
predictors:
  - name: main
    graph: {name: m, type: MODEL, implementation: nodes.py:Constant}
    traffic: 100
"""
CHANGED = SPEC.replace("traffic: 100", "traffic: 100\n    replicas: 2")
"""A valid new version of SPEC: only the option refuses it."""


@pytest.fixture
def deployed(home: Path, tmp_path: Path) -> Path:
    """A home whose deployment `live` is at spec version 1, held by a controller that never acts (pid 1's lease),
    so that a spec the CLI wrongly accepted is recorded but starts nothing."""
    write(tmp_path / "nodes.py", NODES)
    write(tmp_path / "live.yaml", SPEC)
    workspace = Workspace.open(Settings.for_home(home))
    with workspace.db.session() as session:
        spec = load_deployment_spec(tmp_path / "live.yaml")
        store.apply_deployment(session, "live", spec.model_dump(mode="json"))
        row = session.get(DeploymentRow, "live")
        assert row is not None
        row.controller, row.lease_expires_at = f"{socket.gethostname()}:1:test", utcnow() + timedelta(hours=1)
    workspace.close()
    return home


def stored(home: Path) -> tuple[int, str, int]:
    with sqlite3.connect(home / "skyloop.db") as conn:
        version, spec = conn.execute("select spec_version, spec from deployments where name = 'live'").fetchone()
        events = conn.execute("select count(*) from deployment_events").fetchone()[0]
    return version, spec, events


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.integration
@pytest.mark.parametrize(("content", "args", "message"), [
    (b"\xff\xfe\x00\x80", [], "is not a text file in UTF-8"),
    (SPEC.replace("traffic: 100", "traffic: 100\n    traffic: 50"), [], "key 'traffic' appears twice"),
    (SPEC.replace("graph: {name: m, type: MODEL, implementation: nodes.py:Constant}", "model_uri: ''"), [],
     "predictors.0.model_uri: is empty"),
    (SPEC.replace("implementation: nodes.py:Constant}", "implementation: nodes.py:Constant, children: "
                                                        "[{name: m, implementation: nodes.py:Constant}]}"), [],
     "graph: node names must be unique; 'm' appears more than once"),
    (CHANGED, ["--timeout", "nan"], "--timeout nan: give the seconds"),
    (CHANGED, ["--timeout", "-1"], "--timeout -1: give the seconds"),
])
def test_a_refused_apply_records_no_spec_version(cli, tmp_path: Path, deployed: Path, content: str | bytes,
                                                 args: list[str], message: str) -> None:
    path = tmp_path / "new.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = stored(deployed)
    result = cli("deploy", "apply", "new.yaml", *args, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in one_line(result)
    assert stored(deployed) == before


@pytest.mark.integration
def test_a_picture_path_that_cannot_be_a_folder_is_named(cli, tmp_path: Path, deployed: Path) -> None:
    write(tmp_path / "taken", "a file")
    result = cli("deploy", "history", "live", "--picture", "taken")
    assert result.returncode == 2, result.stderr
    assert "--picture 'taken': cannot write the picture there" in one_line(result)
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.fixture
def registered(home: Path) -> Path:
    from sklearn.linear_model import LogisticRegression

    from skyloop.registry import log_model
    from skyloop.registry.registry import set_alias

    settings = Settings.for_home(home)
    model = LogisticRegression().fit([[0.0], [1.0]], [0, 1])
    for _ in range(2):
        log_model(model, "iris", settings=settings)
    workspace = Workspace.open(settings)
    with workspace.db.session() as session:
        set_alias(session, "iris", "champion", 1)
    workspace.close()
    return home


@pytest.mark.integration
@pytest.mark.parametrize(("args", "message"), [
    (["models", "show", "iris/99999999999999999999"], "version 99999999999999999999 is not a version a model can have"),
    (["models", "tag", "models:/iris/99999999999999999999", "a=b"], "is not a version a model can have"),
    (["models", "alias", "iris", "champion", "99999999999999999999"], "is not a version a model can have"),
    (["models", "alias", "iris", "champion", "0"], "version 0 is not a version a model can have"),
    (["models", "alias", "models:/iris", "champion", "2"], "model name 'models:/iris' is invalid"),
])
def test_a_version_no_model_can_have_is_refused_and_aliases_stay(cli, registered: Path, args: list[str],
                                                                 message: str) -> None:
    before = json.loads(cli("models", "list", "--json").stdout)
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in one_line(result)
    assert json.loads(cli("models", "list", "--json").stdout) == before
