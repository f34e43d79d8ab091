"""Model URIs: `models:/name`, `models:/name/3`, `models:/name@champion`, and their short CLI forms."""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyloop.errors import SpecError

__all__ = ["ModelRef", "check_alias", "check_name", "names_version", "parse_model_ref"]

SCHEME = "models:/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
LATEST = "latest"
"""The alias every model has implicitly: its newest version (it cannot be set)."""


def check_name(name: str) -> str:
    """`name` if it is a valid model name, else a `SpecError` naming the rule."""
    if not _NAME.fullmatch(name):
        raise SpecError(f"model name {name!r} is invalid: use letters, digits, '_', '.', '-' (at most 200), "
                        "starting with a letter or digit")
    return name


def check_alias(alias: str) -> str:
    """`alias` if it is a valid alias, else a `SpecError` naming the rule."""
    if not _ALIAS.fullmatch(alias):
        raise SpecError(f"alias {alias!r} is invalid: use letters, digits, '_', '.', '-', starting with a letter "
                        "or '_' (so that it never reads as a version number)")
    return alias


@dataclass(frozen=True)
class ModelRef:
    """A reference to one version of a model: by number, by alias, or the latest when both are None."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        """The canonical `models:/` URI."""
        if self.version is not None:
            return f"{SCHEME}{self.name}/{self.version}"
        if self.alias is not None:
            return f"{SCHEME}{self.name}@{self.alias}"
        return f"{SCHEME}{self.name}"

    def __str__(self) -> str:
        return self.uri


def names_version(text: str) -> bool:
    """Whether a (valid) model reference names one version (`/3`, `@alias`, `@latest`, `/latest`), not the model.

    `parse_model_ref` reads `NAME@latest` as plain `NAME`; this tells the two apart where it matters
    (`models show` lists a model's versions but shows one version in full).
    """
    ref = parse_model_ref(text)
    return ref.version is not None or ref.alias is not None or text.strip().removeprefix(SCHEME).lstrip("/") != ref.name


def parse_model_ref(text: str) -> ModelRef:
    """Parse `models:/name[/version|@alias]` or the short form `name[/version|@alias]`."""
    body = text.strip()
    fix = "write models:/NAME, models:/NAME/VERSION or models:/NAME@ALIAS"
    if not body.startswith(SCHEME) and _OTHER_SCHEME.match(body):
        # `runs:/...`, `s3://...` or `models:name` would otherwise read as an invalid model name.
        raise SpecError(f"model reference {text!r} is not a {SCHEME} URI; {fix}")
    body = body.removeprefix(SCHEME)
    if body.startswith("/"):
        body = body.lstrip("/")
    if "@" in body:
        name, _, alias = body.partition("@")
        check_name(name)
        if alias == LATEST:
            return ModelRef(name)
        return ModelRef(name, alias=check_alias(alias))
    if "/" in body:
        name, _, version = body.partition("/")
        check_name(name)
        if version == LATEST:
            return ModelRef(name)
        if not (version.isascii() and version.isdigit()) or int(version) < 1:
            raise SpecError(f"model reference {text!r}: version {version!r} must be a number >= 1; {fix}")
        return ModelRef(name, version=int(version))
    if not body:
        raise SpecError(f"model reference {text!r} names no model; {fix}")
    return ModelRef(check_name(body))
