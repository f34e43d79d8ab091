"""Map domain errors to one line and an exit code (tracebacks only with --debug)."""

from __future__ import annotations

from skyloop.errors import (
    AuthError,
    BackendError,
    Conflict,
    ModelLoadError,
    NotFound,
    SkyloopError,
    SpecError,
    StepFailed,
    StoreError,
)

__all__ = ["EXIT_CODES", "exit_code"]

EXIT_CODES: dict[type[SkyloopError], int] = {
    SpecError: 2,
    NotFound: 3,
    Conflict: 4,
    StepFailed: 5,
    StoreError: 6,
    BackendError: 7,
    AuthError: 8,
    ModelLoadError: 9,
}


def exit_code(exc: SkyloopError) -> int:
    """The exit code for an error (1 for anything not listed)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
