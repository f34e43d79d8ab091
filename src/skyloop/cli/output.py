"""What every `--json` prints, and user text made safe to show in a terminal."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

__all__ = ["json_text", "print_json", "printable", "stdout_kept_for_json"]


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


@contextlib.contextmanager
def stdout_kept_for_json(keep: bool = True) -> Iterator[None]:
    """With `keep`, send all that is written to stdout in the block to stderr, so that the JSON printed after it is
    the only thing on stdout.

    At the file-descriptor level: a step run in this process (or a module it imports) writes there not only with
    `print` but from C code (LightGBM, XGBoost), child processes (`git`, `pip`) and `os.write(1, ...)`, and any
    of them made `run --json` invalid JSON.
    """
    if not keep:
        yield
        return
    sys.stdout.flush()
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
        saved = os.dup(fd)  # not inheritable: child processes started in the block never get the real stdout
    except (AttributeError, OSError, ValueError):  # stdout or stderr is no file (a test's capture), or closed
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        sys.stderr.flush()
        os.dup2(err, fd)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()  # what `print` buffered in the block goes to stderr too
        os.dup2(saved, fd)
        os.close(saved)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters (ESC of a colour code, a bell, a carriage return) shown as `\\x1b` etc.

    Run and step errors are user data: printed raw, an escape sequence recolours or rewrites the user's terminal
    (whatever NO_COLOR says), and lands as bytes in a file that stdout was sent to.
    """
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
