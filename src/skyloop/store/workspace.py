"""A workspace: the metadata DB and the artifact store that one set of settings points at."""

from __future__ import annotations

from dataclasses import dataclass

from skyloop.config import Settings
from skyloop.errors import StoreError
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
        try:
            settings.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use {str(settings.home)!r} as the skyloop home ({exc.strerror}); give a "
                             "folder this user can write with --home or SKYLOOP_HOME") from None
        return cls(settings, Database(settings.resolved_db_url), ArtifactStore(settings.resolved_artifacts_url))

    def close(self) -> None:
        """Release DB connections."""
        self.db.dispose()
