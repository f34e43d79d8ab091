"""The graph runtime: load a `ServeSpec`'s nodes and run requests through them. Plain Python, no HTTP.

Node semantics follow Seldon Core's inference graphs:

- MODEL: `predict(X)`; a child, if any, gets the prediction.
- TRANSFORMER: `transform_input(X)`, then its child.
- OUTPUT_TRANSFORMER: its child first (if any), then `transform_output(Y)` on the answer.
- COMBINER: every child gets X; `aggregate([Y0, Y1, ...])` makes one answer.
- ROUTER: `route(X)` returns a child's index: only that child answers; -1 sends X to every child and the
  first child's answer is returned (the others run for their side effects, e.g. to learn).

X is the request's only input as a numpy array, or a dict of arrays (a pandas frame for a registered model
whose signature lists columns) when there are several. Any node may define
`send_feedback(features, reward, truth, routing)`, called for nodes on the request's path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skyloop.config import Settings
from skyloop.errors import InputRejected, NodeError, SignatureMismatch, SpecError
from skyloop.registry.package import Signature, TensorSpec
from skyloop.serving.protocol import DTYPES
from skyloop.serving.spec import METHODS, GraphNode, NodeType, ServeSpec

__all__ = ["Graph", "Node", "Observe", "load_graph"]

Observe = Callable[[str, float], None]
"""Called with a node's name and the seconds its own method took."""


@dataclass
class Node:
    """A loaded graph node."""

    spec: GraphNode
    obj: Any
    method: Callable[..., Any]
    children: list[Node] = field(default_factory=list)
    model_version: str | None = None
    """`name/version` of a registered model."""

    @property
    def name(self) -> str:
        """The node's name in the graph."""
        return self.spec.name


def _user_class(ref: str, base: Path | None, node: str) -> type:
    from skyloop.execution.loading import resolve
    from skyloop.spec.pipeline import StepRef

    module_name, sep, qualname = ref.rpartition(":")
    if not sep or not module_name or not qualname:
        raise SpecError(f"node {node!r}: implementation {ref!r} must look like FILE.py:Class or package.module:Class")
    if module_name.endswith(".py") and base is not None and not Path(module_name).is_absolute():
        module_name = str(base / module_name)
    try:
        obj = resolve(StepRef(module=module_name, qualname=qualname))
    except SpecError as exc:
        raise SpecError(f"node {node!r}: {exc}") from None
    if not isinstance(obj, type):
        raise SpecError(f"node {node!r}: {ref!r} is not a class")
    return obj


def _load_node(spec: GraphNode, base: Path | None, settings: Settings | None) -> Node:
    method_name = METHODS[spec.type]
    version: str | None = None
    if spec.model_uri is not None:
        from skyloop.registry.api import load_model

        uri: str | Path = spec.model_uri
        if not spec.model_uri.startswith("models:/") and base is not None and not Path(spec.model_uri).is_absolute():
            uri = base / spec.model_uri
        loaded = load_model(uri, settings)
        obj: Any = loaded
        version = loaded.uri.removeprefix("models:/") if loaded.uri else None
    else:
        assert spec.implementation is not None  # the spec's validator guarantees one of the two
        cls = _user_class(spec.implementation, base, spec.name)
        try:
            obj = cls(**spec.parameters)
            if callable(getattr(obj, "load", None)):
                obj.load()
        except Exception as exc:
            raise SpecError(f"node {spec.name!r}: {spec.implementation} failed to start: "
                            f"{type(exc).__name__}: {exc}") from exc
    method = getattr(obj, method_name, None)
    if not callable(method):
        article = "an" if method_name[0] in "aeiou" else "a"
        raise SpecError(f"node {spec.name!r}: a {spec.type} needs {article} {method_name}() method, "
                        f"{type(obj).__name__} has none")
    children = [_load_node(child, base, settings) for child in spec.children]
    return Node(spec, obj, method, children, version)


@dataclass
class Trace:
    """What one request did in the graph: the nodes it visited and each router's choice."""

    visited: list[str] = field(default_factory=list)
    routing: dict[str, int] = field(default_factory=dict)


class Graph:
    """A loaded inference graph."""

    def __init__(self, root: Node, name: str, version: str, observe: Observe | None = None) -> None:
        self.root = root
        self.name = name
        self.version = version
        self.observe = observe
        self.nodes = {n.name: n for n in _walk(root)}
        self.signature: Signature | None = None
        model = root.obj if root.spec.type is NodeType.MODEL and root.spec.model_uri else None
        if model is not None:
            self.signature = model.signature
            if len(self.nodes) > 1:  # the graph answers what its last node says, not what the root model says
                self.signature = self.signature.model_copy(update={"outputs": []}) if self.signature else None

    @property
    def batchable(self) -> bool:
        """Whether every declared input has a leading batch dimension, and no ROUTER would route a batch as one.

        A router chooses one child for all it is given: in a batch, one request's rows would be answered by the
        child chosen for the others (`batching: {enabled: true}` batches such a graph all the same).
        """
        return bool(self.signature and self.signature.inputs
                    and all(s.shape and s.shape[0] == -1 for s in self.signature.inputs)
                    and all(n.spec.type is not NodeType.ROUTER for n in self.nodes.values()))

    def _call(self, node: Node, args: tuple[Any, ...]) -> Any:
        start = time.perf_counter()
        try:
            return node.method(*args)
        except Exception as exc:
            if isinstance(exc, ValueError) and node.spec.type is NodeType.MODEL and node.spec.model_uri:
                # A registered model (not the user's own code) refusing values that fit its signature,
                # as scikit-learn does NaN or infinity: the request's fault, not the server's.
                raise InputRejected(f"model {node.name!r} refused the input: {exc}") from exc
            raise NodeError(node.name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.observe is not None:
                self.observe(node.name, time.perf_counter() - start)

    def _run(self, node: Node, x: Any, trace: Trace) -> Any:
        trace.visited.append(node.name)
        kind = node.spec.type
        if kind is NodeType.MODEL or kind is NodeType.TRANSFORMER:
            y = self._call(node, (_model_input(node, x),))
            return self._run(node.children[0], y, trace) if node.children else y
        if kind is NodeType.OUTPUT_TRANSFORMER:
            y = self._run(node.children[0], x, trace) if node.children else x
            return self._call(node, (y,))
        if kind is NodeType.COMBINER:
            return self._call(node, ([self._run(child, x, trace) for child in node.children],))
        choice = self._call(node, (x,))
        try:
            index = int(choice)
        except (TypeError, ValueError):
            raise NodeError(node.name, f"route() must return a child index or -1, returned {choice!r}") from None
        trace.routing[node.name] = index
        if index == -1:
            answers = [self._run(child, x, trace) for child in node.children]  # every child runs
            return answers[0]
        if not 0 <= index < len(node.children):
            raise NodeError(node.name, f"route() returned {index}; the node has {len(node.children)} children "
                                       f"(0..{len(node.children) - 1}, or -1 for all)")
        return self._run(node.children[index], x, trace)

    def features(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """The X the root node gets for the request's tensors (already passed through `check`)."""
        return _features(self.signature, inputs)

    def check(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """The request's tensors as the signature types them; refused with `SignatureMismatch` if they do not fit."""
        if self.signature is not None and self.signature.inputs:
            return check_inputs(inputs, self.signature.inputs)
        return dict(inputs)

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> tuple[dict[str, np.ndarray[Any, Any]], Trace]:
        """Run one (possibly batched) request through the graph: named output arrays, and the trace."""
        trace = Trace()
        result = self._run(self.root, self.features(inputs), trace)
        return self.outputs(result), trace

    def outputs(self, result: Any) -> dict[str, np.ndarray[Any, Any]]:
        """Name the graph's answer: a dict or frame keeps its names, an array takes the signature's or `predict`."""
        names = [s.name for s in self.signature.outputs] if self.signature else []
        if isinstance(result, Mapping):
            return {str(k): np.asarray(v) for k, v in result.items()}
        if hasattr(result, "columns") and hasattr(result, "to_numpy"):
            return {str(c): np.asarray(result[c].to_numpy()) for c in result.columns}
        if isinstance(result, tuple) and len(names) == len(result) > 1:
            return {n: np.asarray(v) for n, v in zip(names, result, strict=True)}
        return {names[0] if len(names) == 1 else "predict": np.asarray(result)}

    def send_feedback(self, features: Any, reward: float | None, truth: Any, trace: Trace | None) -> int:
        """Tell the nodes on the request's path (all nodes when the path is unknown); returns how many listened."""
        told = 0
        names = trace.visited if trace is not None else list(self.nodes)
        for name in names:
            node = self.nodes[name]
            hook = getattr(node.obj, "send_feedback", None)
            if not callable(hook):
                continue
            routing = trace.routing.get(name) if trace is not None else None
            try:
                hook(features=features, reward=reward, truth=truth, routing=routing)
            except Exception as exc:
                raise NodeError(name, f"send_feedback: {type(exc).__name__}: {exc}") from exc
            told += 1
        return told


def _features(signature: Signature | None, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Any:
    """The X a model of `signature` takes for these named tensors (already passed through `check_inputs`):
    a frame for the columns of a table, the one array of a single input, else the mapping."""
    specs = signature.inputs if signature else []
    if specs:
        if _columns(specs) or (signature is not None and signature.frame):
            try:
                import pandas as pd
            except ImportError:
                return dict(inputs)
            return pd.DataFrame({s.name: inputs[s.name] for s in specs})
        if len(specs) == 1:
            return inputs[specs[0].name]
        return {s.name: inputs[s.name] for s in specs}
    return next(iter(inputs.values())) if len(inputs) == 1 else dict(inputs)


def _model_input(node: Node, x: Any) -> Any:
    """What a registered model below other nodes gets: a mapping of named values (what the root gets for the
    request's tensors, or what a transformer made of them) becomes the frame or array its signature takes,
    as the root's input does. Anything else goes to the model as it is."""
    signature: Signature | None = getattr(node.obj, "signature", None) if node.spec.model_uri else None
    if not isinstance(x, Mapping) or signature is None or not signature.inputs:
        return x
    try:
        arrays = {str(k): np.asarray(v) for k, v in x.items()}
    except (TypeError, ValueError) as exc:  # ragged lists, say: what the node before it made
        raise NodeError(node.name, f"its input is not a mapping of arrays: {type(exc).__name__}: {exc}") from exc
    try:
        return _features(signature, check_inputs(arrays, signature.inputs))
    except SignatureMismatch as exc:
        raise SignatureMismatch(f"model node {node.name!r}: {exc}") from None


def _walk(node: Node) -> list[Node]:
    return [node, *(n for child in node.children for n in _walk(child))]


def _columns(specs: list[TensorSpec]) -> bool:
    """Whether a signature lists the columns of one table (several 1-D inputs: the model takes a frame)."""
    return len(specs) > 1 and all(len(s.shape) == 1 for s in specs)


def check_inputs(inputs: Mapping[str, np.ndarray[Any, Any]],
                 specs: list[TensorSpec]) -> dict[str, np.ndarray[Any, Any]]:
    """The inputs as the signature types them (widened where that loses nothing, e.g. FP32 -> FP64).

    Tensors that do not fit are refused, naming the input and what it should be; columns of one table
    (see `_columns`) must have the same length.
    """
    checked: dict[str, np.ndarray[Any, Any]] = {}
    expected = {s.name: s for s in specs}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise SignatureMismatch(f"unknown input {unknown[0]!r}; the model takes {', '.join(expected)}")
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            raise SignatureMismatch(f"missing input {spec.name!r} ({spec.datatype} {spec.shape})")
        want = DTYPES[spec.datatype]
        if array.dtype != want and not (want.kind == "O" and array.dtype.kind == "O"):
            if array.dtype.kind == "O" or not np.can_cast(array.dtype, want, "safe"):
                actual = "BYTES" if array.dtype.kind == "O" else array.dtype.name
                raise SignatureMismatch(f"input {spec.name!r} must be {spec.datatype}, got {actual}")
            array = array.astype(want)
        if len(array.shape) != len(spec.shape) or any(
                w != -1 and w != a for w, a in zip(spec.shape, array.shape, strict=True)):
            raise SignatureMismatch(f"input {spec.name!r} must have shape {spec.shape} (-1: any), "
                                    f"got {list(array.shape)}")
        checked[spec.name] = array
    if _columns(specs):
        lengths = {name: len(array) for name, array in checked.items()}
        first = specs[0].name
        for spec in specs[1:]:
            if lengths[spec.name] != lengths[first]:
                raise SignatureMismatch(f"inputs {first!r} and {spec.name!r} are columns of one table and need the "
                                        f"same length; {first!r} has {lengths[first]} values, {spec.name!r} has "
                                        f"{lengths[spec.name]}")
    return checked


def load_graph(spec: ServeSpec, settings: Settings | None = None, observe: Observe | None = None) -> Graph:
    """Load every node of `spec` (models verified, user classes constructed and `load()`ed)."""
    root = _load_node(spec.graph, spec.base_dir, settings)
    versions = [n.model_version for n in _walk(root) if n.model_version]
    version = spec.version or (versions[0].rpartition("/")[2] if len(versions) == 1 else "1")
    return Graph(root, spec.name, version, observe)
