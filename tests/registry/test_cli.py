"""`skyloop models list|show|alias|tag` in a real subprocess against a temporary home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sklearn.linear_model import LogisticRegression

from skyloop import Settings
from skyloop.registry import log_model

Cli = Callable[..., subprocess.CompletedProcess[str]]

# Runs the real entry point; adds the `models` group only if cli/main.py does not register it yet.
_ENTRY = """
import sys
from skyloop.cli import main as cli, models_cmd
register = cli._register
def _register():
    register()
    if not any(group.name == "models" for group in cli.app.registered_groups):
        cli.app.add_typer(models_cmd.app, name="models")
cli._register = _register
cli.main(sys.argv[1:])
"""


@pytest.fixture
def cli(settings: Settings, tmp_path: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env.update(SKYLOOP_HOME=str(settings.home), COLUMNS="200", NO_COLOR="1")

    def invoke(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    return invoke


@pytest.fixture
def two_versions(classifier: LogisticRegression, settings: Settings) -> None:
    log_model(classifier, "iris", metrics={"accuracy": 0.9}, settings=settings)
    log_model(classifier, "iris", metrics={"accuracy": 0.95}, settings=settings, run_id="run123")


@pytest.mark.integration
def test_list_show_alias_tag(cli: Cli, two_versions: None) -> None:
    moved = cli("models", "alias", "iris", "champion", "1")
    assert moved.returncode == 0, moved.stderr
    assert "iris@champion → version 1" in moved.stdout
    moved = cli("models", "alias", "iris", "champion", "2")
    assert "version 1 → 2" in moved.stdout
    assert json.loads(cli("models", "alias", "iris", "challenger", "1", "--json").stdout) == {
        "model": "iris", "alias": "challenger", "version": 1, "previous": None}

    listed = json.loads(cli("models", "list", "--json").stdout)
    assert [(m["name"], m["latest_version"], m["aliases"]) for m in listed] == [
        ("iris", 2, {"champion": 2, "challenger": 1})]
    assert "champion→2" in cli("models", "list").stdout

    tagged = cli("models", "tag", "iris/2", "stage=prod", "owner=ana")
    assert tagged.returncode == 0, tagged.stderr
    assert cli("models", "tag", "iris", "team=ml").returncode == 0

    shown = json.loads(cli("models", "show", "models:/iris@champion", "--json").stdout)
    assert (shown["version"], shown["aliases"], shown["tags"], shown["run_id"]) == \
        (2, ["champion"], {"stage": "prod", "owner": "ana"}, "run123")
    assert shown["model"]["metrics"] == {"accuracy": 0.95}
    model = json.loads(cli("models", "show", "iris", "--json").stdout)
    assert model["tags"] == {"team": "ml"}
    assert [v["version"] for v in model["versions"]] == [1, 2]
    text = cli("models", "show", "iris/1").stdout
    assert "models:/iris/1" in text and "file model.joblib" in text

    # Deleting says what is left, and which version the alias pointed at.
    assert json.loads(cli("models", "tag", "iris/2", "--delete", "owner", "--json").stdout) == {
        "ref": "models:/iris/2", "tags": {"stage": "prod"}}
    assert cli("models", "tag", "iris/2", "--delete", "stage").stdout.strip() == "models:/iris/2: no tags left"
    assert json.loads(cli("models", "alias", "iris", "champion", "--delete", "--json").stdout) == {
        "model": "iris", "alias": "champion", "version": None, "previous": 2}
    assert cli("models", "alias", "iris", "challenger", "--delete").returncode == 0
    assert json.loads(cli("models", "list", "--json").stdout)[0]["aliases"] == {}


@pytest.mark.integration
@pytest.mark.parametrize("ref", ["iris@latest", "iris/latest", "models:/iris@latest"])
def test_show_latest_is_the_newest_version_in_full(cli: Cli, two_versions: None, ref: str) -> None:
    shown = cli("models", "show", ref, "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert (doc["name"], doc["version"], doc["run_id"]) == ("iris", 2, "run123")
    assert "versions" not in doc
    assert cli("models", "show", ref).stdout.startswith("models:/iris/2 ")


@pytest.mark.integration
@pytest.mark.parametrize(("args", "message"), [
    (("models", "show", "ghost"), "no model named 'ghost'"),
    (("models", "show", "iris/9"), "has no version 9"),
    (("models", "show", "iris@nobody"), "has no alias 'nobody'"),
    (("models", "alias", "iris", "champion", "5"), "has no version 5"),
    (("models", "tag", "ghost/1", "a=b"), "no model named 'ghost'"),
])
def test_unknown_things_are_one_line_errors_with_exit_code_3(cli: Cli, two_versions: None, args: tuple[str, ...],
                                                             message: str) -> None:
    result = cli(*args)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("args", [("models", "tag", "iris", "novalue"), ("models", "alias", "iris", "champion"),
                                  ("models", "show", "bad name")])
def test_bad_arguments_exit_with_code_2(cli: Cli, two_versions: None, args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")


@pytest.mark.integration
def test_list_on_an_empty_home(cli: Cli) -> None:
    assert json.loads(cli("models", "list", "--json").stdout) == []
    assert "no models registered" in cli("models", "list").stdout


@pytest.mark.integration
@pytest.mark.parametrize("ref", ["iris@latest", "iris/latest", "models:/iris@latest"])
def test_tag_latest_tags_the_newest_version_not_the_model(cli: Cli, two_versions: None, ref: str) -> None:
    tagged = cli("models", "tag", ref, "blessed=true", "--json")
    assert tagged.returncode == 0, tagged.stderr
    assert json.loads(tagged.stdout) == {"ref": "models:/iris/2", "tags": {"blessed": "true"}}
    assert json.loads(cli("models", "show", "iris/2", "--json").stdout)["tags"] == {"blessed": "true"}
    assert json.loads(cli("models", "show", "iris", "--json").stdout)["tags"] == {}
    deleted = cli("models", "tag", ref, "--delete", "blessed")
    assert deleted.stdout.strip() == "models:/iris/2: no tags left", deleted.stderr
