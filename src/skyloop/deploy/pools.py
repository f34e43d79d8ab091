"""A predictor's replicas as the gateway sees them, and the version they report.

The controller pins every `models:/` URI of a predictor's graph to a version when it starts its replicas
(`iris/2`, or `iris/2,tree/1` for several models, `graph` for none); that string is what status, history
and the `skyloop-model-version` header show. A V2 version is one path segment
(`/v2/models/NAME/versions/VERSION`), so the replicas report a form of it without '/' (`served_version`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Endpoint", "Pool", "served_version", "version_names"]


def served_version(pinned: str) -> str:
    """The V2 version replicas report for the `pinned` models they serve: no '/' in it.

    One registered model gives its version number, as `skyloop serve` reports it (`iris/2` -> `2`); several
    give each as `name:version` (`iris/2,tree/1` -> `iris:2,tree:1`); a graph without one keeps its name.
    """
    if "," not in pinned and "/" in pinned:
        return pinned.rpartition("/")[2]
    return pinned.replace("/", ":")


def version_names(pinned: str) -> set[str]:
    """Every version path segment that names what `pinned` serves: `served_version`, and `name:version` to tell
    two models with the same version number apart."""
    return {served_version(pinned), pinned.replace("/", ":")}


@dataclass(eq=False)
class Endpoint:
    """One replica's address and what the gateway has in flight there."""

    predictor: str
    index: int
    port: int
    host: str = "127.0.0.1"
    inflight: int = 0
    draining: bool = False
    served: int = 0

    @property
    def url(self) -> str:
        """Base URL of the replica."""
        return f"http://{self.host}:{self.port}"


@dataclass
class Pool:
    """A predictor's replicas, as the gateway sees them."""

    name: str
    version: str = ""
    """What the replicas serve, pinned (`iris/2`)."""
    endpoints: list[Endpoint] = field(default_factory=list)
    _turn: int = 0

    @property
    def ready(self) -> bool:
        """Whether a replica takes new requests."""
        return any(not e.draining for e in self.endpoints)

    def pick(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The least-busy replica that is not draining (round robin among equals)."""
        best: Endpoint | None = None
        count = len(self.endpoints)
        for i in range(count):
            ep = self.endpoints[(self._turn + i) % count]
            if ep.draining or ep is avoid:
                continue
            if best is None or ep.inflight < best.inflight:
                best = ep
        self._turn += 1
        if best is None and avoid is not None and not avoid.draining:
            return avoid
        return best
