"""What scripts and people read from the CLI: strict JSON with ISO timestamps, JSON alone on stdout, tables that
stay readable on 80 columns, and user text that cannot send escape codes to the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update
from tests_support import write

from skyloop.config import Settings
from skyloop.deploy.spec import load_deployment_spec
from skyloop.store import deployments as store
from skyloop.store.models import RunRow
from skyloop.store.workspace import Workspace

PIPES = '''
from skyloop import pipeline, step

@step
def ident(x: float) -> float:
    return x

@step
def boom(x: float) -> float:
    raise ValueError("bad value \\x1b[31mred\\x1b[0m in row " + "long words " * 12)

@pipeline
def floats(x: float = 1.0):
    return ident(x)

@pipeline
def failing(x: float = 1.0):
    return boom(ident(x))
'''


def strict(text: str) -> Any:
    """`json.loads` that refuses NaN and Infinity, as `jq` and most languages' parsers do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_run_json_is_strict_and_its_timestamps_are_iso(cli, home: Path, tmp_path: Path) -> None:
    write(tmp_path / "pipes.py", PIPES)
    refused = cli("run", "pipes.py:floats", "-p", "x=nan", "--backend", "inline", "--json")
    assert refused.returncode == 2 and "NaN or Infinity is not a value a run can store" in refused.stderr
    ran = cli("run", "pipes.py:floats", "-p", "x=1.5", "--backend", "inline", "--json")
    assert ran.returncode == 0, ran.stderr
    run = strict(ran.stdout)
    # A run stored with a NaN parameter (before `-p x=nan` was refused): printed as `"x": NaN`, which no strict
    # parser reads.
    workspace = Workspace.open(Settings.for_home(home))
    try:
        with workspace.db.session() as session:
            session.execute(update(RunRow).where(RunRow.id == run["id"]).values(params={"x": float("nan")}))
    finally:
        workspace.close()
    shown = strict(cli("runs", "show", run["id"], "--json").stdout)
    assert shown["params"] == {"x": None}
    listed = strict(cli("runs", "list", "--json").stdout)[0]
    for doc in (run, shown, listed):
        for key in ("created_at", "started_at", "ended_at"):
            # before: str(datetime), `2026-01-01 10:00:00+00:00`, unlike the ISO `...T10:00:00+00:00` of models
            # and deployments
            assert "T" in doc[key] and datetime.fromisoformat(doc[key]).tzinfo is not None, (key, doc[key])
    assert {k: listed[k] for k in ("created_at", "started_at", "ended_at")} == \
        {k: shown[k] for k in ("created_at", "started_at", "ended_at")}


def test_escape_codes_in_errors_are_shown_not_sent_and_states_do_not_wrap(
        cli, cli_env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "pipes.py", PIPES)
    ran = cli("run", "pipes.py:failing", "--backend", "inline")
    assert ran.returncode == 5, ran.stdout + ran.stderr
    assert "\x1b" not in ran.stdout and "\\x1b[31mred" in ran.stdout
    run_id = strict(cli("runs", "list", "--json").stdout)[0]["id"]
    narrow = subprocess.run([sys.executable, "-m", "skyloop", "runs", "show", run_id], capture_output=True,
                            text=True, env={**cli_env, "COLUMNS": "80"}, cwd=tmp_path, timeout=120)
    assert narrow.returncode == 0, narrow.stderr
    assert "\x1b" not in narrow.stdout  # before: the step's colour code reached the terminal (or the file)
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    rows = [line for line in narrow.stdout.splitlines() if "ident" in line]
    assert rows and "SUCCEEDED" in rows[0], narrow.stdout  # before: `SUCCEEDE` above `D`
    errors = narrow.stdout[narrow.stdout.index("└"):]  # under the table, in full
    assert "boom: ValueError: bad value \\x1b[31mred\\x1b[0m" in errors
    assert " ".join(errors.split()).count("long words") == 12
    # The JSON keeps the error as the step raised it.
    assert "\x1b[31mred" in strict(cli("runs", "show", run_id, "--json").stdout)["steps"]["boom"]["error"]


def test_history_json_with_a_picture_is_json_alone(cli, home: Path, tmp_path: Path) -> None:
    write(tmp_path / "nodes.py", "class Constant:\n    def predict(self, X):\n        return [0 for _ in X]\n")
    write(tmp_path / "live.yaml", """
        name: live
        predictors:
          - name: main
            graph: {name: m, type: MODEL, implementation: nodes.py:Constant}
            traffic: 100
        """)
    workspace = Workspace.open(Settings.for_home(home))
    with workspace.db.session() as session:
        store.apply_deployment(session, "live", load_deployment_spec(tmp_path / "live.yaml").model_dump(mode="json"))
    workspace.close()
    shown = cli("deploy", "history", "live", "--json", "--picture", str(tmp_path / "pics"))
    assert shown.returncode == 0, shown.stderr
    events = strict(shown.stdout)  # before: `picture: ...` printed on stdout ahead of the JSON
    assert [e["kind"] for e in events] == ["applied"] and "T" in events[0]["at"]
    assert "live-history.png" in shown.stderr and (tmp_path / "pics" / "live-history.png").exists()


def test_a_run_limit_below_one_is_a_usage_error(cli) -> None:
    for limit in ("0", "-1"):  # before: -1 listed every run and 0 none, both with exit 0
        listed = cli("runs", "list", "--limit", limit, "--json")
        assert listed.returncode == 2 and listed.stdout == "" and "--limit" in listed.stderr, listed
