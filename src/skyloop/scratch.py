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

__all__ = ["PREFIX", "Scratch", "disown", "sweep"]

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
        self.parent = dir if dir is not None else tempfile.gettempdir()
        if self.parent not in _swept:
            _swept.add(self.parent)
            sweep(self.parent)
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=self.parent)
        self._owner = os.getpid()
        self._fd: int | None = None
        claiming = os.path.join(self.path, f"{LOCK}.new")
        try:
            self._fd = os.open(claiming, os.O_CREAT | os.O_RDWR, 0o600)  # not inherited by exec
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a file system without locks: an unlocked folder, which no sweep removes
                os.close(self._fd)
                self._fd = None
                os.unlink(claiming)
                return
            os.rename(claiming, os.path.join(self.path, LOCK))
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def remove(self) -> None:
        """Delete the folder and let go of its lock, then sweep its parent again (the folders of a process killed
        moments before this one started were still held by its workers then); in a forked child, nothing (the
        folder is its parent's)."""
        if os.getpid() != self._owner or not os.path.isdir(self.path):
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        sweep(self.parent)


def disown(folder: str) -> None:
    """Make `folder` one that no sweep removes (a scratch folder given to a process as its own, by a user)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, LOCK))


def sweep(parent: str) -> list[str]:
    """Remove the scratch folders under `parent` whose process is gone (their lock is free); the paths removed."""
    removed: list[str] = []
    candidates: list[str] = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):  # one that went meanwhile (a server stopping)
                if entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False) \
                        and entry.stat(follow_symlinks=False).st_uid == os.getuid():  # only this user's
                    candidates.append(entry.path)
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
