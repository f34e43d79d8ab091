"""Step functions that the backend tests run by file path (`StepRef(module=<this file>, ...)`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def add(a: int, b: int) -> int:
    return a + b


def noop() -> None:
    return None


def pid() -> int:
    return os.getpid()


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def chatty(text: str) -> str:
    print(f"print {text}")
    print(f"stderr {text}", file=sys.stderr)
    sys.stdout.flush()
    os.write(1, f"fd1 {text}\n".encode())
    subprocess.run(["echo", f"child {text}"], check=True)
    return text


def boom() -> None:
    raise ValueError("boom from step")


def leave(code: int) -> None:
    os._exit(code)


def exit_(code: int) -> None:
    sys.exit(code)


def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def sleep_with_child(seconds: float, pid_file: str) -> None:
    child = subprocess.Popen(["sleep", str(seconds)])
    with open(pid_file, "w") as fh:
        fh.write(str(child.pid))
    time.sleep(seconds)


def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):  # touch every page so it is resident
        block[i] = 1
    return len(block)


def sleep_writing_pid(seconds: float, pid_file: str) -> None:
    with open(pid_file, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)


def chdir(path: str) -> str:
    os.chdir(path)
    return os.getcwd()


def cwd() -> str:
    return os.getcwd()


def identity(value: object) -> object:
    return value
