"""Temporary folders of a process (a server's metrics and relay sockets, a model's private copy) that do not
outlive it, even when it is killed.

A process removes its folders when it stops. One that is SIGKILLed (the OOM killer, `kill -9`, a supervisor
out of patience) cannot, and a model copy can be as large as the model. So each folder holds a lock file
that its process, and the workers it forks (they share the open file), keep locked while they live; the
next process that makes one removes, in the same temporary folder, every skyloop folder whose lock it can
take. A lock rather than a pid: pids are reused, and a server in another PID namespace sharing /tmp looks
dead by its pid while it serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile

__all__ = ["PREFIX", "Scratch", "sweep"]

PREFIX = "skyloop-"
"""Every scratch folder's name starts with it (and its kind: `skyloop-metrics-`, `skyloop-relay-`, ...)."""
LOCK = ".skyloop-owner"
"""The lock file in each folder. It appears under this name only once locked, so a sweep never takes the
lock of a folder whose process is still making it."""

_swept: set[str] = set()
"""The temporary folders this process has swept (once is enough: orphans are made by processes that died)."""


class Scratch:
    """A fresh folder under `dir` (default: the temporary folder) named `skyloop-{kind}-...`, locked while this
    process and its forked children live; `remove` (by the process that made it) deletes it."""

    def __init__(self, kind: str, dir: str | None = None) -> None:
        parent = dir if dir is not None else tempfile.gettempdir()
        if parent not in _swept:
            _swept.add(parent)
            sweep(parent)
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=parent)
        self._owner = os.getpid()
        claiming = os.path.join(self.path, f"{LOCK}.new")
        self._fd: int | None = os.open(claiming, os.O_CREAT | os.O_RDWR, 0o600)  # not inherited by exec
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(claiming, os.path.join(self.path, LOCK))

    def remove(self) -> None:
        """Delete the folder and let go of its lock; in a forked child, nothing (the folder is its parent's)."""
        if os.getpid() != self._owner or self._fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)
        self._fd = None


def sweep(parent: str) -> list[str]:
    """Remove the scratch folders under `parent` whose process is gone (their lock is free); the paths removed."""
    removed: list[str] = []
    candidates: list[str] = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        candidates = [e.path for e in entries if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)
                      and e.stat(follow_symlinks=False).st_uid == os.getuid()]  # only this user's
    for path in candidates:
        try:
            fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not a scratch folder (or an older one): not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: its process (or one of its workers) lives
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
