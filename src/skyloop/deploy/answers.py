"""The answers a gateway keeps to join feedback to, how a truth scores one, and feedback no replica can take.

An answer is kept with who gave it (predictor, model version, replica), its first output and the window
generation it was given in: a truth or reward that comes later counts in that generation's window only, never
in a window opened after it (a new rollout step, or fresh windows after a tolerated failure, judge what came after,
not the same answers again). Accuracy counts rows: a truth gives one value per row of the answer.

Feedback for an answer of a predictor that was retired since (promoted over, rolled back) has no replica to
take it: it is stored in the DB as a replica would have stored it (`store_feedback`), so that it is kept for
the loop's training data, rather than waiting for a replica that never comes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import ValuesView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyloop.deploy.analysis import same_answer
from skyloop.deploy.pools import Endpoint, served_version
from skyloop.serving.protocol import FeedbackRequest
from skyloop.store.feedback import record_feedback

if TYPE_CHECKING:
    from skyloop.store.db import Database

__all__ = ["REMEMBER", "Answer", "Answers", "first_output", "score", "store_feedback"]

REMEMBER = 200_000
"""Answers kept for joining feedback (id -> predictor, output, replica)."""


@dataclass
class Answer:
    """An answer kept for joining feedback: who gave it, what it was, and the shadows' answers."""

    predictor: str
    output: Any
    endpoint: Endpoint | None
    version: str = ""
    """The model version its predictor served (`iris/2`): feedback stored for it names that version."""
    generation: int = 0
    """The window generation it was given in (`Gateway.generation`): its feedback counts in that window only."""
    shadows: dict[str, Any] = field(default_factory=dict)
    labelled: bool = False
    truth: Any = None
    taken: set[str] = field(default_factory=set)
    """The kinds of feedback ('truth', 'reward') taken or being passed on: each answer takes one of each."""
    rewarded: bool = False
    """Whether the bandit has had this answer's reward (or the one its truth implies): one per pull."""
    size: int = 0
    """About how many bytes it holds (the JSON it came from), counted against `Answers.max_bytes`."""
    rows: int | None = None
    """How many rows it answered (None if the answer did not say): a truth gives one value per row."""


class Answers:
    """The most recent answers by id, at most `REMEMBER` of them and about `max_bytes` (the oldest go first)."""

    def __init__(self, max_bytes: int) -> None:
        self._kept: OrderedDict[str, Answer] = OrderedDict()
        self.max_bytes = max_bytes
        self.bytes = 0
        """About how many bytes the kept answers hold."""

    def remember(self, answer_id: str, answer: Answer) -> None:
        """Keep `answer` (of `answer.size` bytes) under `answer_id`, in place of any answer kept under it."""
        old = self._kept.pop(answer_id, None)
        if old is not None:
            self.bytes -= old.size
        if answer.size > self.max_bytes:  # not kept: its feedback is refused as too old would be
            return
        self._kept[answer_id] = answer
        self.bytes += answer.size
        self._forget()

    def held(self, answer_id: str, answer: Answer, size: int) -> None:
        """`answer` holds `size` bytes more (a shadow's answer, or a truth joined to it); counted while it is the
        one kept under `answer_id`."""
        if self._kept.get(answer_id) is not answer:
            return
        answer.size += size
        self.bytes += size
        self._forget()

    def _forget(self) -> None:
        """Drop the oldest answers while over `REMEMBER` or `max_bytes` (the newest one always stays)."""
        while len(self._kept) > 1 and (len(self._kept) > REMEMBER or self.bytes > self.max_bytes):
            self.bytes -= self._kept.popitem(last=False)[1].size

    def get(self, answer_id: str) -> Answer | None:
        """The answer kept under `answer_id`, or None (too old, or never given)."""
        return self._kept.get(answer_id)

    def __getitem__(self, answer_id: str) -> Answer:
        return self._kept[answer_id]

    def __contains__(self, answer_id: object) -> bool:
        return answer_id in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    def values(self) -> ValuesView[Answer]:
        """The kept answers, oldest first."""
        return self._kept.values()


def first_output(doc: dict[str, Any]) -> tuple[Any, int | None]:
    """An answer's first output's data, and how many rows it has (None if it does not say)."""
    outputs = doc.get("outputs") or []
    first = outputs[0] if outputs and isinstance(outputs[0], dict) else {}
    shape = first.get("shape")
    rows = (shape[0] if shape else 1) if isinstance(shape, list) else None
    return first.get("data"), rows if isinstance(rows, int) and not isinstance(rows, bool) else None


def score(output: Any, truth: Any) -> tuple[int, int] | None:
    """How many rows of an answer's first output match `truth` (one value per row), and of how many rows;
    None when there is nothing to compare (no output or truth, or not one value per row)."""
    if output is None or truth is None:
        return None
    data = output if isinstance(output, list) else [output]
    labels = truth if isinstance(truth, list) else [truth]
    if len(data) != len(labels) or not labels:
        return None
    return sum(same_answer(a, t) for a, t in zip(data, labels, strict=True)), len(labels)


def store_feedback(db: Database, deployment: str, answer: Answer, given: FeedbackRequest) -> dict[str, Any]:
    """Store feedback for `answer` in the DB as its replica would have (`record_feedback`, under the deployment's
    name and the version the replica reported); blocking, so call it in a thread. Raises `Conflict` for a kind
    already recorded. Its answer is the replica's, no node of the graph being there to tell."""
    with db.session() as session:
        record_feedback(session, deployment, served_version(answer.version), given.id, given.truth, given.reward)
    return {"id": given.id, "stored": True, "nodes_told": 0, "nodes_failed": {}}
