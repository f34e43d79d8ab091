"""What a `local` attempt may use: its own GPUs, and memory up to its request plus a margin.

`GpuPool` hands out device ids; the backend puts them in the step's `CUDA_VISIBLE_DEVICES`. Unless
`gpu_ids` names them, the ids are those of the `CUDA_VISIBLE_DEVICES` this process was started with
(Slurm, a container runtime or a GPU-sharing wrapper may have given it only some), else `0..n-1`.
`MemoryWatch` samples the resident memory of one running attempt (its worker and every process the
step started) so that the backend can kill it when it passes its limit. On Linux a sample reads a
few small files under /proc (tens of microseconds); elsewhere it asks psutil, which is slower.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterable, Sequence

import psutil

from skyloop.config import ExecutionSettings
from skyloop.errors import BackendError
from skyloop.execution.procworker import descendants, read_small
from skyloop.spec.resources import format_memory

__all__ = ["DEVICES_VAR", "GpuPool", "MemoryWatch", "resident"]

DEVICES_VAR = "CUDA_VISIBLE_DEVICES"
"""The variable that names the GPUs a step may use (CUDA binds its devices from it once, at first use)."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class GpuPool:
    """The device ids a backend hands out, each to one attempt at a time."""

    def __init__(self, ids: Sequence[int]) -> None:
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise BackendError(f"gpu_ids must be distinct device numbers >= 0, got {list(ids)}")
        self.ids = tuple(ids)
        self._free = set(ids)

    @classmethod
    def from_settings(cls, settings: ExecutionSettings) -> GpuPool:
        """`gpu_ids` (the first `max_gpus` of them, if that is set too), else `max_gpus` ids.

        Those are the first `max_gpus` of the devices that this process's own `CUDA_VISIBLE_DEVICES`
        names, when it has one (the devices given to it, in its order), else `0..max_gpus-1`. Without
        `max_gpus` nor `gpu_ids` the pool is empty, whatever the variable says.
        """
        if settings.gpu_ids is None:
            count = settings.max_gpus or 0
            given = os.environ.get(DEVICES_VAR)
            if not count or given is None:
                return cls(range(count))
            ids = _given_ids(given)
            if count > len(ids):
                raise BackendError(
                    f"max_gpus is {count} but this process was started with {DEVICES_VAR}={given!r}, which "
                    f"gives it {len(ids)} GPU(s); lower max_gpus, or set gpu_ids to the devices to hand out")
            return cls(ids[:count])
        if settings.max_gpus is not None and settings.max_gpus > len(settings.gpu_ids):
            raise BackendError(f"max_gpus is {settings.max_gpus} but gpu_ids names only {settings.gpu_ids}")
        return cls(settings.gpu_ids[:settings.max_gpus])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def available(self) -> int:
        """How many ids are free."""
        return len(self._free)

    def pick(self, count: int, warm: Iterable[str | None] = ()) -> tuple[int, ...] | None:
        """`count` free ids, without taking them; `None` while fewer are free.

        `warm` lists the `CUDA_VISIBLE_DEVICES` of idle workers: a free set among them is chosen
        first, so that the launch can reuse that warm worker (it is pinned to its devices).
        """
        if count > len(self._free):
            return None
        for devices in warm:
            ids = _parse(devices)
            if ids is not None and len(ids) == count and self._free.issuperset(ids):
                return ids
        return tuple([i for i in self.ids if i in self._free][:count])

    def take(self, ids: Iterable[int]) -> None:
        """Mark `ids` (from `pick`) as in use."""
        self._free.difference_update(ids)

    def give_back(self, ids: Iterable[int]) -> None:
        """Return ids taken before."""
        self._free.update(ids)


def _given_ids(given: str) -> tuple[int, ...]:
    """The device numbers in a `CUDA_VISIBLE_DEVICES` value, read as CUDA does: up to the first that is
    not a valid number (`-1` hides all of them); device UUIDs are refused (the pool hands out numbers)."""
    ids: list[int] = []
    for part in given.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            if not part:
                break
            raise BackendError(
                f"this process was started with {DEVICES_VAR}={given!r}, which names a device by {part!r}; "
                f"the local backend hands out device numbers: set gpu_ids to those of the GPUs it may use")
        if part.startswith("-"):
            break
        if int(part) in ids:
            raise BackendError(f"this process was started with {DEVICES_VAR}={given!r}, which names device "
                               f"{int(part)} twice; set gpu_ids to the devices to hand out")
        ids.append(int(part))
    return tuple(ids)


def _parse(devices: str | None) -> tuple[int, ...] | None:
    if not devices:
        return None
    try:
        return tuple(int(part) for part in devices.split(","))
    except ValueError:
        return None


class MemoryWatch:
    """The resident memory of one running attempt, checked against `request * (1 + margin)`.

    Usage is the worker's resident size *above its idle baseline* (measured while the worker waited
    for this task, so the interpreter and what earlier tasks left imported do not count; never below
    0, should the step free what earlier tasks left), plus the
    resident size of every descendant process. Forked children share their parent's pages
    copy-on-write and resident sizes count those once per process; so when the sum passes the limit
    and there are descendants, it is measured again with their proportional set sizes (PSS, a page
    shared by n processes counts 1/n), which costs milliseconds, hence only then. A descendant
    whose parent exited is adopted by the worker (a child subreaper, on Linux) and still counted.
    Each attempt counts only its own processes: the worker ends what an attempt left running before
    it reports the attempt's end (see `skyloop.execution.procworker.end_leftovers`).
    """

    def __init__(self, pid: int, request: int, margin: float, baseline: int) -> None:
        self.pid = pid
        self.request = request
        self.margin = margin
        self.limit = int(request * (1 + margin))
        """Bytes of usage above which the attempt is killed."""
        self.baseline = baseline
        self.last = 0
        """Usage at the latest sample, in bytes."""
        self.peak = 0
        """Largest usage sampled."""
        self._seen: list[int] = []
        self._statm: int | None = None
        with contextlib.suppress(OSError):
            self._statm = os.open(f"/proc/{pid}/statm", os.O_RDONLY)  # a pread costs a fraction of an open
        self._oom_kills = _oom_kills()

    def check(self) -> str | None:
        """Sample now; the error to report if the attempt is over its limit, else `None`."""
        own = self._own()
        if own is None:
            return None  # the worker is gone: its end shows on its sentinel
        kids = descendants(self.pid)
        # A worker that shrank below its baseline (a step freed what an earlier one cached) must not
        # hide what its children use: its own part is clamped at 0 before they are added.
        growth = max(0, own - self.baseline)
        used = growth + sum(resident(pid) or 0 for pid in kids)
        if used > self.limit and kids:
            used = growth + sum(_proportional(pid) or 0 for pid in kids)
        self.last, self._seen = used, kids
        self.peak = max(self.peak, used)
        if used <= self.limit:
            return None
        return (f"used {_mi(used)}, over its memory request of {_size(self.request)} "
                f"(+{self.margin:.0%} margin = {_mi(self.limit)}); raise resources.memory")

    def kill_strays(self) -> None:
        """SIGKILL the descendants seen at the last sample: some may have left the process group."""
        for pid in self._seen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def killed_by_kernel(self) -> str | None:
        """If the kernel's OOM killer struck since the watch began, the error to report."""
        now = _oom_kills()
        if now is None or self._oom_kills is None or now <= self._oom_kills:
            return None
        return (f"killed by the kernel's out-of-memory killer (the machine or its cgroup ran out of "
                f"memory); it last used {_mi(self.last)} of its {_mi(self.limit)} limit")

    def close(self) -> None:
        """Release the file it keeps open; safe to repeat."""
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None

    def _own(self) -> int | None:
        if self._statm is None:
            return resident(self.pid)
        try:
            return int(os.pread(self._statm, 128, 0).split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return None


def resident(pid: int) -> int | None:
    """Resident set size of a process in bytes, `None` if it is gone."""
    if _has_proc():
        try:
            return int(read_small(f"/proc/{pid}/statm").split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _proportional(pid: int) -> int | None:
    try:
        text = read_small(f"/proc/{pid}/smaps_rollup")
        start = text.index(b"\nPss:")
        return int(text[start + 5:text.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        return resident(pid)


def _oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (Linux 4.13+)."""
    try:
        text = read_small("/proc/vmstat")
        start = text.index(b"\noom_kill ")
        return int(text[start + 10:text.index(b"\n", start + 1)])
    except (OSError, ValueError):
        return None


@functools.cache
def _has_proc() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/statm")


def _mi(n: int) -> str:
    return f"{round(n / 2**20)}Mi"


def _size(n: int) -> str:
    text = format_memory(n)
    return text if not text.isdigit() else _mi(n)
