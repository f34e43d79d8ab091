"""Parsing model URIs and their short forms."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from skyloop.errors import SpecError
from skyloop.registry.uri import ModelRef, check_alias, check_name, parse_model_ref


@pytest.mark.parametrize(("text", "expected"), [
    ("models:/iris", ModelRef("iris")),
    ("models:/iris/3", ModelRef("iris", version=3)),
    ("models:/iris@champion", ModelRef("iris", alias="champion")),
    ("models:/iris@latest", ModelRef("iris")),
    ("models:/iris/latest", ModelRef("iris")),
    ("iris/12", ModelRef("iris", version=12)),
    ("iris@challenger", ModelRef("iris", alias="challenger")),
    ("my-model.v2", ModelRef("my-model.v2")),
])
def test_references_parse(text: str, expected: ModelRef) -> None:
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("ref", [ModelRef("a"), ModelRef("a", version=2), ModelRef("a", alias="x")])
def test_uris_round_trip(ref: ModelRef) -> None:
    assert parse_model_ref(ref.uri) == ref


@pytest.mark.parametrize("text", ["models:/", "models:/iris/0", "models:/iris/x", "iris@3", "iris@", "bad name",
                                  "models:/a/b/c", "-iris", "models:/iris/²"])
def test_bad_references_are_spec_errors(text: str) -> None:
    with pytest.raises(SpecError):
        parse_model_ref(text)


@pytest.mark.parametrize(("check", "text"), [(check_name, "iris\n"), (check_alias, "champion\n"),
                                             (check_name, "iris\nx"), (check_alias, " champion")])
def test_names_and_aliases_with_a_line_break_or_space_are_spec_errors(check: Callable[[str], str], text: str) -> None:
    with pytest.raises(SpecError):
        check(text)


@pytest.mark.parametrize("text", ["runs:/0a1b/model", "models:iris", "s3://bucket/iris", "model:/iris/1"])
def test_another_scheme_is_named_as_not_a_models_uri(text: str) -> None:
    # Not "model name 'runs:' is invalid": the user wrote a URI, of a kind the registry does not read.
    with pytest.raises(SpecError, match=r"is not a models:/ URI; write models:/NAME"):
        parse_model_ref(text)
