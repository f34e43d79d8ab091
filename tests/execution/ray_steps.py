"""Step functions that the Ray backend tests run by file path (`StepRef(module=<this file>, ...)`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def add(a: int, b: int) -> int:
    return a + b


def big(n: int) -> list[int]:
    return list(range(n))  # too large to travel inline: stored as a blob file


def chatty(text: str) -> str:
    print(f"print {text}")
    print(f"stderr {text}", file=sys.stderr)
    sys.stdout.flush()
    os.write(1, f"fd1 {text}\n".encode())
    subprocess.run(["echo", f"child {text}"], check=True)
    return text


def boom() -> None:
    raise ValueError("boom from step")


def exit_(code: int) -> None:
    sys.exit(code)


def interrupt() -> None:
    raise KeyboardInterrupt("from the step")


def leave(code: int) -> None:
    os._exit(code)


def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def chdir(path: str) -> str:
    os.chdir(path)
    return os.getcwd()


def cwd() -> str:
    return os.getcwd()


def type_of(value: object) -> str:
    return type(value).__name__


def child_sleep(seconds: float) -> str:
    """Waits on a child process: Ray's force-cancel kills the child first, and the step goes on to return."""
    done = subprocess.run(["sleep", str(seconds)], check=False)
    return f"child exit code {done.returncode}"
