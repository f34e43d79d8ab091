"""Deployment spec files as users write them: the README's own examples load as written."""

from __future__ import annotations

import re
from pathlib import Path

from skyloop.deploy.spec import load_deployment_spec

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_loop_section_loads_with_its_on_key(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `on:` as the boolean true; the spec files keep it the key it looks like.
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if b.startswith("loop:"))
    path = tmp_path / "agent.yaml"
    path.write_text("name: agent\npredictors: [{name: main, model_uri: 'models:/agent/1', traffic: 100}]\n" + block)
    spec = load_deployment_spec(path)
    assert spec.loop is not None
    assert len(spec.loop.triggers.on) == 4
