"""What `skyloop serve` serves: an inference graph of Seldon-style nodes, declared in YAML.

    name: iris-ensemble
    graph:
      name: scale
      type: TRANSFORMER
      implementation: nodes.py:Scaler      # a class; `parameters` go to its constructor
      children:
        - name: vote
          type: COMBINER
          implementation: nodes.py:Vote
          children:
            - {name: logreg, type: MODEL, model_uri: "models:/iris@champion"}
            - {name: tree, type: MODEL, model_uri: "models:/iris-tree/2"}
    batching: {max_batch_size: 32, max_batch_time: 2ms}
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyloop.errors import SpecError
from skyloop.spec.files import load_spec_file

__all__ = ["MAX_VERSION", "METHODS", "BatchingSpec", "GraphNode", "NodeType", "ServeSpec", "check_model_uri",
           "load_serve_spec", "parse_duration"]


class NodeType(StrEnum):
    """Seldon's node types."""

    MODEL = "MODEL"
    TRANSFORMER = "TRANSFORMER"
    OUTPUT_TRANSFORMER = "OUTPUT_TRANSFORMER"
    COMBINER = "COMBINER"
    ROUTER = "ROUTER"


METHODS: dict[NodeType, str] = {
    NodeType.MODEL: "predict",
    NodeType.TRANSFORMER: "transform_input",
    NodeType.OUTPUT_TRANSFORMER: "transform_output",
    NodeType.COMBINER: "aggregate",
    NodeType.ROUTER: "route",
}
"""The method a user class needs for each node type."""

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: float | str, field: str | None = None) -> float:
    """Seconds from a number (seconds) or a string like `2ms`, `1.5s`, `5m`, `1h`; errors start with `field: `
    when given (a field validator's errors are already placed by pydantic)."""
    where = f"{field}: " if field else ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{where}{value!r} is not a duration; write e.g. 2ms, 1.5s, 5m or 1h")
        seconds = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    if not math.isfinite(seconds):  # YAML's .nan and .inf: every comparison with NaN is False, so check first
        raise ValueError(f"{where}must be a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise ValueError(f"{where}a duration cannot be negative")
    return seconds


class GraphNode(BaseModel):
    """One node of an inference graph."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    type: NodeType = NodeType.MODEL
    model_uri: str | None = None
    """A registered model (`models:/name@alias`, `models:/name/3`) or a model directory; MODEL nodes only."""
    implementation: str | None = None
    """A user class, `package.module:Class` or `file.py:Class` (relative to the spec file)."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the class's constructor."""
    children: list[GraphNode] = Field(default_factory=list)

    @field_validator("model_uri")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_model_uri(value)

    @field_validator("implementation")
    @classmethod
    def _implementation(cls, value: str | None) -> str | None:
        if value is not None:
            module, sep, qualname = value.rpartition(":")
            if not sep or not module.strip() or not qualname.strip():
                raise ValueError(f"{value!r} must look like FILE.py:Class or package.module:Class")
        return value

    @model_validator(mode="after")
    def _check(self) -> GraphNode:
        where = f"node {self.name!r}"
        if self.model_uri and self.implementation:
            raise ValueError(f"{where}: give either model_uri or implementation, not both")
        if self.model_uri and self.type is not NodeType.MODEL:
            raise ValueError(f"{where}: model_uri is for MODEL nodes; a {self.type} needs an implementation class")
        if not self.model_uri and not self.implementation:
            fix = "model_uri: models:/NAME@ALIAS or implementation: FILE.py:Class" if self.type is NodeType.MODEL \
                else f"implementation: FILE.py:Class (a class with {METHODS[self.type]}())"
            raise ValueError(f"{where}: says nothing to run; add {fix}")
        if self.model_uri and self.parameters:
            raise ValueError(f"{where}: parameters are for implementation classes, not for model_uri")
        many = len(self.children) > 1
        if many and self.type not in (NodeType.COMBINER, NodeType.ROUTER):
            raise ValueError(f"{where}: a {self.type} node passes its result to one child, it has "
                             f"{len(self.children)}; put a COMBINER or ROUTER above them to fan out")
        if self.type in (NodeType.COMBINER, NodeType.ROUTER) and not self.children:
            raise ValueError(f"{where}: a {self.type} node needs children")
        return self

    def walk(self) -> list[GraphNode]:
        """This node and all below it, depth first."""
        return [self, *(n for child in self.children for n in child.walk())]

    def check_unique(self) -> None:
        """A ValueError when two nodes of the graph share a name (metrics, feedback and routing go by name)."""
        names = [n.name for n in self.walk()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"graph: node names must be unique; {', '.join(map(repr, dupes))} "
                             f"{'appears' if len(dupes) == 1 else 'appear'} more than once")


MAX_VERSION = 2**63 - 1
"""The largest version number the metadata DB can hold (a signed 64-bit integer)."""


def check_model_uri(value: str) -> str:
    """`value` if it is a usable `model_uri` (a well-formed `models:/` reference, or a model folder), else a
    ValueError saying how to write one."""
    if not value.strip():
        raise ValueError("is empty; give a registered model (models:/NAME@ALIAS) or a model folder")
    if value.strip().startswith("models:/"):
        from skyloop.registry.uri import parse_model_ref

        try:
            ref = parse_model_ref(value)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        if ref.version is not None and ref.version > MAX_VERSION:
            raise ValueError(f"{value!r}: version {ref.version} is past any version a model can have; versions "
                             "count 1, 2, 3, ...")
    return value


class BatchingSpec(BaseModel):
    """Adaptive batching: requests queued while the model is busy are predicted together."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool | None = None
    """None: on when the graph's input signature has a batch dimension (a leading -1)."""
    max_batch_size: int = Field(default=64, ge=1)
    """Rows per batch at most."""
    max_batch_time: float = 0.002
    """Seconds the first request of a batch waits for company at most (`2ms`, `0.01`)."""

    @field_validator("max_batch_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class ServeSpec(BaseModel):
    """A served model: its name, its graph and how it batches."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200)  # the DB's column for it holds 200
    version: str | None = None
    """The version the server reports; default: the version of the graph's single registered model, else "1"."""
    graph: GraphNode
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    base_dir: Path | None = Field(default=None, exclude=True)
    """Where `file.py:Class` implementations and model directories are looked up (the spec file's folder)."""

    @field_validator("version")
    @classmethod
    def _path_safe(cls, value: str | None) -> str | None:
        if value is not None and ("/" in value or not value.strip()):
            raise ValueError(f"{value!r} cannot be named in a /v2/models/NAME/versions/VERSION path; "
                             "give a version without '/' (e.g. 1 or 2024-06)")
        # Every answer carries it in its `skyloop-model-version` header: a control character or one beyond
        # Latin-1 made every request fail (a closed connection, or a 500).
        if value is not None and not (value.isascii() and value.isprintable()):
            raise ValueError(f"{value!r} cannot be sent in a response header; give a version of printable ASCII "
                             "characters (e.g. 1 or 2024-06)")
        return value

    @model_validator(mode="after")
    def _unique(self) -> ServeSpec:
        self.graph.check_unique()
        return self


def load_serve_spec(source: str | Path | dict[str, Any]) -> ServeSpec:
    """Read and validate a serving spec from a YAML file (or an already parsed mapping)."""
    return load_spec_file(source, ServeSpec, "serving spec", "name and graph")
