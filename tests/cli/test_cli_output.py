"""What scripts and people read from the CLI: strict JSON with ISO timestamps, JSON alone on stdout, tables that
stay readable on 80 columns, and user text that cannot send escape codes to the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from tests_support import write

from skyloop.config import Settings
from skyloop.deploy.spec import load_deployment_spec
from skyloop.store import deployments as store
from skyloop.store.models import DeploymentRow, RunRow
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
    assert "actual/unit" in narrow.stdout  # before: the last column was cut off on 80 columns
    assert narrow.stdout.index("boom: ") > narrow.stdout.rindex("FAILED")  # under the table's rows
    errors = narrow.stdout[narrow.stdout.index("boom: "):]  # in full
    assert "boom: ValueError: bad value \\x1b[31mred\\x1b[0m" in errors
    assert " ".join(errors.split()).count("long words") == 12
    # The JSON keeps the error as the step raised it.
    assert "\x1b[31mred" in strict(cli("runs", "show", run_id, "--json").stdout)["steps"]["boom"]["error"]


def live_spec(folder: Path) -> dict[str, Any]:
    """A deployment `live` of one user node, as `deploy apply` records it (nothing is started)."""
    write(folder / "nodes.py", "class Constant:\n    def predict(self, X):\n        return [0 for _ in X]\n")
    write(folder / "live.yaml", """
        name: live
        predictors:
          - name: main
            graph: {name: m, type: MODEL, implementation: nodes.py:Constant}
            traffic: 100
        """)
    return load_deployment_spec(folder / "live.yaml").model_dump(mode="json")


def test_history_json_with_a_picture_is_json_alone(cli, home: Path, tmp_path: Path) -> None:
    workspace = Workspace.open(Settings.for_home(home))
    with workspace.db.session() as session:
        store.apply_deployment(session, "live", live_spec(tmp_path))
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


OUTPUTS = '''
from skyloop import pipeline, step

@step
def score(x: float) -> float:
    return x * 2

@step
def blob(n: int) -> bytes:
    return b"z" * n

@pipeline
def scored(x: float = 1.5, n: int = 5000):
    return {"score": score(x), "raw": blob(n)}
'''


def test_a_runs_outputs_are_shown_as_values_or_as_artifacts_named_for_lineage(cli, tmp_path: Path) -> None:
    # Before, neither `run` nor `runs show` (nor their --json) said what a run produced: only Python could.
    write(tmp_path / "outs.py", OUTPUTS)
    ran = cli("run", "outs.py:scored", "--backend", "inline")
    assert ran.returncode == 0, ran.stderr
    assert "score = 3.0" in ran.stdout
    raw = strict(cli("runs", "list", "--json").stdout)[0]
    data = strict(cli("runs", "show", raw["id"], "--json").stdout)
    assert data["outputs"]["score"]["value"] == 3.0
    blob = data["outputs"]["raw"]
    assert blob["type"] == "bytes" and blob["size"] >= 5000 and "value" not in blob
    assert f"raw: bytes, {blob['size']:,} bytes, artifact {blob['digest'][:12]}" in ran.stdout
    # The 12 characters shown are enough for the artifact's lineage; fewer than 6 are refused with the rule.
    lineage = cli("artifacts", "lineage", blob["digest"][:12], "--json")
    assert lineage.returncode == 0, lineage.stderr
    assert strict(lineage.stdout) == [{"direction": "produced", "run": raw["id"], "step": "blob", "map_index": -1,
                                       "as": "output", "position": -1, "artifact_deleted_at": None}]
    short = cli("artifacts", "lineage", blob["digest"][:4])
    assert short.returncode == 3 and "a prefix needs 6 characters or more" in short.stderr
    assert "an id prefix needs 6 characters or more" in cli("runs", "show", raw["id"][:4]).stderr


def test_runs_list_times_a_queued_run_from_its_start_and_names_its_backend(cli, home: Path, tmp_path: Path) -> None:
    write(tmp_path / "pipes.py", PIPES)
    assert cli("run", "pipes.py:floats", "--backend", "inline").returncode == 0
    workspace = Workspace.open(Settings.for_home(home))
    try:
        with workspace.db.session() as session:  # as if it had waited 10 minutes in the queue, then ran 2 s
            row = session.query(RunRow).one()
            row.created_at = row.started_at - timedelta(minutes=10)
            row.ended_at = row.started_at + timedelta(seconds=2)
    finally:
        workspace.close()
    listed = cli("runs", "list")
    line = next(line for line in listed.stdout.splitlines() if "SUCCEEDED" in line)
    assert line.split()[-2:] == ["2.0", "inline"], listed.stdout  # was 602.0: the wait counted as the run's


def test_an_agent_names_the_queued_runs_it_leaves_to_other_backends(cli, tmp_path: Path) -> None:
    # Before, `agent --once` said "0 run(s) claimed" and left the run queued without a word.
    write(tmp_path / "pipes.py", PIPES)
    assert cli("submit", "pipes.py:floats", "--backend", "inline").returncode == 0
    agent = cli("agent", "--once", "--backend", "local")
    assert agent.returncode == 0, agent.stderr
    assert "agent done: 0 run(s) claimed" in agent.stdout
    assert "runs queued for other backends wait for an agent of theirs (1 for inline)" in agent.stdout


def test_logs_of_steps_that_printed_nothing_say_so(cli, home: Path, tmp_path: Path) -> None:
    write(tmp_path / "pipes.py", PIPES)
    assert cli("run", "pipes.py:floats", "--backend", "inline").returncode == 0
    run_id = strict(cli("runs", "list", "--json").stdout)[0]["id"]
    logs = cli("runs", "logs", run_id)
    assert logs.returncode == 0 and f"no output: no step of run {run_id[:12]} printed anything" in logs.stdout
    from skyloop.execution.run import Run

    workspace = Workspace.open(Settings.for_home(home))
    try:
        step = Run(workspace, run_id).steps["ident"]
        # Before, the log files of quiet attempts were listed, though none was ever written.
        assert (step.status, step.log_paths) == ("SUCCEEDED", [])
    finally:
        workspace.close()


def test_the_skyloop_script_finds_a_module_pipeline_of_its_folder_as_python_m_does(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    # `python -m skyloop run pipes:floats` ran; the installed `skyloop` script answered "No module named 'pipes'".
    write(tmp_path / "localpipes.py", PIPES)
    script = Path(sys.executable).parent / "skyloop"
    ran = subprocess.run([str(script), "run", "localpipes:floats", "-p", "x=2", "--backend", "local"],
                         capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "output = 2.0" in ran.stdout


def test_the_version_is_printed_by_the_usual_flag(cli) -> None:
    import skyloop

    shown = cli("--version")
    assert (shown.returncode, shown.stdout.strip()) == (0, f"skyloop {skyloop.__version__}")


def test_deploy_history_stays_readable_on_80_columns(cli, cli_env: dict[str, str], home: Path, tmp_path: Path) -> None:
    # Before, the reason was a seventh column squeezed to a word a line, and the cells beside it were cut
    # (`loop.colle…`, `champion=a…`).
    reason = ("canary promoted after 3 successful analyses: error_rate 0 within <= 0.01 and latency_p99 0.004 s "
              "within <= 1.5x stable (0.006 s)")
    workspace = Workspace.open(Settings.for_home(home))
    with workspace.db.session() as session:
        store.apply_deployment(session, "live", live_spec(tmp_path))
        store.record_event(session, "live", 1, "loop.collecting", "Healthy", weights={"champion": 100.0},
                           versions={"champion": "agent/1"}, reason=reason)
    workspace.close()
    shown = subprocess.run([sys.executable, "-m", "skyloop", "deploy", "history", "live"], capture_output=True,
                           text=True, env={**cli_env, "COLUMNS": "80"}, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("loop.collecting" in line and "champion 100%" in line and "champion=agent/1" in line for line in lines)
    assert reason in " ".join(line.strip() for line in lines)  # whole, under its event


def test_deploy_status_stays_readable_on_80_columns(cli_env: dict[str, str], home: Path, tmp_path: Path) -> None:
    state = {"gateway": "http://127.0.0.1:41234", "predictors": {
        "champion": {"weight": 75.0, "version": "agent/1",
                     "replicas": [{"port": 34053, "pid": 123456, "restarts": 0},
                                  {"port": 34054, "pid": 123457, "restarts": 2, "down": True}]},
        "challenger": {"weight": 25.0, "version": "agent/2", "pending": 2,
                       "replicas": [{"port": 34061, "pid": 123470, "restarts": 0, "down": False}]}},
        "windows": {"champion": {"requests": 1200, "errors": 1, "latency_p99": 0.0043, "accuracy": 0.93},
                    "challenger": {"requests": 400, "errors": 0, "latency_p99": 0.0051, "accuracy": 0.95}}}
    workspace = Workspace.open(Settings.for_home(home))
    with workspace.db.session() as session:
        store.apply_deployment(session, "live", live_spec(tmp_path))
        session.execute(update(DeploymentRow).where(DeploymentRow.name == "live").values(controller="c"))
        assert store.update_state(session, "live", "c", "Progressing", "canary step 1 of 2", state)
    workspace.close()
    shown = subprocess.run([sys.executable, "-m", "skyloop", "deploy", "status", "live"], capture_output=True,
                           text=True, env={**cli_env, "COLUMNS": "80"}, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    # Before, headers were cut (`predict…`, `accura…`) and so were the replicas' pids and restarts.
    # A Ray replica being replaced (its pid gone), and replicas waiting for room, were shown as if they served.
    for whole in ("predictor", "accuracy", "34053/123456/0", "34054/down/2", "34061/123470/0", "+2 waiting",
                  "challenger", "0.950"):
        assert whole in text, text
    assert "123457" not in text, text
    assert "shadow" not in text  # no predictor mirrors traffic: no column for it
