"""Deployments in the metadata DB: a deletion that a new apply overtakes, and the history's bounds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from skyloop import Settings
from skyloop.errors import NotFound, SpecError
from skyloop.store import deployments as store
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
