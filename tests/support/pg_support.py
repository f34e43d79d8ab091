"""A throwaway PostgreSQL server on 127.0.0.1 for tests (importable as `pg_support`)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PgCluster", "pg_bindir"]


def pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl") and shutil.which("postgres"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(os.access(Path(folder, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """A throwaway PostgreSQL cluster. PostgreSQL refuses to run as root, so as root we run it as nobody."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="skyloop-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            self.prefix = [runuser, "-u", "nobody", "--"] if runuser else ["su", "nobody", "-s", "/bin/sh", "-c"]
            os.chown(self.dir, *nobody_ids())

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / args[0]), *args[1:]]
        # `su -c` takes one shell command line; `runuser --` (or nothing, when not root) the argv itself.
        command = [*self.prefix, shlex.join(argv)] if self.prefix[:1] == ["su"] else [*self.prefix, *argv]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F"  # -F: no fsync, a test server
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "start", "-w", "-t", "30")

    def restart(self) -> None:
        """Stop and start the server on its port again: every open connection breaks."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "restart", "-m", "fast",
                  "-w", "-t", "30")

    def stop(self) -> None:
        result = self._run("pg_ctl", "-D", str(self.data), "stop", "-m", "fast", "-w", "-t", "20", check=False)
        pid_file = self.data / "postmaster.pid"
        if result.returncode != 0 and pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no server log)"


def nobody_ids() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid
