"""What a spec accepted is what runs: values that would fail later, in a controller or a worker, are refused
when the spec is read, naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from skyloop import SpecError
from skyloop.deploy.spec import LoopSpec, load_deployment_spec
from skyloop.serving.spec import load_serve_spec
from skyloop.spec.files import validate
from skyloop.spec.pipeline import PipelineSpec

PREDICTOR = {"name": "main", "model_uri": "models:/iris@champion", "traffic": 100}
TRANSFORM = {"name": "t", "type": "TRANSFORMER", "implementation": "nodes.py:Scale",
             "children": [{"name": "m", "model_uri": "models:/iris@champion"}]}


def deployment(**fields: Any) -> dict[str, Any]:
    return {"name": "d", "predictors": [PREDICTOR], **fields}


def predictor(**fields: Any) -> dict[str, Any]:
    return deployment(predictors=[{**PREDICTOR, **fields}])


@pytest.mark.parametrize(("doc", "message"), [
    (predictor(model_uri=""), "predictors.0.model_uri: is empty; give a registered model (models:/NAME@ALIAS)"),
    (predictor(model_uri="models:/x@"), "predictors.0.model_uri: alias '' is invalid"),
    (predictor(model_uri="models:/"), "predictors.0.model_uri: model reference 'models:/' names no model"),
    (predictor(model_uri="models:/x/abc"), "predictors.0.model_uri: model reference 'models:/x/abc': version 'abc'"),
    (predictor(model_uri="models:/x/" + "9" * 25), "version 9999999999999999999999999 is past any version"),
    (predictor(model_uri=None, graph={**TRANSFORM, "implementation": "nodes.py"}),
     "predictors.0.graph.implementation: 'nodes.py' must look like FILE.py:Class or package.module:Class"),
    (predictor(model_uri=None, graph={**TRANSFORM, "children": [{"name": "m", "model_uri": "models:/x@"}]}),
     "predictors.0.graph.children.0.model_uri: alias '' is invalid"),
    (predictor(model_uri=None, graph={**TRANSFORM, "name": "m"}),
     "predictors.0: predictor 'main': graph: node names must be unique; 'm' appears more than once"),
    (deployment(loop={"steps": []}), "loop.steps: a blessed challenger goes through a canary: give at least one step"),
    (deployment(loop={"champion_alias": "1st"}), "loop.champion_alias: '1st' does not match"),
    (deployment(loop={"challenger_alias": "new one"}), "loop.challenger_alias: 'new one' does not match"),
    (deployment(loop={"champion_alias": "best", "challenger_alias": "best"}),
     "loop: champion_alias and challenger_alias are both 'best'"),
    (deployment(loop={"retrain": {"pipeline": "train.py", "model": "iris"}}),
     "loop.retrain.pipeline: 'train.py' must look like FILE.py:PIPELINE or package.module:PIPELINE"),
])
def test_a_deployment_spec_refuses_what_its_controller_could_not_run(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        load_deployment_spec(doc)
    assert message in str(err.value)


@pytest.mark.parametrize(("graph", "message"), [
    ({"name": "m", "model_uri": ""}, "graph.model_uri: is empty"),
    ({"name": "m", "model_uri": "models:/iris/0"}, "graph.model_uri: model reference 'models:/iris/0': version '0'"),
    ({**TRANSFORM, "implementation": ":Scale"}, "graph.implementation: ':Scale' must look like FILE.py:Class"),
])
def test_a_serving_spec_refuses_a_node_it_could_not_load(graph: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        load_serve_spec({"name": "s", "graph": graph})
    assert message in str(err.value)


def test_a_loop_the_spec_accepts_can_build_its_canary() -> None:
    # The controller builds the challenger's canary from these fields: what the spec took must validate there.
    from skyloop.deploy.spec import RolloutSpec, Strategy

    loop = LoopSpec.model_validate({"champion_alias": "best", "challenger_alias": "next",
                                    "steps": [{"weight": 10, "duration": "1s"}]})
    RolloutSpec(strategy=Strategy.CANARY, target="challenger", steps=loop.steps, promote_alias=loop.champion_alias)


@pytest.mark.parametrize(("step", "message"), [
    ({"module": "", "qualname": "f"}, "tasks.0.step: module '' is neither a file nor a module"),
    ({"module": "..", "qualname": "f"}, "tasks.0.step: module '..' is neither a file nor a module"),
    ({"module": ".steps", "qualname": "f"}, "tasks.0.step: module '.steps' is neither a file nor a module"),
    ({"module": "steps.py", "qualname": " "}, "tasks.0.step: qualname of 'steps.py' is empty"),
])
def test_a_pipeline_spec_refuses_a_step_it_could_not_import(step: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError) as err:
        validate(PipelineSpec, {"name": "p", "tasks": [{"name": "a", "step": step}]}, "pipeline spec")
    assert message in str(err.value)


@pytest.mark.parametrize("module", ["../lib/steps.py", "./steps.py", "package.steps", "steps"])
def test_file_paths_and_dotted_modules_stay_valid(module: str) -> None:
    validate(PipelineSpec, {"name": "p", "tasks": [{"name": "a", "step": {"module": module, "qualname": "f"}}]}, "x")


@pytest.mark.parametrize(("doc", "message"), [
    (deployment(name="d" * 201), "name: String should have at most 200 characters"),
    (predictor(name="p" * 201), "predictors.0.name: String should have at most 200 characters"),
])
def test_names_longer_than_their_db_column_or_a_file_name_are_refused(doc: dict[str, Any], message: str) -> None:
    # A 250-character predictor name made file names (`NAME-1.state.json`) longer than a filesystem takes: the
    # deployment failed in its controller, after `apply` had accepted it.
    with pytest.raises(SpecError) as err:
        load_deployment_spec(doc)
    assert message in str(err.value)
    load_deployment_spec(deployment(name="d" * 200, predictors=[{**PREDICTOR, "name": "p" * 200}]))


@pytest.mark.parametrize(("fields", "message"), [
    ({"version": "1\r\nx-injected: yes"}, "version: '1\\r\\nx-injected: yes' cannot be sent in a response header"),
    ({"version": "2024\u20ac"}, "cannot be sent in a response header"),
    ({"name": "s" * 201}, "name: String should have at most 200 characters"),
])
def test_a_serving_spec_refuses_a_name_or_version_no_answer_could_carry(fields: dict[str, Any], message: str) -> None:
    # Every answer carries the version in a header: a control character closed each connection unanswered, and a
    # character beyond Latin-1 made each request a 500.
    with pytest.raises(SpecError) as err:
        load_serve_spec({"name": "s", "graph": {"name": "m", "model_uri": "models:/iris/1"}, **fields})
    assert message in str(err.value)


@pytest.mark.parametrize(("doc", "message"), [
    ({"name": "p" * 201, "tasks": [{"name": "a", "step": {"module": "m", "qualname": "f"}}]}, "name: String should"),
    ({"name": "p", "tasks": [{"name": "a" * 201, "step": {"module": "m", "qualname": "f"}}]}, "tasks.0.name: String"),
])
def test_pipeline_and_task_names_past_their_db_column_are_refused(doc: dict[str, Any], message: str) -> None:
    # Accepted before, they failed the run's first write on PostgreSQL (a 200-character column).
    with pytest.raises(SpecError) as err:
        validate(PipelineSpec, doc, "pipeline spec")
    assert message in str(err.value)
    assert validate(PipelineSpec, {**doc, "name": "p" * 200, "tasks": [{"name": "a" * 200, "step": {
        "module": "m", "qualname": "f"}}]}, "pipeline spec").name == "p" * 200
