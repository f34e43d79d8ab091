"""What `skyloop run` and `pipeline graph` show while they work: progress in CI logs and on a short terminal, the
whole DAG however deep, JSON alone on stdout whatever the steps write, and what Ctrl-C did to the run."""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests_support import write

WAITING = '''
import os, subprocess, sys, time
from skyloop import pipeline, step

print("module-level print")
os.write(1, b"module-level fd write\\n")

def _wait(marker: str) -> None:
    open(marker + ".started", "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)

@step
def first(n: int) -> int:
    return n + 1

@step
def hold(n: int, marker: str) -> int:
    _wait(marker)
    return n

@step
def noisy(n: int) -> int:
    subprocess.run(["echo", "from a child process"], check=True)
    os.write(1, b"raw fd write\\n")
    print("python print")
    return n

@pipeline
def waits(marker: str, n: int = 1):
    return {"v": hold(first(n), marker)}

@pipeline
def talks(n: int = 1):
    return {"v": noisy(first(n))}

LENGTH = 40

@pipeline
def chain(marker: str = "m"):
    x = first(1)
    for i in range(LENGTH):
        x = hold(x, marker) if i == 30 else first(x)
    return {"v": x}
'''


SLOW_IMPORT = '''
import time
from pathlib import Path
from skyloop import pipeline, step

Path(__file__).with_name("imported").touch()
time.sleep(30)

@step
def one(n: int) -> int:
    return n

@pipeline
def p(n: int = 1):
    return {"v": one(n)}
'''


def _popen(cli_env: dict[str, str], cwd: Path, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "skyloop", *args], cwd=cwd, env=cli_env, text=True,
                            **kwargs)  # type: ignore[call-overload]


def _wait_for(path: Path, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{what} never happened"
        assert proc.poll() is None, f"the command ended before {what}"
        time.sleep(0.02)


def _ctrl_c_after(marker: Path, proc: subprocess.Popen[str], what: str) -> tuple[str, str]:
    """Once `marker` exists, Ctrl-C the process group as a terminal does; its stdout and stderr once it ended."""
    try:
        _wait_for(marker, proc, what)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _chain_steps(text: str) -> list[str]:
    """The step names a `pipeline graph` tree shows, one per line, in order."""
    found = []
    for line in text.splitlines():
        words = re.sub(r"[│├└─]", " ", line).split()
        if words and re.fullmatch(r"(first|hold)(-\d+)?", words[0]):
            found.append(words[0])
    return found


@pytest.mark.parametrize("columns", [80, 120])
def test_graph_tree_shows_every_step_of_a_long_chain(cli, cli_env: dict[str, str], tmp_path: Path,
                                                     columns: int) -> None:
    write(tmp_path / "w.py", WAITING)
    cli_env["COLUMNS"] = str(columns)
    shown = cli("pipeline", "graph", "w.py:chain")
    assert shown.returncode == 0, shown.stderr
    expected = ["first", *(f"first-{i}" for i in range(2, 32)), "hold", *(f"first-{i}" for i in range(32, 41))]
    assert _chain_steps(shown.stdout) == expected  # every one, once, in order (Rich drew none past 16 levels)
    assert "(after first-" in shown.stdout and "continued from above" in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) <= columns


def test_graph_tree_file_shows_every_step_of_a_very_long_chain(cli, tmp_path: Path) -> None:
    write(tmp_path / "w.py", WAITING.replace("LENGTH = 40", "LENGTH = 120"))
    wrote = cli("pipeline", "graph", "w.py:chain", "-o", "dag.txt")
    assert wrote.returncode == 0, wrote.stderr
    text = (tmp_path / "dag.txt").read_text()
    assert len(_chain_steps(text)) == 121  # the file's 200 columns held 47 levels, and the rest was dropped
    assert text.splitlines()[-1].strip()  # no trail of blank lines where steps were


@pytest.mark.parametrize("backend", ["inline", "local"])
def test_run_json_is_alone_on_stdout_whatever_the_pipeline_writes_to_fd_1(cli, tmp_path: Path, backend: str) -> None:
    write(tmp_path / "w.py", WAITING)
    ran = cli("run", "w.py:talks", "--backend", backend, "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["status"] == "SUCCEEDED"
    # Written at import (in this process, whatever the backend): to stderr, not lost.
    assert "module-level print" in ran.stderr and "module-level fd write" in ran.stderr
    if backend == "inline":  # a step run in this process, from a child process and at the fd level
        assert "from a child process" in ran.stderr and "raw fd write" in ran.stderr
    plain = cli("run", "w.py:talks", "--backend", backend)  # without --json, stdout is the user's as before
    assert plain.returncode == 0 and "module-level fd write" in plain.stdout


def test_ctrl_c_says_the_run_was_cancelled_and_resume_finishes_it(cli, cli_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    write(tmp_path / "w.py", WAITING)
    marker = tmp_path / "m"
    proc = _popen(cli_env, tmp_path, "run", "w.py:waits", "-p", f"marker={marker}", "--backend", "inline",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out, err = _ctrl_c_after(Path(f"{marker}.started"), proc, "the step's start")
    assert proc.returncode == 130
    said = re.search(r"interrupted: run ([0-9a-f]{32}) cancelled; finish it with: skyloop run --resume (\w+)", err)
    assert said and said.group(1) == said.group(2), err
    run_id = said.group(1)
    assert f"run {run_id}: RUNNING" in out  # the id was on stdout from the start too
    assert json.loads(cli("runs", "show", run_id, "--json").stdout)["status"] == "CANCELLED"
    Path(f"{marker}.go").touch()
    resumed = cli("run", "--resume", run_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "SUCCEEDED"


def test_ctrl_c_before_the_run_starts_says_interrupted(cli_env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "slow_import.py", SLOW_IMPORT)
    proc = _popen(cli_env, tmp_path, "run", "slow_import.py:p", "--backend", "inline",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out, err = _ctrl_c_after(tmp_path / "imported", proc, "the import")
    assert proc.returncode == 130
    assert err.strip() == "interrupted" and out == ""


def _lines(stream: object) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_log_progress_shows_the_run_id_and_each_step_as_it_starts(cli_env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "w.py", WAITING)
    marker = tmp_path / "m"
    proc = _popen(cli_env, tmp_path, "run", "w.py:waits", "-p", f"marker={marker}", "--backend", "inline",
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines, seen = _lines(proc.stdout), list[str]()
        while not any("hold: RUNNING" in line for line in seen):
            seen.append(lines.get(timeout=60))
        # All while `hold` still waits: a CI log shows what runs now, not only what has ended.
        assert not Path(f"{marker}.go").exists()
        seen = [line for line in seen if not line.startswith("module-level")]  # the pipeline's own prints
        assert re.fullmatch(r"run [0-9a-f]{32}: RUNNING\n", seen[0]), seen
        assert [line.strip() for line in seen[1:]] == ["first: RUNNING (0/1)", "first: SUCCEEDED (1/1)",
                                                       "hold: RUNNING (0/1)"]
        Path(f"{marker}.go").touch()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_live_view_on_a_short_terminal_keeps_the_running_step_in_view(cli_env: dict[str, str], home: Path,
                                                                     tmp_path: Path) -> None:
    write(tmp_path / "w.py", WAITING)
    marker = tmp_path / "m"
    cli_env.update(LINES="20", COLUMNS="100", TERM="xterm")
    master, slave = pty.openpty()
    proc = _popen(cli_env, tmp_path, "run", "w.py:chain", "-p", f"marker={marker}", "--backend", "inline",
                  stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    drawn = bytearray()

    def pump() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        _wait_for(Path(f"{marker}.started"), proc, "the held step's start")
        time.sleep(1.0)  # several redraws at 8 a second
        live = drawn.decode(errors="replace")
        Path(f"{marker}.go").touch()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        os.close(master)
    frames = live.split("run ")[1:]  # each redraw starts with the table's title
    # Rich cut the table at the terminal's height: the running step, 32nd of 41, was below the cut.
    running = [f for f in frames if re.search(r"hold\s*│\s*RUNNING", f)]
    assert running, live[-3000:]
    assert re.search(r"(…|\.\.\.) 28 more steps: 28 SUCCEEDED", running[0]), running[0]  # the oldest made way
    # Every frame fits the 20 rows, so Rich never cut one (it ended a cut one with a line of "...").
    assert all(f.count("\n") < 20 and "\n..." not in f.replace(" ", "") for f in frames)
    # Drawn on the terminal while an inline step ran, not into the step's log (where `sys.stdout` points then).
    assert not [log for log in home.rglob("*.log") if "┏" in log.read_text()]
