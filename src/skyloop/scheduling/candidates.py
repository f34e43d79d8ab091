"""What the scheduling policy decides on: the ready attempts (`Candidate`) and its knobs (`PolicyConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skyloop.spec.resources import Resources

__all__ = ["BACKFILL_SCAN", "PLAIN", "Candidate", "PolicyConfig", "Shape", "request_shape"]

BACKFILL_SCAN = 64
"""How many candidates that cannot launch are looked past, per call, to find ones that can."""

@dataclass(frozen=True)
class Candidate:
    """A ready attempt waiting for resources."""

    key: int
    resources: Resources
    priority: int = 0
    """Priority class: higher first."""
    seq: int = 0
    """Arrival order: earlier first among equals."""
    run_id: str = ""
    rank: float = 0.0
    """Upward rank, seconds: the longest path from this task to the end of its run, its own estimate included."""
    estimate: float = 0.0
    """Expected seconds of this attempt."""
    pool: str | None = None
    """Named concurrency pool (see `PolicyConfig.pools`)."""
    ready_at: float = 0.0
    """When it became ready, seconds on the clock that `take(now=...)` uses."""


@dataclass
class PolicyConfig:
    """Knobs of the policy; `run_weights`, `pools` and `pools_held_elsewhere` are read on every call, so they
    may change."""

    aging_seconds: float = 300.0
    """Each full period in which a run launches nothing lifts its oldest waiting candidate one priority
    class (see `aging.py`); 0 or less turns aging off."""
    run_weights: dict[str, float] = field(default_factory=dict)
    """Fair-share weight per run id (default 1.0): a run of weight 2 is entitled to twice the share."""
    pools: dict[str, int] = field(default_factory=dict)
    """Concurrency pool -> how many of its members may run at once, across runs; unknown = unlimited."""
    pools_held_elsewhere: dict[str, int] = field(default_factory=dict)
    """Pool -> how many of its slots others hold (other processes on the DB): they count against its limit."""
    backfill_scan: int = BACKFILL_SCAN
    """Candidates passed over per call before giving up on the rest."""
    fit_window: float = 0.0
    """Ranks within this fraction of the best one count as the same standing for best fit (0: ties only)."""
    fit_scan: int = 8
    """At most this many candidates of the same standing are compared for best fit."""
    fair_share: bool = True
    """Guarantee every run its weighted share of the machine (of its dominant resource) within its class;
    off, rank alone orders runs of one class (and only aging keeps a run from waiting behind another's
    critical path)."""
    fair_share_seconds: float = 1800.0
    """How long a run may hold less than its share before it goes first (0: at once, strict fair share). Half
    an hour, as fair-share schedulers judge shares over long horizons (Slurm's usage decays over days): for
    runs of hours, a short patience interleaves runs and delays every critical path (the benchmark's mixed
    workloads, learned estimates: 1.25 of the lower bound at 300 s, 1.19 at 1,800 s), while aging (300 s)
    still bounds how long a lower class waits."""


Shape = tuple[str | None, int, tuple[tuple[str, float], ...]]
"""(pool, GPUs, custom resources) of a request: what besides CPUs and memory it needs free to launch."""
PLAIN: Shape = (None, 0, ())


def request_shape(cand: Candidate) -> Shape:
    """What a candidate needs besides CPUs and memory (`PLAIN`, one shared tuple, when nothing)."""
    res = cand.resources
    if cand.pool is None and not res.gpus and not res.custom:
        return PLAIN
    return (cand.pool, res.gpus, tuple(sorted(res.custom.items())))
