"""Small helpers shared by tests (importable as `tests_support`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["write"]


def write(path: Path, text: str) -> Path:
    """Write dedented text (without the leading newline) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path
