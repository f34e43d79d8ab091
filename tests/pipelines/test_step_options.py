"""`@step(...)` options of the wrong kind are refused where they are written, naming the option and what it takes."""

from __future__ import annotations

import re
from typing import Any

import pytest

import skyloop
from skyloop import pipeline, step
from skyloop.config import Settings
from skyloop.errors import SpecError


def add_one(x: int) -> int:
    return x + 1


@pytest.mark.parametrize(("options", "message"), [
    ({"timeout": "1m"}, "timeout must be > 0: a number of seconds, e.g. timeout=60 for a minute (or None for no "
                        "limit); got '1m'"),
    ({"timeout": 0}, "timeout must be > 0: a number of seconds"),
    ({"timeout": float("nan")}, "timeout must be > 0: a number of seconds"),
    ({"timeout": True}, "timeout must be > 0: a number of seconds"),
    ({"retries": "3"}, "retries must be a whole number greater than or equal to 0, e.g. retries=2; got '3'"),
    ({"retries": 1.5}, "retries must be a whole number"),
    ({"retries": -1}, "retries must be a whole number greater than or equal to 0"),
    ({"retry_delay": "5s"},
     "retry_delay must be a finite number of seconds greater than or equal to 0, e.g. retry_delay=5; got '5s'"),
    ({"retry_backoff": 0.5}, "retry_backoff must be a finite number greater than or equal to 1"),
    ({"retry_backoff": float("inf")}, "retry_backoff must be a finite number greater than or equal to 1 (it "
                                      "multiplies the delay after each retry), e.g. retry_backoff=2; got inf"),
    ({"retry_delay": float("inf")}, "retry_delay must be a finite number of seconds greater than or equal to 0"),
    ({"retry_delay": float("nan")}, "retry_delay must be a finite number of seconds"),
    ({"priority": "high"}, "priority must be a whole number, e.g. priority=5; got 'high'"),
    ({"priority": 1.5}, "priority must be a whole number"),
])
def test_a_wrong_numeric_option_names_itself_and_what_it_takes(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as raised:
        step(**options)(add_one)
    assert str(raised.value).startswith("@step 'add_one': ")
    assert message in str(raised.value)
    with pytest.raises(SpecError, match=re.escape(message)):
        step(add_one).with_options(**options)


def test_numeric_options_of_the_right_kind_run(settings: Settings) -> None:
    checked = step(timeout=60, retries=2, retry_delay=0.5, retry_backoff=2, priority=-1)(add_one)
    assert step(timeout=1.5)(add_one).timeout == 1.5

    @pipeline
    def one(x: int = 1):
        return checked(x)

    run = skyloop.run(one, backend="inline", settings=settings)
    assert run.status == "SUCCEEDED" and run.outputs["output"] == 2
    task = one.compile().tasks[0]
    assert (task.timeout, task.retry.retries, task.priority) == (60, 2, -1)
