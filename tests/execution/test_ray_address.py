"""`--ray-address` that names something other than a Ray cluster is refused at once, saying so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_support import RAY_ENV
from tests_support import reap, until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_an_address_where_an_http_server_answers_is_refused_at_once(tmp_path: Path) -> None:
    # Ray's dashboard (8265) is the address users confuse with the head's: TCP answers, Ray's GCS client then
    # retried for some 14 minutes before it gave up.
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        until(listening)
        (tmp_path / "one.py").write_text("from skyloop import pipeline, step\n\n@step\ndef one() -> int:\n"
                                         "    return 1\n\n@pipeline\ndef p():\n    return one()\n")
        started = time.monotonic()
        child = subprocess.run([sys.executable, "-m", "skyloop", "--home", str(tmp_path / "home"), "run", "one.py:p",
                                "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"],
                               cwd=tmp_path, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=120)
    finally:
        reap(server)
    assert child.returncode == 7, child.stdout + child.stderr
    assert f"127.0.0.1:{port}: what answers there is not a Ray cluster" in child.stderr, child.stderr
    assert time.monotonic() - started < 60
