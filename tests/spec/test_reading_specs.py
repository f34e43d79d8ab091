"""Spec files as users get them wrong: the error is one line that names the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skyloop import SpecError
from skyloop.deploy.spec import DeploymentSpec, load_deployment_spec
from skyloop.serving.spec import ServeSpec, load_serve_spec
from skyloop.spec.files import read_yaml, validate
from skyloop.spec.pipeline import PipelineSpec

PREDICTOR = {"name": "main", "model_uri": "models:/iris@champion", "traffic": 100}
TASK: dict[str, Any] = {"name": "a", "step": {"module": "steps.py", "qualname": "f"},
                        "inputs": {"n": {"kind": "param", "param": "n"}}}


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", "name: caf\xe9\n".encode("latin-1")])
def test_a_file_that_is_not_utf8_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.yaml"
    path.write_bytes(content)
    for load in (read_yaml, load_deployment_spec, load_serve_spec):
        with pytest.raises(SpecError, match=r"'.*d\.yaml' is not a text file in UTF-8 .*save it as UTF-8"):
            load(path)


@pytest.mark.parametrize(("text", "key"), [
    ("name: a\npredictors: [{name: main, model_uri: 'models:/iris@champion', traffic: 50, traffic: 100}]\n", "traffic"),
    ("name: a\nrollout: {strategy: canary}\npredictors: []\nrollout: {strategy: rolling}\n", "rollout"),
])
def test_a_key_written_twice_is_refused_not_silently_dropped(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=f"key '{key}' appears twice in one mapping; keep one"):
        load_deployment_spec(path)


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("base: &b {replicas: 2, traffic: 0}\nname: a\n"
                    "predictors: [{<<: *b, name: main, model_uri: 'models:/iris@champion', traffic: 100}]\n")
    data = read_yaml(path)
    assert data["predictors"][0] == {"replicas": 2, "traffic": 100, "name": "main",
                                     "model_uri": "models:/iris@champion"}


@pytest.mark.parametrize(("cls", "data", "message"), [
    (DeploymentSpec, {"name": "a", "predictors": [{**PREDICTOR, "replica": 2}]},
     "predictors.0.replica: unknown field 'replica'; did you mean 'replicas'?"),
    (DeploymentSpec, {"name": "a", "predictor": [PREDICTOR]},
     "predictor: unknown field 'predictor'; did you mean 'predictors'?"),
    (DeploymentSpec, {"name": "a", "predictors": [{**PREDICTOR, "resources": {"gpu": 1}}]},
     "predictors.0.resources.gpu: unknown field 'gpu'; did you mean 'gpus'?"),
    (DeploymentSpec, {"name": "a", "predictors": [PREDICTOR], "zzz": 1},
     "zzz: unknown field 'zzz'; the fields here are name, backend, ray_address, gateway, predictors, router,"),
    (DeploymentSpec, {"name": "a", "predictors": [PREDICTOR],
                      "loop": {"triggers": {"on": [{"drift": True, "evry": 1}]}}},
     "loop.triggers.on.0.evry: unknown field 'evry'; the fields here are drift, quality_below, labelled_rows, "
     "schedule"),
    (ServeSpec, {"name": "s", "graph": {"name": "g", "model_uri": "m", "childs": []}},
     "graph.childs: unknown field 'childs'; did you mean 'children'?"),
    (PipelineSpec, {"name": "p", "tasks": [{**TASK, "retries": 2}]},
     "tasks.0.retries: unknown field 'retries'; did you mean 'retry'?"),
    (PipelineSpec, {"name": "p", "tasks": [{**TASK, "inputs": {"n": {"kind": "task", "task": "b", "outptu": "x"}}}]},
     "tasks.0.inputs.n.task.outptu: unknown field 'outptu'; did you mean 'output'?"),
])
def test_an_unknown_field_names_the_field_it_was_meant_to_be(cls: Any, data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        validate(cls, data, "spec x")
    assert message in str(err.value)
    assert "Extra inputs are not permitted" not in str(err.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "a", "predictors": [PREDICTOR], "rollout": {"strategy": "canary"}},
     "invalid spec x: rollout: a canary rollout needs target"),
    ({"name": "a", "predictors": [{**PREDICTOR, "traffic": 50}]},
     "invalid spec x: predictors: traffic adds up to 50, it must add up to 100"),
    ({"name": "bad name", "predictors": [PREDICTOR]},
     "invalid spec x: name: 'bad name' does not match '^[A-Za-z0-9][A-Za-z0-9_.-]*$'"),
])
def test_a_message_names_its_field_once_and_the_value_that_broke_a_pattern(data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        validate(DeploymentSpec, data, "spec x")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("cls", "data", "message"), [
    (PipelineSpec, None, "(top level): must be a mapping with the fields api_version, kind, name, description, "
                         "source, params, tasks, outputs; got nothing"),
    (PipelineSpec, ["a"] * 30, "(top level): must be a mapping with the fields api_version, kind, name,"),
    (DeploymentSpec, {"name": "a", "predictors": [5]},
     "predictors.0: must be a mapping with the fields name, graph, model_uri, replicas, resources, batching, "
     "traffic, shadow; got 5"),
    (DeploymentSpec, {"name": "a", "predictors": [PREDICTOR], "router": "thompson"},
     "router: must be a mapping with the fields type, epsilon, sticky_header; got 'thompson'"),
])
def test_a_section_that_is_not_a_mapping_lists_the_fields_it_takes(cls: Any, data: Any, message: str) -> None:
    with pytest.raises(SpecError) as err:
        validate(cls, data, "spec x")
    assert message in str(err.value)
