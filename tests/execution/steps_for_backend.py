"""Step functions that the backend tests run by file path (`StepRef(module=<this file>, ...)`)."""

from __future__ import annotations

import os
import signal
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


def say_then_leave(text: str, code: int) -> None:
    print(text, flush=True)
    os._exit(code)


def say_then_sleep(text: str, seconds: float) -> None:
    print(text, flush=True)
    time.sleep(seconds)


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


def hold(megabytes: int, seconds: float) -> int:
    """Allocate and touch `megabytes`, then keep them for `seconds`."""
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(seconds)
    return len(block)


_HOLD_IN_CHILD = """
import sys, time
block = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(float(sys.argv[2]))
"""


def hold_in_child(megabytes: int, seconds: float, pid_file: str, new_session: bool = False) -> int:
    """Start a child process that allocates `megabytes` and sleeps (in its own session if asked); wait."""
    child = subprocess.Popen([sys.executable, "-c", _HOLD_IN_CHILD, str(megabytes), str(seconds)],
                             start_new_session=new_session)
    with open(pid_file, "w") as fh:
        fh.write(str(child.pid))
    return child.wait()


def hold_then_fork(megabytes: int, children: int, seconds: float) -> int:
    """Allocate `megabytes`, then fork children that share it copy-on-write and sleep."""
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            time.sleep(seconds)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return len(block)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def devices(seconds: float) -> tuple[str | None, float, float]:
    """This attempt's CUDA_VISIBLE_DEVICES and when it held them (wall clock)."""
    start = time.time()
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()
