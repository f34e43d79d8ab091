"""A workspace: the metadata DB and the artifact store that one set of settings points at."""

from __future__ import annotations

from dataclasses import dataclass

from skyloop.config import Settings
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.db import Database

__all__ = ["Workspace"]


@dataclass
class Workspace:
    """The stores behind one `Settings`: open it once per command."""

    settings: Settings
    db: Database
    store: ArtifactStore

    @classmethod
    def open(cls, settings: Settings) -> Workspace:
        """Open (and migrate) the DB and the artifact store."""
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings, Database(settings.resolved_db_url), ArtifactStore(settings.resolved_artifacts_url))

    def close(self) -> None:
        """Release DB connections."""
        self.db.dispose()
