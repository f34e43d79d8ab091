"""Resource requests: nothing negative or infinite gets in, and the error names the field."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from skyloop import PipelineSpec, Resources, SpecError
from skyloop.spec.files import validate


@pytest.mark.parametrize(("fields", "where"), [
    ({"custom": {"license": -1}}, "custom.license"),
    ({"custom": {"license": math.nan}}, "custom.license"),
    ({"memory": math.inf}, "memory"),
    ({"memory": math.nan}, "memory"),
    ({"cpus": -1}, "cpus"),
])
def test_a_bad_request_is_refused_naming_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as err:
        Resources(**fields)
    assert [".".join(map(str, e["loc"])) for e in err.value.errors()] == [where]


def test_a_negative_custom_resource_in_a_spec_names_the_task_and_resource() -> None:
    data = {"name": "p", "tasks": [{"name": "a", "step": {"module": "m", "qualname": "f"},
                                    "resources": {"custom": {"license": 1, "seat": -2}}}]}
    with pytest.raises(SpecError, match=r"tasks\.0\.resources\.custom\.seat: Input should be greater than or equal "
                                        r"to 0"):
        validate(PipelineSpec, data, "pipeline spec")


def test_custom_resources_of_zero_or_more_are_kept() -> None:
    assert Resources(custom={"license": 0, "seat": 2.5}).custom == {"license": 0.0, "seat": 2.5}
