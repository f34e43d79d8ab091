"""The model registry: model directories with `model.yaml`, flavors, versions, tags, aliases, URIs.

    from skyloop.registry import log_model, load_model

    log_model(clf, "iris", input_example=X[:5], metrics={"accuracy": 0.97})
    model = load_model("models:/iris@champion")
    model.predict(X)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyloop._lazy import lazy_exports as _lazy_exports
from skyloop.registry.context import StepContext, current_step, step_context

if TYPE_CHECKING:
    from skyloop.registry.api import LoadedModel, load_model, log_model, materialize
    from skyloop.registry.flavors import FLAVORS, Flavor, Predictor, detect_flavor, get_flavor
    from skyloop.registry.package import ModelManifest, Producer, Signature, TensorSpec
    from skyloop.registry.registry import ModelInfo, ModelVersionInfo
    from skyloop.registry.signature import infer_signature
    from skyloop.registry.uri import ModelRef, parse_model_ref

# Worker processes import `context` for every step; the rest needs SQLAlchemy, so it loads on first use.
_LAZY = {
    **dict.fromkeys(["LoadedModel", "load_model", "log_model", "materialize"], "skyloop.registry.api"),
    **dict.fromkeys(["FLAVORS", "Flavor", "Predictor", "detect_flavor", "get_flavor"], "skyloop.registry.flavors"),
    **dict.fromkeys(["ModelManifest", "Producer", "Signature", "TensorSpec"], "skyloop.registry.package"),
    **dict.fromkeys(["ModelInfo", "ModelVersionInfo"], "skyloop.registry.registry"),
    "infer_signature": "skyloop.registry.signature",
    **dict.fromkeys(["ModelRef", "parse_model_ref"], "skyloop.registry.uri"),
}


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "FLAVORS",
    "Flavor",
    "LoadedModel",
    "ModelInfo",
    "ModelManifest",
    "ModelRef",
    "ModelVersionInfo",
    "Predictor",
    "Producer",
    "Signature",
    "StepContext",
    "TensorSpec",
    "current_step",
    "detect_flavor",
    "get_flavor",
    "infer_signature",
    "load_model",
    "log_model",
    "materialize",
    "parse_model_ref",
    "step_context",
]
