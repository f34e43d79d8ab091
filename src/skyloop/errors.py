"""The one error tree of skyloop.

Domain errors carry no HTTP status and no exit code; the edges (CLI, REST) map them::

    SkyloopError
    ├── SpecError          invalid pipeline/deployment spec or parameters (names the field and the fix)
    │   └── CycleError     a DAG with a cycle (names the cycle)
    ├── NotFound           a run, step, artifact or model that does not exist
    ├── Conflict           the action clashes with current state (e.g. a run owned by a live process)
    ├── StoreError         the metadata DB or artifact store failed (a foreign error translated)
    │   └── IntegrityError an artifact whose bytes no longer match its digest
    ├── BackendError       an execution backend could not start or lost its workers
    ├── StepFailed         a step failed after its retries (carries the step and the reason)
    ├── ModelLoadError     a model could not be loaded
    ├── InvalidRequest     an inference request that breaks the protocol (bad JSON, shape vs data)
    │   ├── PayloadTooLarge  a request body over the configured limit
    │   ├── SignatureMismatch  a well-formed request that does not fit the model's signature
    │   └── InputRejected  a registered model, or a graph node raising it, refused the request's values
    ├── NotReady           the model or server is still loading (or failed to)
    ├── NodeError          a graph node raised or answered what it may not (carries the node and the message)
    ├── OutputError        a model answered what the protocol cannot carry (NaN in JSON, a complex dtype)
    └── AuthError          authentication or authorisation failed
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BackendError",
    "Conflict",
    "CycleError",
    "InputRejected",
    "IntegrityError",
    "InvalidRequest",
    "ModelLoadError",
    "NodeError",
    "NotFound",
    "NotReady",
    "OutputError",
    "PayloadTooLarge",
    "SignatureMismatch",
    "SkyloopError",
    "SpecError",
    "StepFailed",
    "StoreError",
]


class SkyloopError(Exception):
    """Root of every error skyloop raises on purpose."""


class SpecError(SkyloopError):
    """A spec, a parameter or a pipeline definition is invalid."""


class CycleError(SpecError):
    """The pipeline graph has a cycle."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("pipeline has a cycle: " + " -> ".join([*cycle, cycle[0]]))


class NotFound(SkyloopError):
    """The named object does not exist."""


class Conflict(SkyloopError):
    """The request clashes with the current state."""


class StoreError(SkyloopError):
    """The metadata DB or the artifact store failed."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded digest."""


class BackendError(SkyloopError):
    """An execution backend failed."""


class StepFailed(SkyloopError):
    """A step failed for good (after its retries)."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"step {step!r} failed: {reason}")


class ModelLoadError(SkyloopError):
    """A model could not be loaded."""


class InvalidRequest(SkyloopError):
    """An inference request that does not follow the Open Inference Protocol."""


class PayloadTooLarge(InvalidRequest):
    """A request body over the configured limit."""


class SignatureMismatch(InvalidRequest):
    """A well-formed request whose tensors do not fit the model's signature."""


class InputRejected(InvalidRequest):
    """The request's values were refused: by a registered model (e.g. NaN it cannot take), or by a graph node.

    A user's graph node raises it to refuse a bad request (`raise InputRejected("need 4 features")`): the
    client gets a 422 "node 'NAME' refused the input: need 4 features", where any other exception is a
    server error (500) that counts against the predictor.
    """


class NotReady(SkyloopError):
    """The model or the server cannot answer yet."""


class NodeError(SkyloopError):
    """A graph node raised (the message is the user's own), or answered what the graph cannot use."""

    def __init__(self, node: str, message: str) -> None:
        self.node = node
        super().__init__(f"node {node!r} failed: {message}")


class OutputError(SkyloopError):
    """A served model answered what the V2 protocol cannot carry: the model's fault, a server error."""


class AuthError(SkyloopError):
    """Authentication or authorisation failed."""
