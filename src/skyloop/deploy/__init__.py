"""Deployments: predictors behind a gateway that splits, mirrors and learns traffic; canary, blue-green and
rolling rollouts judged on the model's own quality; the closed loop that retrains and rolls out by itself.

    from skyloop.deploy import apply_deployment
    info = apply_deployment("iris.yaml", settings)      # returns once a controller has applied it
    info.state["gateway"]                               # http://127.0.0.1:PORT (/v2/models/NAME/infer)

`spec` is the YAML contract, `controller` the process that makes it true (with `gateway`, `replicas`,
`ray_replicas`, `rollout`, `analysis`, `traffic` and `loop` under it), `api` what commands call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyloop._lazy import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from skyloop.deploy.api import apply_deployment, delete_deployment, send_command
    from skyloop.deploy.spec import DeploymentSpec, load_deployment_spec

_LAZY = {
    **dict.fromkeys(["apply_deployment", "delete_deployment", "send_command"], "skyloop.deploy.api"),
    **dict.fromkeys(["DeploymentSpec", "load_deployment_spec"], "skyloop.deploy.spec"),
}

__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())

__all__ = ["DeploymentSpec", "apply_deployment", "delete_deployment", "load_deployment_spec", "send_command"]
