"""Retry policy in a spec: finite numbers only, and a delay that grows with the backoff up to a cap."""

from __future__ import annotations

import math
from typing import Any

import pytest

from skyloop import PipelineSpec, SpecError
from skyloop.spec.files import validate
from skyloop.spec.pipeline import RETRY_DELAY_CAP, RetrySpec


@pytest.mark.parametrize(("retry", "where"), [
    ({"backoff": math.inf}, "backoff"),
    ({"delay": math.inf}, "delay"),
    ({"delay": math.nan}, "delay"),
])
def test_a_spec_refuses_a_retry_number_that_is_not_finite_naming_the_field(retry: dict[str, Any], where: str) -> None:
    data = {"name": "p", "tasks": [{"name": "a", "step": {"module": "m", "qualname": "f"},
                                    "retry": {"retries": 3, **retry}}]}
    with pytest.raises(SpecError, match=rf"tasks\.0\.retry\.{where}: Input should be a finite number"):
        validate(PipelineSpec, data, "pipeline spec")


def test_the_delay_grows_by_the_backoff_up_to_an_hour() -> None:
    retry = RetrySpec(retries=20, delay=60, backoff=2)
    assert [retry.delay_after(n) for n in (1, 2, 3, 6)] == [60, 120, 240, 1920]
    assert RETRY_DELAY_CAP == 3600
    assert retry.delay_after(7) == retry.delay_after(20) == 3600  # not 364 days before the last try
    assert RetrySpec(delay=7200, backoff=2).delay_after(5) == 7200  # a longer delay asked for is kept


def test_a_huge_backoff_neither_overflows_nor_turns_a_zero_delay_into_nan() -> None:
    assert RetrySpec(delay=1, backoff=1e10).delay_after(40) == 3600  # 1e10 ** 39 overflows a float
    assert RetrySpec(delay=0, backoff=1e300).delay_after(1000) == 0
    assert RetrySpec(delay=5, backoff=1).delay_after(10**6) == 5
