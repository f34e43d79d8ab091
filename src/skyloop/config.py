"""Settings: one value object passed to every command; nothing else reads the environment."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from skyloop.errors import SpecError
from skyloop.spec.resources import parse_memory

__all__ = ["ExecutionSettings", "MonitoringSettings", "Settings"]

LEASE_HEARTBEATS = 3
"""A run's lease spans at least this many heartbeats (renewals of it)."""


class ExecutionSettings(BaseModel):
    """How steps are executed on this machine."""

    backend: str = "local"
    """Default backend: `local` (warm worker processes) or `inline` (in-process, for debugging)."""
    max_cpus: float | None = Field(default=None, gt=0)
    """CPUs the local backend may hand out; default: the machine's logical CPUs."""
    max_memory: Annotated[int | None, BeforeValidator(lambda v: v if v is None else parse_memory(v))] = \
        Field(default=None, gt=0)
    """Memory (bytes, or a size such as `8Gi`) the local backend may hand out; default: the machine's total memory."""
    max_gpus: int | None = Field(default=None, ge=0)
    """GPUs the local backend may hand out; default: as many as `gpu_ids` names, else 0."""
    gpu_ids: list[int] | None = None
    """Device ids the local backend hands to steps that ask for GPUs (sets CUDA_VISIBLE_DEVICES);
    default: the first max_gpus of the CUDA_VISIBLE_DEVICES this process was started with, else
    0..max_gpus-1."""
    resources: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(default_factory=dict)
    """Custom resources this machine offers to steps that ask for them (e.g. `{license: 2}`: at most two
    steps with `Resources(custom={"license": 1})` at once, across runs); local and inline backends."""
    memory_margin: float = Field(default=0.25, ge=0, allow_inf_nan=False)
    """A step whose resident memory passes its request by this fraction is killed as OUT_OF_MEMORY."""
    pools: dict[Annotated[str, Field(min_length=1, max_length=200)], Annotated[int, Field(ge=1)]] = \
        Field(default_factory=dict)
    """Concurrency pools: at most `limit` attempts of steps with `pool=name` run at once, across runs and across
    the processes (agents, `skyloop run`) on one metadata DB, whose slots it holds (see `skyloop.store.pools`).
    Every process on the DB should name the same limit: each applies the one it knows."""
    aging_seconds: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    """Each time a run launches nothing for this long, its oldest waiting step rises one priority class
    (one waiting four times as long rises even while its run launches other steps)."""
    fair_share_seconds: float = Field(default=1800.0, ge=0, allow_inf_nan=False)
    """A run held below its weighted share of the machine for this long goes first whenever it is below it,
    until it has held it this long in a row (0: at once, always; shorter is fairer, longer favours the
    critical path of whichever run heads it)."""
    default_estimate_seconds: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Expected duration of a step never seen before (before history teaches better)."""
    agent_poll_seconds: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """How often `skyloop agent` looks for queued runs and runs whose owner is gone."""
    memory_poll_seconds: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    """How often the local backend samples the memory of running steps."""
    max_workers: int | None = Field(default=None, ge=1)
    """Most worker processes kept warm; default: as many as CPUs offered (at least 1)."""
    ray_address: str | None = None
    """Address of a running Ray cluster (`host:port`) for the ray backend; default: start a local one."""
    lookahead: bool = True
    """On a backend that can (ray), send a step whose one upstream runs before that upstream ends, so it
    starts as soon as the upstream does (see `skyloop.execution.lookahead`). Its worker then looks it up
    in the cache itself, so it must reach the metadata DB: turn this off for a cluster whose workers
    cannot."""
    lease_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """A run's lease: another process may adopt the run when no heartbeat came for this long."""
    heartbeat_seconds: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """How often a live orchestrator renews its lease (at most a third of `lease_seconds`)."""

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self) -> ExecutionSettings:
        # A lease that runs out between two renewals lets another agent adopt a live run: its steps run twice.
        # Three beats per lease leave room for a renewal delayed by a busy DB.
        if self.lease_seconds < LEASE_HEARTBEATS * self.heartbeat_seconds:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds:g}, SKYLOOP_EXECUTION__LEASE_SECONDS) must be at least "
                f"{LEASE_HEARTBEATS} times heartbeat_seconds ({self.heartbeat_seconds:g}, "
                "SKYLOOP_EXECUTION__HEARTBEAT_SECONDS), else a live run's lease runs out between renewals and "
                f"another agent runs its steps again; raise the lease to "
                f"{LEASE_HEARTBEATS * self.heartbeat_seconds:g} or more, or lower the heartbeat")
        return self


class MonitoringSettings(BaseModel):
    """What deployments' closed loops keep."""

    drift_report_days: float = Field(default=7.0, gt=0, allow_inf_nan=False)
    """Days a deployment's drift reports (one per check) are kept; its loop deletes older ones hourly."""


_JSON_SETTINGS = {"POOLS": '{"gpu-train": 1}', "RESOURCES": '{"license": 2}', "GPU_IDS": "[0, 1]"}
"""The execution settings that hold a list or a mapping (given as JSON), with an example of each."""


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Settings(BaseSettings):
    """Everything skyloop needs to know about where it stores state and how it runs."""

    model_config = SettingsConfigDict(env_prefix="SKYLOOP_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".skyloop")
    """Folder for the SQLite DB, the artifact store and step logs."""

    @field_validator("home", mode="before")
    @classmethod
    def _home_folder(cls, value: Any) -> Any:
        # An empty value (`SKYLOOP_HOME=$UNSET`) would put the DB in the current folder, `~` would make a folder
        # of that name, and `?` or `::` would be read as a URL's query or as fsspec's chaining: the DB or the
        # artifacts would land outside the home.
        text = str(value)
        if not text.strip():
            raise ValueError("is empty: unset it for the default ~/.skyloop, or name a folder")
        for bad, meaning in (("?", "a URL's query"), ("::", "fsspec's URL chaining")):
            if bad in text:
                raise ValueError(f"{text!r} holds {bad!r}, which would be read as {meaning}: name a folder "
                                 "without it")
        return Path(text).expanduser()
    db_url: str | None = None
    """SQLAlchemy URL of the metadata DB; default: SQLite at `<home>/skyloop.db`."""
    artifacts_url: str | None = None
    """fsspec URL of the artifact store; default: `<home>/artifacts`."""
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    """Execution backends and resource limits."""
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    """Retention of what the closed loop measures."""

    @property
    def resolved_db_url(self) -> str:
        """The DB URL in use."""
        return self.db_url or f"sqlite:///{self.home / 'skyloop.db'}"

    @property
    def resolved_artifacts_url(self) -> str:
        """The artifact store URL in use."""
        return self.artifacts_url or str(self.home / "artifacts")

    @property
    def logs_dir(self) -> Path:
        """Folder holding one log file per step attempt."""
        return self.home / "logs"

    @classmethod
    def load(cls, **values: Any) -> Settings:
        """Settings from the environment (`SKYLOOP_*`) and `values`; a bad variable is a SpecError naming it."""
        try:
            return cls(**values)
        except ValidationError as exc:
            bad = "; ".join(f"SKYLOOP_{'__'.join(str(p) for p in e['loc']).upper()}: "
                            f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()[:5])
            raise SpecError(f"invalid settings: {bad}") from None
        except SettingsError as exc:  # a nested setting whose value is not JSON
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            for name, example in _JSON_SETTINGS.items():
                variable = f"SKYLOOP_EXECUTION__{name}"
                if (value := os.environ.get(variable)) is not None and not _is_json(value):
                    raise SpecError(f"invalid settings: {variable}: {value!r} is not JSON{cause}; it holds a list or "
                                    f"a mapping, e.g. {variable}='{example}'") from None
            raise SpecError(f"invalid settings: {exc}{cause}; settings that hold a list or a mapping take JSON: "
                            "SKYLOOP_EXECUTION__POOLS='{\"gpu-train\": 1}', SKYLOOP_EXECUTION__RESOURCES="
                            "'{\"license\": 2}', SKYLOOP_EXECUTION__GPU_IDS='[0, 1]'") from None

    @classmethod
    def for_home(cls, home: Path | str) -> Settings:
        """Settings rooted at `home` with defaults for the rest, ignoring the environment (tests, embedding)."""
        return cls.model_construct(home=Path(home), db_url=None, artifacts_url=None, execution=ExecutionSettings(),
                                   monitoring=MonitoringSettings())
