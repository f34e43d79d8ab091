"""Feedback rows: one per answer, with one truth and one reward, held against concurrent writers and kept
through the migration that brought the rule in."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, inspect
from tests_support import at_once

from skyloop.errors import Conflict, NotFound
from skyloop.store.db import Database
from skyloop.store.feedback import list_feedback, record_feedback
from skyloop.store.migrations import upgrade
from skyloop.store.models import FeedbackRow

POSTGRES = pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.integration])


@pytest.fixture(params=["sqlite", POSTGRES])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A new database on SQLite, then on the private PostgreSQL."""
    return sqlite_url if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def database(url: str) -> Iterator[Database]:
    db = Database(url)
    yield db
    db.dispose()


def _rows(db: Database) -> list[tuple[str, object, float | None]]:
    with db.read() as session:
        return [(f.inference_id, f.truth, f.reward) for f in list_feedback(session, "m")]


def test_feedback_for_an_answer_the_caller_does_not_know_needs_its_row(database: Database) -> None:
    """A server that forgot an answer (a restart) takes feedback for it only if it took feedback before."""
    with pytest.raises(NotFound, match=r"^no feedback was recorded for inference id 'a' of 'm'$"), \
            database.session() as session:
        record_feedback(session, "m", "1", "a", truth=1, answered=False)
    assert _rows(database) == []
    with database.session() as session:
        record_feedback(session, "m", "1", "a", truth=1)
    with database.session() as session:
        record_feedback(session, "m", "1", "a", reward=0.5, answered=False)
    assert _rows(database) == [("a", 1, 0.5)]

def test_an_answer_takes_one_truth_and_one_reward(database: Database) -> None:
    def record(truth: object = None, reward: float | None = None) -> None:
        with database.session() as session:
            record_feedback(session, "m", "1", "a", truth, reward)

    record(truth=[1, 2])
    with pytest.raises(Conflict, match=r"^feedback for inference id 'a' was already recorded; each answer takes "
                                       r"one truth$"):
        record(truth=[1, 2])
    with pytest.raises(Conflict, match=r"each answer takes one truth$"):
        record(truth=3, reward=1.0)  # nothing of it is stored: not even the reward
    record(reward=0.5)
    with pytest.raises(Conflict, match=r"each answer takes one truth and one reward$"):
        record(truth=3, reward=1.0)
    with database.session() as session:
        record_feedback(session, "other", "1", "a", truth=0)  # the id belongs to another model's answer
    assert _rows(database) == [("a", [1, 2], 0.5)]


@pytest.mark.parametrize("labelled", [False, True])
def test_concurrent_writers_store_a_kind_once(database: Database, labelled: bool) -> None:
    # Not labelled: they race to insert the row (the unique index decides); labelled: to fill in its reward
    # (the row lock decides).
    if labelled:
        with database.session() as session:
            record_feedback(session, "m", "1", "a", truth=1)

    def write(i: int) -> str:
        try:
            with database.session() as session:
                record_feedback(session, "m", "1", "a", reward=float(i))
        except Conflict:
            return "refused"
        return "stored"

    assert sorted(at_once(8, write)) == ["refused"] * 7 + ["stored"]
    assert len(_rows(database)) == 1


def test_the_migration_merges_answers_labelled_twice(url: str) -> None:
    old = Database(url, migrate=False)
    try:
        with old.engine.begin() as conn:
            upgrade(conn, "0006")
            at = [datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in range(5)]
            conn.execute(insert(FeedbackRow), [
                {"model": "m", "version": "1", "inference_id": "a", "truth": 1, "reward": None, "created_at": at[0]},
                {"model": "m", "version": "1", "inference_id": "a", "truth": 2, "reward": None, "created_at": at[1]},
                {"model": "m", "version": "1", "inference_id": "a", "truth": None, "reward": 0.5, "created_at": at[2]},
                {"model": "m", "version": "1", "inference_id": "b", "truth": 0, "reward": None, "created_at": at[3]},
                {"model": "n", "version": "1", "inference_id": "a", "truth": 7, "reward": None, "created_at": at[4]},
            ])
            upgrade(conn)
            unique = {i["name"]: i["unique"] for i in inspect(conn).get_indexes("inference_feedback")}
        assert unique["ix_inference_feedback_model_inference_id"]
        with old.read() as session:
            merged = [(f.inference_id, f.truth, f.reward, f.created_at) for f in list_feedback(session, "m")]
            assert [(f.inference_id, f.truth) for f in list_feedback(session, "n")] == [("a", 7)]
        # The first truth and the first reward given, as the rule would have kept them, at the newest time.
        assert merged == [("a", 1, 0.5, at[2]), ("b", 0, None, at[3])]
    finally:
        old.dispose()
