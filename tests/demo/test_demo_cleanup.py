"""`skyloop demo` leaves nothing behind: no process after Ctrl-C or SIGTERM, no deployment for the next demo in
the same home to inherit; it says when its first model came from the cache, and shows progress in a pipe."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from skyloop.config import Settings
from skyloop.demo.run import DEPLOYMENT, Agents, Demo, demo_spec
from skyloop.demo.world import World
from skyloop.errors import NotFound
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace


def recorder() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False, color_system=None), out


def tree(pid: int) -> list[psutil.Process]:
    """`pid` and every process under it."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def deployed(settings: Settings) -> bool:
    """Whether the demo's deployment is in the DB."""
    workspace = Workspace.open(settings)
    try:
        with workspace.db.read() as session:
            store.get_deployment(session, DEPLOYMENT)
        return True
    except NotFound:
        return False
    finally:
        workspace.close()


def test_the_first_model_says_when_it_came_from_the_cache(settings: Settings) -> None:
    for expected in ("trained and registered models:/agent/1", "models:/agent/1, trained before in this home"):
        console, out = recorder()
        demo = Demo(settings, console)
        try:
            demo.train_first_model()
        finally:
            demo.workspace.close()
        assert expected in out.getvalue()


def test_progress_shows_stages_and_events_as_lines_where_no_live_view_can_be_drawn(settings: Settings) -> None:
    console, out = recorder()
    demo = Demo(settings, console)
    try:
        with demo.workspace.db.session() as session:
            store.apply_deployment(session, DEPLOYMENT, demo_spec())
        agents = Agents("http://127.0.0.1:9/v2/models/agent", World())
        with demo.progress(agents) as show:
            show("baseline")
            show("baseline")
            # Printed as it happens, not when the view closes.
            text = out.getvalue()
            assert "baseline" in text and "applied: spec version 1 applied" in text
            assert "0 requests (0 errors, 0 labels)" in text
        text = out.getvalue()
        assert text.count("applied: spec version 1 applied") == 1 and text.count("baseline") == 1
    finally:
        demo.workspace.close()


@pytest.mark.integration
def test_stop_after_the_controller_died_first_removes_the_deployment_at_once(settings: Settings) -> None:
    demo = Demo(settings, recorder()[0])
    procs: list[psutil.Process] = []
    try:
        demo.train_first_model()
        demo.start_controller()
        demo.deploy()
        assert demo.controller is not None
        procs = tree(demo.controller.pid)
        # Ctrl-C reaches the whole process group: the controller and its replicas end before the demo cleans up.
        # One busy retraining when it came ended without releasing its lease: as killed, a zombie until reaped.
        for proc in procs[1:]:
            proc.send_signal(signal.SIGINT)
        procs[0].kill()
        deadline = time.monotonic() + 30
        while psutil.Process(demo.controller.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the controller did not end"
            time.sleep(0.1)
        started = time.monotonic()
        demo.stop()
        assert time.monotonic() - started < 10  # not the delete's whole timeout, waiting on a dead controller
        assert not deployed(settings)  # the next demo in this home starts from nothing
    finally:
        kill_all(procs)


@pytest.mark.integration
def test_a_deployment_an_earlier_demo_left_is_removed_before_deploying(settings: Settings) -> None:
    first = Demo(settings, recorder()[0])
    procs: list[psutil.Process] = []
    try:
        first.train_first_model()
        first.start_controller()
        first.deploy()
        assert first.controller is not None
        # The demo and all it started are killed outright: the deployment stays in the DB.
        procs = tree(first.controller.pid)
        kill_all(procs)
        first.controller.wait()
        first.workspace.close()
        assert deployed(settings)

        console, out = recorder()
        second = Demo(settings, console)
        try:
            second.start_controller()
            assert second.controller is not None
            second.deploy()
            procs = tree(second.controller.pid)
            kinds = [e.kind for e in second.history() if e.at.timestamp() >= second.started]
            # Deleted first, then applied afresh: not the old deployment, with its loop's state, taken up again.
            assert "deleted" in kinds and kinds.index("deleted") < kinds.index("applied"), kinds
            assert second.info().spec_version == 1
            assert "removed the deployment 'agent' an earlier demo left" in out.getvalue()
        finally:
            second.stop()
        assert not deployed(settings)
    finally:
        kill_all(procs)


@pytest.mark.integration
def test_sigterm_stops_everything_the_demo_started(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env.update(COLUMNS="160", NO_COLOR="1", PYTHONUNBUFFERED="1")
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-m", "skyloop", "--home", str(home), "demo", "--baseline", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    procs: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "deployed agent at" in line:
                break
        assert any("deployed agent at" in line for line in lines), "".join(lines)
        procs = tree(proc.pid)[1:]
        assert procs  # the controller and the replica
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert not deployed(Settings.for_home(home))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(procs)


@pytest.mark.integration
def test_a_demo_killed_outright_leaves_no_process_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLOOP_")}
    env.update(COLUMNS="160", NO_COLOR="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "skyloop", "--home", str(tmp_path / "home"), "demo",
                             "--baseline", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    procs: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "deployed agent at" in line:
                break
        procs = tree(proc.pid)[1:]
        assert procs  # the controller and the replica
        proc.kill()  # no clean-up can run: before, the controller and its replica served on for good
        proc.communicate(timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(procs)
