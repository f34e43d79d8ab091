"""Deployments in the metadata DB: a deletion that a new apply overtakes, and the history's bounds."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update
from tests_support import before_first_update

from skyloop import Settings
from skyloop.errors import NotFound, SpecError
from skyloop.store import deployments as store
from skyloop.store.db import Database
from skyloop.store.models import DeploymentRow
from skyloop.store.runs import utcnow
from skyloop.store.workspace import Workspace

SPEC = {"name": "d", "predictors": [{"name": "stable", "model_uri": "models:/iris@champion", "traffic": 100}]}


@pytest.fixture
def workspace(settings: Settings) -> Iterator[Workspace]:
    ws = Workspace.open(settings)
    yield ws
    ws.close()


def test_a_deployment_applied_again_while_its_deletion_stops_it_survives(workspace: Workspace) -> None:
    with workspace.db.session() as session:
        store.apply_deployment(session, "d", SPEC)
        store.claim_deployments(session, "ctl", 3600)
    with workspace.db.session() as session:
        store.delete_deployment(session, "d")  # the controller sees it deleted and stops its replicas...
    with workspace.db.session() as session:
        assert store.apply_deployment(session, "d", SPEC) == (2, True)  # ...while the user applies it again
    with workspace.db.session() as session:
        assert not store.drop_deployment(session, "d", "ctl")
    with workspace.db.read() as session:
        info = store.get_deployment(session, "d")
        assert (info.desired, info.spec_version) == ("running", 2)  # the controller starts it again
    with workspace.db.session() as session:
        store.delete_deployment(session, "d")
    with workspace.db.session() as session:
        assert store.drop_deployment(session, "d", "ctl")
    with workspace.db.read() as session, pytest.raises(NotFound):
        store.get_deployment(session, "d")


def test_the_history_takes_the_last_n_events_and_refuses_n_below_one(workspace: Workspace) -> None:
    with workspace.db.session() as session:
        store.apply_deployment(session, "d", SPEC)
        store.apply_deployment(session, "d", {**SPEC, "predictors": []})
    with workspace.db.read() as session:
        assert [e.spec_version for e in store.deployment_history(session, "d", 1)] == [2]
        for limit in (0, -1):
            with pytest.raises(SpecError, match="at least 1"):
                store.deployment_history(session, "d", limit)


# PostgreSQL only: on SQLite every write transaction takes the lock at BEGIN, so no write fits in between.
@pytest.mark.postgres
def test_a_controller_that_renews_between_anothers_read_and_claim_keeps_its_deployment(pg_url: str) -> None:
    db, elsewhere = Database(pg_url), Database(pg_url)
    try:
        with db.session() as session:
            store.apply_deployment(session, "d", SPEC)
            assert store.claim_deployments(session, "old", 30) == ["d"]
            session.execute(update(DeploymentRow).values(lease_expires_at=utcnow() - timedelta(seconds=1)))

        def old_renews() -> None:  # "old" was slow, not gone: it renews as "new" is about to claim
            with elsewhere.session() as session:
                assert store.claim_deployments(session, "old", 30) == ["d"]

        # Before: the claim matched the controller it had read and took the deployment from under "old",
        # so both ran its replicas until "old" next looked.
        with before_first_update(db, old_renews), db.session() as session:
            assert store.claim_deployments(session, "new", 30) == []
        with db.read() as session:
            assert store.get_deployment(session, "d").controller == "old"
    finally:
        db.dispose()
        elsewhere.dispose()
