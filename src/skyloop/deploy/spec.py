"""A deployment, declared in YAML: predictors behind one gateway, a router, a rollout and its analysis.

    name: iris
    predictors:
      - {name: stable, model_uri: "models:/iris@champion", replicas: 2, traffic: 100}
      - {name: canary, model_uri: "models:/iris@challenger", replicas: 1, traffic: 0}
      - {name: mirror, model_uri: "models:/iris/1", shadow: 0.2}      # sees 20% of traffic, answers nobody
    rollout:
      strategy: canary                  # canary | blue_green | rolling
      target: canary                    # the predictor being rolled out
      steps: [{weight: 10, duration: 30s}, {pause: {}}, {weight: 50, duration: 1m}]
      promote_alias: champion           # on success the alias moves to the target's model version
    analysis:
      interval: 5s
      min_samples: 50
      failure_limit: 1
      metrics:
        - {name: error_rate, max: 0.01}
        - {name: latency_p99, max_ratio: 1.5}   # at most 1.5x the stable predictor's
        - {name: accuracy, max_drop: 0.02}      # at most 2 points below the stable predictor's

A predictor is a `serving` graph (`graph:`), or one registered model (`model_uri:`) as a shorthand.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyloop.monitoring.drift import DriftSpec
from skyloop.monitoring.payloads import LogSpec
from skyloop.monitoring.triggers import TriggersSpec
from skyloop.serving.spec import BatchingSpec, GraphNode, NodeType, ServeSpec, check_model_uri, parse_duration
from skyloop.spec.files import load_spec_file
from skyloop.spec.resources import Resources

__all__ = [
    "HIGHER_IS_BETTER",
    "AnalysisSpec",
    "DeploymentSpec",
    "DriftCheckSpec",
    "GateSpec",
    "GatewaySpec",
    "LoopSpec",
    "MetricCheck",
    "MetricName",
    "PredictorSpec",
    "QualitySpec",
    "RetrainSpec",
    "RolloutSpec",
    "RolloutStep",
    "RouterSpec",
    "Strategy",
    "load_deployment_spec",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_NAME_LENGTH = 200
"""The longest deployment or predictor name: the DB's columns hold 200 characters, and a name is part of file names
(`<home>/deployments/NAME/PREDICTOR-GENERATION.state.json`), which most filesystems cut at 255 bytes."""
_ALIAS = r"^[A-Za-z][A-Za-z0-9_-]*$"
"""A registry alias a rollout may move: a letter, then letters, digits, '_' and '-'."""


class _Model(BaseModel):
    # NaN passes every bound (all its comparisons are False) and neither NaN nor infinity survives the JSON the
    # controller stores: a spec's numbers must be finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _duration(value: Any, field: str | None = None) -> float:
    """`parse_duration`, with one message for a negative duration however it is written (`-5` and `'-5s'`)."""
    if isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"{field + ': ' if field else ''}a duration cannot be negative")
    return parse_duration(value, field)


def _seconds(field: str) -> Any:
    def parse(cls: type, value: Any) -> Any:
        return None if value is None else _duration(value)

    return field_validator(field, mode="before")(classmethod(parse))


class PredictorSpec(_Model):
    """One served graph with its replicas and its share of traffic."""

    name: str = Field(pattern=_NAME, max_length=_NAME_LENGTH)
    graph: GraphNode | None = None
    model_uri: str | None = None
    """Shorthand for a graph of one MODEL node."""
    replicas: int = Field(default=1, ge=1, le=64)
    resources: Resources = Field(default_factory=Resources)
    """What each replica asks for (recorded; Ray maps it to actor options)."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    traffic: float = Field(default=0.0, ge=0, le=100)
    """Percent of live traffic this predictor answers."""
    shadow: float = Field(default=0.0, ge=0, le=1)
    """Fraction of live traffic mirrored here; its answers are discarded, its metrics kept."""

    @field_validator("model_uri")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_model_uri(value)

    @model_validator(mode="after")
    def _check(self) -> PredictorSpec:
        where = f"predictor {self.name!r}"
        if (self.graph is None) == (self.model_uri is None):
            raise ValueError(f"{where}: give either model_uri: models:/NAME@ALIAS or graph: (an inference graph)")
        if self.graph is not None:
            try:  # what each replica serves (`serve_spec`) refuses such a graph: refuse it here, before it is applied
                self.graph.check_unique()
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if self.shadow and self.traffic:
            raise ValueError(f"{where}: a shadow answers nobody, so it takes no traffic; set traffic: 0 or shadow: 0")
        return self

    def node(self) -> GraphNode:
        """The predictor's inference graph."""
        if self.graph is not None:
            return self.graph
        return GraphNode(name=self.name, type=NodeType.MODEL, model_uri=self.model_uri)

    def serve_spec(self, deployment: str, base_dir: Path | None) -> ServeSpec:
        """What each replica serves: the graph under the deployment's name, so clients use one path."""
        return ServeSpec(name=deployment, graph=self.node(), batching=self.batching, base_dir=base_dir)

    def registered_models(self) -> list[str]:
        """The `models:/` URIs in the graph."""
        return [n.model_uri for n in self.node().walk() if n.model_uri and n.model_uri.startswith("models:/")]


class RouterKind(StrEnum):
    """How live traffic is split between predictors."""

    WEIGHTED = "weighted"
    EPSILON_GREEDY = "epsilon_greedy"
    THOMPSON = "thompson"


class RouterSpec(_Model):
    """The router in front of the predictors."""

    type: RouterKind = RouterKind.WEIGHTED
    epsilon: float = Field(default=0.1, ge=0, le=1)
    """epsilon_greedy: the share of requests that explore a random predictor."""
    sticky_header: str | None = None
    """A request header (e.g. `x-session-id`) whose value keeps a client on one predictor."""


class Strategy(StrEnum):
    """How a new version reaches traffic."""

    CANARY = "canary"
    BLUE_GREEN = "blue_green"
    ROLLING = "rolling"


class RolloutStep(_Model):
    """One canary step: give the target `weight` percent for `duration`, or `pause` (until promoted, or for a time)."""

    weight: float | None = Field(default=None, ge=0, le=100)
    duration: float | None = None
    pause: dict[str, Any] | None = None
    """`{}` waits for `skyloop deploy promote`; `{duration: 30s}` waits that long."""

    _duration = _seconds("duration")

    @model_validator(mode="after")
    def _check(self) -> RolloutStep:
        if (self.weight is None) == (self.pause is None):
            raise ValueError("a rollout step is either {weight: W, duration: D} or {pause: {}}")
        if self.pause is not None:
            unknown = sorted(set(self.pause) - {"duration"})
            if unknown:
                raise ValueError(f"pause: unknown field {unknown[0]!r}; a pause takes only duration")
            if "duration" in self.pause:
                self.pause["duration"] = _duration(self.pause["duration"], "pause.duration")
        elif self.duration is None:
            raise ValueError(f"the step with weight {self.weight:g} needs a duration (e.g. duration: 30s)")
        elif self.weight == 0 or self.duration == 0:
            # Judged on empty windows, such a step always ends Inconclusive: the rollout would pause there.
            raise ValueError(f"a step gives the target traffic to analyse: weight and duration must be above 0, "
                             f"got weight {self.weight:g} for {self.duration:g}s")
        return self

    @property
    def pause_seconds(self) -> float | None:
        """How long a timed pause lasts; None for a pause that waits for promotion."""
        return None if self.pause is None else self.pause.get("duration")


_PREVIEW = 30.0
"""The default `preview`. A stored spec carries it whatever the strategy, so only another value is refused where
the strategy has no preview."""


class RolloutSpec(_Model):
    """How the `target` predictor replaces the stable one."""

    strategy: Strategy = Strategy.ROLLING
    target: str | None = None
    """The predictor being rolled out (canary and blue_green)."""
    steps: list[RolloutStep] = Field(default_factory=list)
    """canary: the weight schedule."""
    preview: float = _PREVIEW
    """blue_green: how long the target is analysed on mirrored traffic before the switch."""
    promote_alias: str | None = Field(default=None, pattern=_ALIAS)
    """On promotion, this registry alias moves to the target's model version (e.g. `champion`)."""

    _preview = _seconds("preview")

    @model_validator(mode="after")
    def _check(self) -> RolloutSpec:
        if self.strategy is not Strategy.BLUE_GREEN and self.preview != _PREVIEW:
            raise ValueError(f"rollout: preview is for blue_green; a {self.strategy} rollout has no preview, so "
                             "remove it (or use strategy: blue_green)")
        if self.strategy is Strategy.ROLLING:
            if self.target or self.steps:
                raise ValueError("rollout: a rolling update replaces replicas in place; "
                                 "target and steps are for canary and blue_green")
            if self.promote_alias:
                raise ValueError("rollout: a rolling update promotes nothing, so promote_alias would never move; "
                                 "remove it, or roll out a target with strategy canary or blue_green")
            return self
        if not self.target:
            raise ValueError(f"rollout: a {self.strategy} rollout needs target: PREDICTOR (the new version)")
        if self.strategy is Strategy.CANARY and not self.steps:
            raise ValueError("rollout: a canary needs steps, e.g. [{weight: 10, duration: 30s}, {weight: 50, "
                             "duration: 30s}]")
        if self.strategy is Strategy.BLUE_GREEN and self.steps:
            raise ValueError("rollout: blue_green has no steps; it mirrors traffic to the target for `preview`, "
                             "then switches")
        if self.strategy is Strategy.BLUE_GREEN and self.preview <= 0:
            raise ValueError("preview: the target is analysed on mirrored traffic for this long before the "
                             "switch; give a duration above 0 (e.g. 30s)")
        return self


MetricName = Literal["error_rate", "latency_p99", "accuracy", "mean_reward"]
HIGHER_IS_BETTER: dict[str, bool] = {"error_rate": False, "latency_p99": False, "accuracy": True,
                                     "mean_reward": True}
_FRACTIONS = ("error_rate", "accuracy")
"""Metrics that are fractions in [0, 1]: their bounds (and accuracy's max_drop) are fractions too."""


class MetricCheck(_Model):
    """A metric of the target and its bounds: absolute (`max`, `min`) or against the stable predictor."""

    name: MetricName
    max: float | None = None
    min: float | None = None
    max_ratio: float | None = Field(default=None, gt=0)
    """Lower-is-better metrics: target <= max_ratio x stable."""
    max_drop: float | None = Field(default=None, ge=0)
    """Higher-is-better metrics: target >= stable - max_drop."""

    @model_validator(mode="after")
    def _check(self) -> MetricCheck:
        if all(v is None for v in (self.max, self.min, self.max_ratio, self.max_drop)):
            raise ValueError(f"metric {self.name}: give a bound: max, min, max_ratio or max_drop")
        higher = HIGHER_IS_BETTER[self.name]
        if self.max_ratio is not None and higher:
            raise ValueError(f"metric {self.name}: higher is better, so bound it with max_drop (or min), "
                             "not max_ratio")
        if self.max_drop is not None and not higher:
            raise ValueError(f"metric {self.name}: lower is better, so bound it with max_ratio (or max), "
                             "not max_drop")
        if self.name in _FRACTIONS:
            for bound in ("max", "min", "max_drop"):
                value = getattr(self, bound)
                if value is not None and not 0 <= value <= 1:
                    raise ValueError(f"metric {self.name}: {bound} {value:g} is not in [0, 1]; {self.name} is a "
                                     f"fraction: 1% is 0.01")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"metric {self.name}: min {self.min:g} is above max {self.max:g}, so no value passes; "
                             "swap them")
        return self


def _default_checks() -> list[MetricCheck]:
    return [MetricCheck(name="error_rate", max=0.01), MetricCheck(name="latency_p99", max_ratio=2.0)]


class AnalysisSpec(_Model):
    """How the target is judged at each interval of a rollout."""

    interval: float = 5.0
    min_samples: int = Field(default=50, ge=1)
    """Samples needed before a metric counts (requests; labelled rows for accuracy; rewarded answers for
    mean_reward); fewer is Inconclusive."""
    failure_limit: int = Field(default=0, ge=0)
    """Failed checks tolerated; one more rolls back."""
    metrics: list[MetricCheck] = Field(default_factory=_default_checks)

    _interval = _seconds("interval")

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("interval must be above 0 (e.g. 5s)")
        return value

    @field_validator("metrics")
    @classmethod
    def _unique(cls, metrics: list[MetricCheck]) -> list[MetricCheck]:
        names = [m.name for m in metrics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{dupes[0]} appears {names.count(dupes[0])} times; give each metric once, with all "
                             f"its bounds (e.g. {{name: {dupes[0]}, max: ..., max_ratio: ...}})")
        return metrics


class DriftCheckSpec(_Model):
    """How the serving version's recent inputs are compared with its training reference."""

    window: int = Field(default=300, ge=10)
    """The most recent logged rows of the serving version that are tested."""
    every: float = 5.0
    """Seconds between checks (drift, quality and the triggers)."""
    horizon: float = 600.0
    """How far back logs are read, in seconds."""
    tests: DriftSpec = Field(default_factory=DriftSpec)
    """Per-feature tests and thresholds, the dataset-drift share, minimum rows."""

    _every = _seconds("every")
    _horizon = _seconds("horizon")


class QualitySpec(_Model):
    """Live quality of the serving version, from feedback joined to its logged answers."""

    metric: Literal["accuracy", "mean_reward"] = "accuracy"
    window: int = Field(default=200, ge=1)
    """The most recent labelled answers it is computed over."""
    min_samples: int = Field(default=50, ge=1)
    """Fewer labelled answers: no quality figure (and no quality trigger)."""


class RetrainSpec(_Model):
    """The pipeline a firing runs; it must register a new version of `model`."""

    pipeline: str
    """`FILE.py:PIPELINE` (relative to the spec) or `package.module:PIPELINE`."""

    @field_validator("pipeline")
    @classmethod
    def _pipeline_ref(cls, value: str) -> str:
        module, sep, name = value.rpartition(":")
        if not sep or not module.strip() or not name.strip():
            raise ValueError(f"{value!r} must look like FILE.py:PIPELINE or package.module:PIPELINE")
        return value
    model: str
    """The registered model the pipeline logs (and the deployment serves)."""
    params: dict[str, Any] = Field(default_factory=dict)
    data_param: str = "data"
    """The pipeline parameter that receives the path of the labelled data (parquet: the model's inputs and the
    labels, in `label_column`)."""
    label_column: str = Field(default="target", min_length=1)
    """The column of the labelled data that holds the labels; it must not be one of the model's inputs."""
    backend: Literal["inline", "local", "ray"] = "local"
    rows: int = Field(default=5000, ge=10)
    """The most recent labelled rows used (training + holdout)."""
    min_rows: int = Field(default=100, ge=10)
    """Fewer labelled rows: the firing is recorded and nothing is retrained."""
    holdout: float = Field(default=0.3, gt=0, lt=1)
    """The share of those rows kept from training for the gate."""
    fresh: bool = False
    """Train only on rows labelled after the firing (waiting up to `wait` for `min_rows` of them): after a
    drift, the new model learns the new world, not a mix of old and new."""
    wait: float = 120.0
    """fresh: how long to wait for enough new labelled rows before giving up this firing."""

    _wait = _seconds("wait")


class GateSpec(_Model):
    """What a challenger must show on the holdout before it is rolled out (MLflow's MetricThreshold)."""

    metric: Literal["accuracy"] = "accuracy"
    min: float | None = None
    """Absolute: the challenger's value must be at least this."""
    min_delta: float = 0.0
    """Relative: challenger >= champion + min_delta (on the same holdout)."""


class LoopSpec(_Model):
    """The closed loop: log, watch drift and quality, retrain on a trigger, gate, then canary."""

    log: LogSpec = Field(default_factory=LogSpec)
    drift: DriftCheckSpec = Field(default_factory=DriftCheckSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    triggers: TriggersSpec | None = None
    """None: log and monitor only."""
    retrain: RetrainSpec | None = None
    gate: GateSpec = Field(default_factory=GateSpec)
    steps: list[RolloutStep] = Field(default_factory=lambda: [RolloutStep(weight=25, duration=20.0),
                                                              RolloutStep(weight=50, duration=20.0)])
    """The canary a blessed challenger goes through."""
    champion_alias: str = Field(default="champion", pattern=_ALIAS)
    """The alias a promoted challenger takes (the rollout's `promote_alias`)."""
    challenger_alias: str = Field(default="challenger", pattern=_ALIAS)
    """The alias a freshly retrained version takes, before the gate."""

    @field_validator("steps")
    @classmethod
    def _some_steps(cls, steps: list[RolloutStep]) -> list[RolloutStep]:
        if not steps:
            raise ValueError("a blessed challenger goes through a canary: give at least one step, e.g. "
                             "[{weight: 25, duration: 1m}, {weight: 50, duration: 1m}]")
        return steps

    @model_validator(mode="after")
    def _check(self) -> LoopSpec:
        if self.triggers is not None and self.retrain is None:
            raise ValueError("loop: triggers need retrain: {pipeline: FILE.py:PIPELINE, model: NAME} to run")
        if self.champion_alias == self.challenger_alias:
            raise ValueError(f"loop: champion_alias and challenger_alias are both {self.champion_alias!r}; a "
                             "challenger would take the champion's alias before its gate: give them different names")
        return self


class GatewaySpec(_Model):
    """Where the deployment's router listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    """0: any free port (the chosen one is in `skyloop deploy status`)."""


class DeploymentSpec(_Model):
    """A deployment: what `skyloop deploy apply` records and the controller makes true."""

    name: str = Field(pattern=_NAME, max_length=_NAME_LENGTH)
    backend: Literal["local", "ray"] = "local"
    """Where replicas run: local processes, or Ray actors (each replica's `resources` become actor options)."""
    ray_address: str | None = None
    """backend ray: the cluster's address; default: the execution settings' `ray_address`, else a local Ray."""
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    predictors: list[PredictorSpec] = Field(min_length=1)
    router: RouterSpec = Field(default_factory=RouterSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    loop: LoopSpec | None = None
    """Payload logging, drift, triggers and gated retraining (the closed loop)."""
    base_dir: Path | None = None
    """Where `file.py:Class` nodes and relative model directories are found (the spec file's folder)."""

    @model_validator(mode="after")
    def _check(self) -> DeploymentSpec:
        names = [p.name for p in self.predictors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"predictors: names must be unique; {', '.join(map(repr, dupes))} "
                             f"{'appears' if len(dupes) == 1 else 'appear'} more than once")
        live = [p for p in self.predictors if not p.shadow]
        if not live:
            raise ValueError("predictors: every predictor is a shadow; one must answer clients (traffic: 100)")
        bandit = self.router.type is not RouterKind.WEIGHTED
        total = sum(p.traffic for p in live)
        if not bandit and abs(total - 100) > 1e-6:
            raise ValueError(f"predictors: traffic adds up to {total:g}, it must add up to 100")
        if self.loop is not None and self.loop.retrain is not None:
            if bandit:
                raise ValueError("loop: retraining rolls challengers out as canaries; use router type weighted")
            serving = [p for p in live if p.traffic > 0]
            models = {u.removeprefix("models:/").split("@")[0].split("/")[0]
                      for p in serving for u in p.registered_models()}
            if len(serving) != 1 or models != {self.loop.retrain.model}:
                raise ValueError(f"loop: the deployment must serve one predictor with traffic whose graph is the "
                                 f"registered model {self.loop.retrain.model!r} (e.g. model_uri: "
                                 f"models:/{self.loop.retrain.model}@champion)")
        target = self.rollout.target
        if target is not None:
            if target not in names:
                raise ValueError(f"rollout.target: no predictor {target!r}; predictors are {', '.join(names)}")
            if self.predictor(target).shadow:
                raise ValueError(f"rollout.target: {target!r} is a shadow; roll out a predictor with traffic")
            if bandit:
                raise ValueError(f"rollout: a {self.router.type} router sets traffic itself; use router type "
                                 "weighted for a canary or blue_green rollout")
            if len(live) < 2:
                raise ValueError("rollout: a canary or blue_green rollout needs a stable predictor besides the "
                                 "target")
        rewarded = [i for i, m in enumerate(self.analysis.metrics) if m.name == "mean_reward"]
        if rewarded and self.rollout.strategy is Strategy.BLUE_GREEN:
            raise ValueError(f"analysis.metrics.{rewarded[0]}: mean_reward cannot judge a blue_green preview: the "
                             "target only sees mirrored traffic, and a reward judges the answer the client saw (the "
                             "stable predictor's), so the target never gets one; judge it on accuracy (a truth "
                             "judges mirrored answers too), or use strategy canary")
        self._check_full_steps("rollout.steps", self.rollout.steps if target is not None else [])
        if self.loop is not None and self.loop.retrain is not None:
            self._check_full_steps("loop.steps", self.loop.steps)
        return self

    def _check_full_steps(self, where: str, steps: list[RolloutStep]) -> None:
        # At 100% the stable predictors get no traffic: a bound against them can never be judged, and the step
        # would end Inconclusive, pausing the rollout (promotion gives the target all traffic anyway).
        relative = [m.name for m in self.analysis.metrics if m.max_ratio is not None or m.max_drop is not None]
        full = [i for i, step in enumerate(steps) if step.weight is not None and step.weight >= 100]
        if full and relative:
            raise ValueError(f"{where}.{full[0]}.weight: at 100 the stable predictor gets no traffic, so "
                             f"{', '.join(relative)} (a bound against it) cannot be judged; give a weight below 100 "
                             "(promotion moves all traffic at the end)")

    def predictor(self, name: str) -> PredictorSpec:
        """The predictor called `name`."""
        for p in self.predictors:
            if p.name == name:
                return p
        raise KeyError(name)

    def stable(self) -> list[str]:
        """Predictors that answer clients and are not the rollout's target."""
        return [p.name for p in self.predictors if not p.shadow and p.name != self.rollout.target]


def load_deployment_spec(source: str | Path | dict[str, Any]) -> DeploymentSpec:
    """Read and validate a deployment spec from a YAML file (or an already parsed mapping)."""
    return load_spec_file(source, DeploymentSpec, "deployment spec", "name and predictors")
