"""The graph runtime: load a `ServeSpec`'s nodes and run requests through them. Plain Python, no HTTP.

Node semantics follow Seldon Core's inference graphs:

- MODEL: `predict(X)`; a child, if any, gets the prediction.
- TRANSFORMER: `transform_input(X)`, then its child.
- OUTPUT_TRANSFORMER: its child first (if any), then `transform_output(Y)` on the answer.
- COMBINER: every child gets X; `aggregate([Y0, Y1, ...])` makes one answer.
- ROUTER: `route(X)` returns a child's index: only that child answers; -1 sends X to every child and the
  first child's answer is returned (the others run for their side effects, e.g. to learn).

X is the request's only input as a numpy array, or a dict of arrays (a pandas frame for a registered model
whose signature lists columns) when there are several. A registered model that gets the request's own tensors (at
the root, passed on by ROUTER, COMBINER and OUTPUT_TRANSFORMER nodes, or by a TRANSFORMER that returns the array it
was given) gets them by name, checked against its signature: what does not fit, or what it refuses, is the
client's fault (4xx). What another node made for it and does not fit, or that it refuses, is the graph's fault: a
`NodeError` naming both nodes (5xx). A user node refuses a request by raising `InputRejected` (422, "node 'X'
refused the input: ..."); any other exception is a `NodeError` (500). Any node may define
`send_feedback(features, reward, truth, routing)`, called for nodes on the request's path.
"""

from __future__ import annotations

import reprlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skyloop.config import Settings
from skyloop.errors import InputRejected, InvalidRequest, NodeError, SignatureMismatch, SpecError
from skyloop.registry.package import Signature
from skyloop.serving.signature import check_inputs, model_features
from skyloop.serving.spec import METHODS, GraphNode, NodeType, ServeSpec

__all__ = ["Graph", "Node", "Observe", "load_graph", "named_answer"]

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


@dataclass(frozen=True)
class _Given:
    """What a node is given: X, and where X comes from."""

    x: Any
    made_by: str | None
    """The node whose answer X is; None while X is the request's own tensors."""
    tensors: Mapping[str, np.ndarray[Any, Any]] | None
    """The request's named tensors while X is them (None once a node has made X)."""


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

    def _call(self, node: Node, args: tuple[Any, ...], given: _Given) -> Any:
        start = time.perf_counter()
        try:
            return node.method(*args)
        except Exception as exc:
            registered = node.spec.type is NodeType.MODEL and node.spec.model_uri is not None
            if isinstance(exc, InvalidRequest) and not registered:  # the node's own verdict on the request
                raise InputRejected(f"node {node.name!r} refused the input: {exc}") from exc
            if isinstance(exc, ValueError) and registered:
                # A registered model (not the user's own code) refusing values that fit its signature, as
                # scikit-learn does NaN or infinity: the request's fault when they are the request's own...
                if given.made_by is None:
                    raise InputRejected(f"model {node.name!r} refused the input: {exc}") from exc
                # ...and the graph's when another node made them: the client cannot fix that.
                raise NodeError(node.name, f"the model refused what node {given.made_by!r} gave it (fix that node "
                                           f"or the model): {type(exc).__name__}: {exc}") from exc
            raise NodeError(node.name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.observe is not None:
                self.observe(node.name, time.perf_counter() - start)

    def _run(self, node: Node, given: _Given, trace: Trace) -> tuple[Any, str]:
        """The node's answer to `given`, and the name of the node whose answer it is."""
        trace.visited.append(node.name)
        kind = node.spec.type
        if kind is NodeType.MODEL or kind is NodeType.TRANSFORMER:
            y = self._call(node, (self._model_input(node, given),), given)
            if not node.children:
                return y, node.name
            if kind is NodeType.TRANSFORMER and y is given.x and not isinstance(y, Mapping):
                # A transformer that passes X on as it is (one that only checks, waits or logs) made nothing:
                # what the model below refuses is still the request's. (A mapping may have been changed in place.)
                return self._run(node.children[0], given, trace)
            return self._run(node.children[0], _Given(y, node.name, None), trace)
        if kind is NodeType.OUTPUT_TRANSFORMER:
            y = self._run(node.children[0], given, trace)[0] if node.children else given.x
            return self._call(node, (y,), given), node.name
        if kind is NodeType.COMBINER:
            answers = [self._run(child, given, trace)[0] for child in node.children]
            return self._call(node, (answers,), given), node.name
        choice = self._call(node, (given.x,), given)
        # bool is an int, and a float or a string would be truncated or parsed: a bandit's probability, or a
        # "use the challenger" flag, would silently pick a child.
        if isinstance(choice, bool | np.bool_) or not isinstance(choice, int | np.integer):
            raise NodeError(node.name, f"route() must return a child index (an int) or -1, returned {choice!r} "
                                       f"({type(choice).__name__})")
        index = int(choice)
        trace.routing[node.name] = index
        if index == -1:
            ran = [self._run(child, given, trace) for child in node.children]
            return ran[0]  # every child ran (for its side effects), the first answers
        if not 0 <= index < len(node.children):
            raise NodeError(node.name, f"route() returned {index}; the node has {len(node.children)} children "
                                       f"(0..{len(node.children) - 1}, or -1 for all)")
        return self._run(node.children[index], given, trace)

    def _model_input(self, node: Node, given: _Given) -> Any:
        """What a registered model below other nodes gets: the request's tensors (passed on unchanged) or a
        mapping of named values another node made, as the frame or array its signature takes, as the root's
        input is. Anything else goes to the model as it is."""
        signature: Signature | None = getattr(node.obj, "signature", None) if node.spec.model_uri else None
        if node is self.root or signature is None or not signature.inputs:  # the root's were checked on the way in
            return given.x
        if given.tensors is not None:
            try:
                return model_features(signature, check_inputs(given.tensors, signature.inputs))
            except SignatureMismatch as exc:
                raise SignatureMismatch(f"model node {node.name!r}: {exc}") from None
        if not isinstance(given.x, Mapping):
            return given.x
        try:
            arrays = {str(k): np.asarray(v) for k, v in given.x.items()}
        except (TypeError, ValueError) as exc:  # ragged lists, say: what the node before it made
            raise NodeError(node.name, f"what node {given.made_by!r} gave it is not a mapping of arrays: "
                                       f"{type(exc).__name__}: {exc}") from exc
        try:
            return model_features(signature, check_inputs(arrays, signature.inputs))
        except SignatureMismatch as exc:
            raise NodeError(node.name, f"what node {given.made_by!r} gave it does not fit the model's signature "
                                       f"(fix that node): {exc}") from None

    def features(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """The X the root node gets for the request's tensors (already passed through `check`)."""
        return model_features(self.signature, inputs)

    def check(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """The request's tensors as the signature types them; refused with `SignatureMismatch` if they do not fit."""
        if self.signature is not None and self.signature.inputs:
            return check_inputs(inputs, self.signature.inputs)
        return dict(inputs)

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> tuple[dict[str, np.ndarray[Any, Any]], Trace]:
        """Run one (possibly batched) request through the graph: named output arrays, and the trace."""
        trace = Trace()
        result, answered_by = self._run(self.root, _Given(self.features(inputs), None, inputs), trace)
        return self.outputs(result, answered_by), trace

    def outputs(self, result: Any, node: str | None = None) -> dict[str, np.ndarray[Any, Any]]:
        """Name the graph's answer: a dict or frame keeps its names, an array takes the signature's or `predict`.

        An answer that is no array the protocol carries (ragged rows, None, dicts or other objects) is a
        `NodeError` naming `node`, the node that answered (the root when not given).
        """
        return named_answer(result, self.signature, node or self.root.name)

    def send_feedback(self, features: Any, reward: float | None, truth: Any,
                      trace: Trace | None) -> tuple[int, dict[str, str]]:
        """Tell the nodes on the request's path (all nodes when the path is unknown).

        Every node is told, also when one before it fails: returns how many were told, and the failures
        (node name -> the error), so that one broken hook neither hides the feedback from the others nor
        makes the client send again what is already stored.
        """
        told = 0
        failed: dict[str, str] = {}
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
                failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            told += 1
        return told, failed


def _walk(node: Node) -> list[Node]:
    return [node, *(n for child in node.children for n in _walk(child))]


_MISSING = object()


def named_answer(result: Any, signature: Signature | None, node: str) -> dict[str, np.ndarray[Any, Any]]:
    """A model's answer as the server names it (see `Graph.outputs`); `node` is who answered, for the errors."""
    names = [s.name for s in signature.outputs] if signature else []
    items: list[tuple[str, Any]]
    if isinstance(result, Mapping):
        items = [(str(k), v) for k, v in result.items()]
    elif hasattr(result, "columns") and hasattr(result, "to_numpy"):
        items = [(str(c), result[c].to_numpy()) for c in result.columns]
    elif isinstance(result, tuple) and len(names) == len(result) > 1:
        items = list(zip(names, result, strict=True))
    else:
        items = [(names[0] if len(names) == 1 else "predict", result)]
    return {name: _answer_array(node, name, value) for name, value in items}


def _answer_array(node: str, output: str, value: Any) -> np.ndarray[Any, Any]:
    """One output of the graph's answer as an array the protocol can carry; `NodeError` naming the node if not."""
    fix = "return an array (or a list of equal-length rows) of numbers, booleans or strings, or a dict of them"
    if value is None:
        raise NodeError(node, f"returned None for output {output!r}; {fix}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged rows, or a tuple of arrays of different lengths
        raise NodeError(node, f"returned output {output!r} that is not a rectangular array "
                              f"({type(exc).__name__}: {exc}); {fix}") from None
    if array.dtype.kind == "O":  # BYTES: anything but text would go out as its repr
        bad = next((v for v in array.reshape(-1) if not isinstance(v, str | bytes)), _MISSING)
        if bad is not _MISSING:
            raise NodeError(node, f"returned output {output!r} holding {type(bad).__name__} values "
                                  f"({reprlib.repr(bad)}), which no V2 datatype carries; {fix}")
    return array


def load_graph(spec: ServeSpec, settings: Settings | None = None, observe: Observe | None = None) -> Graph:
    """Load every node of `spec` (models verified, user classes constructed and `load()`ed)."""
    root = _load_node(spec.graph, spec.base_dir, settings)
    versions = [n.model_version for n in _walk(root) if n.model_version]
    version = spec.version or (versions[0].rpartition("/")[2] if len(versions) == 1 else "1")
    return Graph(root, spec.name, version, observe)
