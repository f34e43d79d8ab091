"""What every `--json` prints, and user text made safe to show in a terminal."""

from __future__ import annotations

import json
import math
import re
from datetime import date, datetime
from typing import Any

__all__ = ["json_text", "print_json", "printable"]


def _plain(value: Any) -> Any:
    """`value` with datetimes as ISO 8601 strings and NaN/±Infinity as null: JSON any parser reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int):
        return value
    return str(value)


def json_text(doc: Any) -> str:
    """`doc` as strict JSON (no NaN or Infinity, which `json.loads` elsewhere and `jq` refuse), indented."""
    return json.dumps(_plain(doc), indent=2, allow_nan=False)


def print_json(doc: Any) -> None:
    """Print `doc` as strict JSON on stdout, and nothing else."""
    print(json_text(doc))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters (ESC of a colour code, a bell, a carriage return) shown as `\\x1b` etc.

    Run and step errors are user data: printed raw, an escape sequence recolours or rewrites the user's terminal
    (whatever NO_COLOR says), and lands as bytes in a file that stdout was sent to.
    """
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
