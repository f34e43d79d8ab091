"""`skyloop demo`: the whole loop on this machine, in about two minutes.

1. train the agent's first model with a pipeline (local worker processes) and register it as `champion`;
2. deploy it behind a gateway, with a `loop` section: payload logging, drift and quality checks, triggers,
   fresh-data retraining, a gate and a canary;
3. drive simulated agent traffic with delayed feedback (labels arrive a second after the answer);
4. shift what the agent sees: the drift and the drop in live accuracy are detected, the loop retrains on
   fresh labelled logs, the gate blesses the challenger, the canary passes, the alias moves;
5. write a report (PNG and HTML: accuracy, traffic split, drift, which version served when).

A live view shows it happening. Everything is real: SQLite, the artifact folder, a controller process,
replica processes and HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from skyloop.config import Settings
from skyloop.demo.world import FEATURES, World
from skyloop.errors import BackendError, NotFound
from skyloop.store import deployments as store
from skyloop.store.workspace import Workspace

if TYPE_CHECKING:
    from skyloop.monitoring.report import LoopReport

__all__ = ["DEPLOYMENT", "Demo", "demo_spec"]

DEPLOYMENT = "agent"
THRESHOLD = 0.8
DRIFT = 0.2


def demo_spec(steps_seconds: float = 8.0) -> dict[str, Any]:
    """The demo's deployment: one champion, the closed loop, and the canary its challengers go through."""
    return {
        "name": DEPLOYMENT,
        "predictors": [{"name": "champion", "model_uri": "models:/agent@champion", "replicas": 1, "traffic": 100}],
        "analysis": {"interval": "2s", "min_samples": 30, "failure_limit": 1,
                     "metrics": [{"name": "error_rate", "max": 0.02}, {"name": "accuracy", "max_drop": 0.05}]},
        "loop": {
            # Windows of 600 rows tested from 400 on, threshold 0.2 rather than Evidently's 0.1: the sampling
            # noise of the distance between a few hundred rows and a small reference alone comes near 0.1.
            "drift": {"window": 600, "every": "2s",
                      "tests": {"min_rows": 400, "features": {f: {"test": "wasserstein", "threshold": DRIFT}
                                                              for f in FEATURES}}},
            "quality": {"metric": "accuracy", "window": 150, "min_samples": 60},
            "triggers": {"on": [{"drift": True}, {"quality_below": THRESHOLD}], "mode": "any", "debounce": 2,
                         "cooldown": "60s"},
            "retrain": {"pipeline": "skyloop.demo.pipeline:train_agent", "model": "agent", "fresh": True,
                        "min_rows": 500, "rows": 1500, "holdout": 0.3, "backend": "local"},
            "gate": {"min": THRESHOLD, "min_delta": 0.05},
            "steps": [{"weight": 30, "duration": steps_seconds}, {"weight": 60, "duration": steps_seconds}],
        },
    }


@dataclass
class Answer:
    """One answered request as the simulated agents saw it."""

    at: float
    version: str
    correct: bool


@dataclass
class Agents:
    """Simulated agents: `clients` loops sending observations at `rate` per second, labels `delay` s later."""

    url: str
    world: World
    rate: float = 60.0
    clients: int = 6
    delay: float = 1.0
    answers: deque[Answer] = field(default_factory=lambda: deque(maxlen=200_000))
    requests: int = 0
    errors: int = 0
    feedback: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="demo-agents", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    async def _main(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            pending: set[asyncio.Task[None]] = set()
            await asyncio.gather(*(self._agent(session, pending) for _ in range(self.clients)))
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def _agent(self, session: Any, pending: set[asyncio.Task[None]]) -> None:
        import aiohttp

        interval = self.clients / self.rate
        while not self._stop.is_set():
            started = time.monotonic()
            x = self.world.observe(1)
            truth = int(self.world.truth(x)[0])
            body = {"inputs": [{"name": f, "shape": [1], "datatype": "FP64", "data": [float(x[0, i])]}
                               for i, f in enumerate(FEATURES)]}
            self.requests += 1
            try:
                async with session.post(f"{self.url}/infer", json=body) as resp:
                    doc = await resp.json(content_type=None)
                    ok = resp.status == 200
                    version = resp.headers.get("skyloop-model-version", "")
            except (TimeoutError, aiohttp.ClientError):
                ok, doc, version = False, {}, ""
            if not ok:
                self.errors += 1
            else:
                label = int(doc["outputs"][0]["data"][0])
                self.answers.append(Answer(time.time(), version, label == truth))
                task = asyncio.create_task(self._label(session, doc["id"], truth))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _label(self, session: Any, inference_id: str, truth: int) -> None:
        await asyncio.sleep(self.delay)
        with contextlib.suppress(Exception):
            async with session.post(f"{self.url}/feedback", json={"id": inference_id, "truth": truth}) as resp:
                if resp.status == 200:
                    self.feedback += 1

    def accuracy(self, since: float, version: str | None = None) -> tuple[float | None, int]:
        """Accuracy of the answers given after `since` (of one version, if given)."""
        recent = [a for a in list(self.answers) if a.at >= since and (version is None or a.version == version)]
        if not recent:
            return None, 0
        return sum(a.correct for a in recent) / len(recent), len(recent)

    def shares(self, since: float) -> dict[str, float]:
        """Percent of answers per version after `since`."""
        recent = [a.version for a in list(self.answers) if a.at >= since]
        return {v: 100.0 * recent.count(v) / len(recent) for v in sorted(set(recent))} if recent else {}


class Demo:
    """Runs the story; `run()` returns True when the retrained model serves everything, accurately."""

    def __init__(self, settings: Settings, console: Console, baseline: float = 20.0, limit: float = 170.0) -> None:
        self.settings = settings
        self.console = console
        self.baseline = baseline
        self.limit = limit
        self.world = World(seed=11)
        self.started = time.time()
        self.events: list[tuple[float, str, str]] = []
        self.accuracy: list[tuple[float, str, float]] = []
        self.traffic: list[tuple[float, dict[str, float]]] = []
        self.shifted_at: float | None = None
        self.controller: subprocess.Popen[bytes] | None = None
        self.workspace = Workspace.open(settings)

    # -- steps ---------------------------------------------------------------------------------------------
    def train_first_model(self) -> str:
        from skyloop.execution.api import run
        from skyloop.registry.registry import set_alias

        with self.console.status("training the first model (pipeline on local worker processes) ..."):
            result = run("skyloop.demo.pipeline:train_agent", {"data": "", "rows": 3000, "seed": 7},
                         backend="local", settings=self.settings)
        if result.status != "SUCCEEDED":
            raise BackendError(f"the training run {result.id} {result.status}: {result.error}")
        uri = str(result.outputs["uri"])
        version = int(uri.rsplit("/", 1)[1])
        with self.workspace.db.session() as session:
            set_alias(session, "agent", "champion", version)
        # A demo run before in this home trained the same model on the same data: every step is a cache hit.
        if result.steps["train"].state == "CACHED":
            self.console.print(f"[green]✓[/] {uri}, trained before in this home (run {result.id[:8]}: every step a "
                               "cache hit), alias champion")
        else:
            self.console.print(f"[green]✓[/] trained and registered {uri} (run {result.id[:8]}), alias champion")
        return uri

    def start_controller(self) -> None:
        log = self.settings.home / "deployments" / "controller.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # A demo killed outright (SIGKILL, its terminal closed) cannot clean up: its controller then stops by itself,
        # and the replicas with it (the deployment row stays, for the next demo to remove).
        argv = [sys.executable, "-m", "skyloop", "--home", str(self.settings.home), "deploy", "controller",
                "--exit-with-parent", "--parent-pid", str(os.getpid())]
        with open(log, "ab") as out:
            self.controller = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def deploy(self) -> str:
        from skyloop.deploy.api import apply_deployment, delete_deployment

        if self._deployment_exists():
            # Left by a demo that could not clean up (killed, or its machine stopped): applied over, its loop
            # would go on from where it stood, on the old payload logs, and fire before the world shifts.
            with self.console.status("removing the deployment an earlier demo left ..."):
                delete_deployment(self.settings, DEPLOYMENT, timeout=60)
            self.console.print(f"[green]✓[/] removed the deployment {DEPLOYMENT!r} an earlier demo left")
        with self.console.status("deploying: gateway, replica, loop ..."):
            info = apply_deployment(demo_spec(), self.settings, start=False, timeout=120)
        url = f"{info.state['gateway']}/v2/models/{DEPLOYMENT}"
        self.console.print(f"[green]✓[/] deployed {DEPLOYMENT} at {url}")
        return url

    def stop(self) -> None:
        """Delete the deployment and stop the controller: nothing of the demo runs after it, nor stays applied."""
        from skyloop.deploy.api import delete_deployment

        controller = self.controller
        if controller is None:  # it stopped before deploying: nothing of this demo's to delete
            self.workspace.close()
            return
        # poll() reaps a controller that died first (Ctrl-C reaches the whole process group): unreaped, its pid
        # still answers, it looks alive, and a delete would wait its whole timeout for it to act.
        if controller.poll() is None:
            with contextlib.suppress(Exception):
                delete_deployment(self.settings, DEPLOYMENT, wait=False)
            deadline = time.monotonic() + 30
            while self._deployment_exists() and controller.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        if controller.poll() is None:
            controller.send_signal(signal.SIGTERM)
            try:
                controller.wait(timeout=30)
            except subprocess.TimeoutExpired:
                controller.kill()
                controller.wait()
        # What a controller that is gone did not remove: with none running, a delete only drops the rows, and the
        # next demo in this home starts from nothing.
        with contextlib.suppress(NotFound, BackendError):
            delete_deployment(self.settings, DEPLOYMENT, timeout=5)
        self.workspace.close()

    def _deployment_exists(self) -> bool:
        try:
            self.info()
        except NotFound:
            return False
        return True

    # -- watching ------------------------------------------------------------------------------------------
    def info(self) -> store.DeploymentInfo:
        with self.workspace.db.read() as session:
            return store.get_deployment(session, DEPLOYMENT)

    def history(self) -> list[store.DeploymentEvent]:
        with self.workspace.db.read() as session:
            return store.deployment_history(session, DEPLOYMENT)

    def sample(self, agents: Agents) -> None:
        now = time.time()
        t = now - self.started
        for version in agents.shares(now - 3):
            acc, n = agents.accuracy(now - 3, version)
            if acc is not None and n >= 10:
                self.accuracy.append((t, version, acc))
        shares = agents.shares(now - 2)
        if shares:
            self.traffic.append((t, shares))

    def view(self, agents: Agents, stage: str) -> Panel:
        info = self.info()
        state = info.state
        loop = state.get("loop") or {}
        now = time.time()
        table = Table(box=None, show_header=False)
        table.add_row("elapsed", f"{now - self.started:5.0f} s   world: "
                      + ("[red]shifted[/]" if self.world.shifted else "[green]as trained[/]"), )
        table.add_row("stage", stage)
        table.add_row("requests", f"{agents.requests}  (errors {agents.errors}, labels {agents.feedback})")
        acc, n = agents.accuracy(now - 5)
        table.add_row("accuracy (5 s)", "-" if acc is None else f"{acc:.3f} over {n} answers")
        table.add_row("traffic", "  ".join(f"{v} {s:.0f}%" for v, s in agents.shares(now - 2).items()))
        table.add_row("status", f"{info.status}: {info.reason}"[:110])
        drift = loop.get("dataset_drift")
        table.add_row("drift", "-" if drift is None
                      else ("[red]DRIFT[/] " if drift else "none ") + loop.get("drift", ""))
        quality = loop.get("quality")
        table.add_row("live quality", "-" if quality is None else f"{quality:.3f} (loop's view, from feedback)")
        table.add_row("loop", str(loop.get("phase", "-")))
        events = Table("t", "event", "why", box=None)
        for e in [e for e in self.history() if e.at.timestamp() >= self.started][-7:]:
            events.add_row(f"{e.at.timestamp() - self.started:5.0f}", e.kind, e.reason[:90])
        return Panel(Group(table, events), title="skyloop demo: the closed loop", border_style="cyan")

    def done(self) -> bool:
        if self.shifted_at is None:
            return False
        # History outlives a deleted deployment: only this demo's events count (a second demo in one home).
        promoted = [e for e in self.history() if e.kind == "loop.finished" and "Healthy" in e.reason
                    and e.at.timestamp() >= self.shifted_at]
        if not promoted:
            return False
        acc, n = self._agents_accuracy(8)
        return acc is not None and n >= 100 and acc >= THRESHOLD

    def _agents_accuracy(self, seconds: float) -> tuple[float | None, int]:
        return self.agents.accuracy(time.time() - seconds)

    @contextlib.contextmanager
    def progress(self, agents: Agents) -> Iterator[Callable[[str], None]]:
        """A function to call with the current stage, twice a second: it redraws the live view on a terminal;
        elsewhere (a pipe, a CI log, where a live view shows nothing until it ends) it prints each new stage and
        event as a line, and the figures every 10 s."""
        if self.console.is_terminal:
            with Live(self.view(agents, "baseline"), console=self.console, refresh_per_second=4) as live:
                yield lambda stage: live.update(self.view(agents, stage))
            return
        shown: set[int] = set()
        last_stage, last_figures = "", 0.0

        def show(stage: str) -> None:
            nonlocal last_stage, last_figures
            now = time.time()
            for e in self.history():
                if e.at.timestamp() >= self.started and e.id not in shown:
                    shown.add(e.id)
                    self.console.print(f"{e.at.timestamp() - self.started:5.0f} s  {e.kind}: {e.reason}",
                                       highlight=False, markup=False)
            if stage != last_stage:
                self.console.print(f"{now - self.started:5.0f} s  [bold]{stage}[/]", highlight=False)
                last_stage = stage
            if now - last_figures >= 10:
                last_figures = now
                acc, n = agents.accuracy(now - 5)
                traffic = ", ".join(f"{v} {s:.0f}%" for v, s in agents.shares(now - 2).items()) or "-"
                self.console.print(f"{now - self.started:5.0f} s  {agents.requests} requests ({agents.errors} errors, "
                                   f"{agents.feedback} labels); accuracy (5 s) "
                                   f"{'-' if acc is None else f'{acc:.3f} over {n}'}; traffic {traffic}",
                                   highlight=False, markup=False)

        yield show

    @contextlib.contextmanager
    def _sigterm_cleans_up(self) -> Iterator[None]:
        """Turn SIGTERM into the KeyboardInterrupt of a Ctrl-C, so that `run()` still stops what it started
        (Python's default for SIGTERM ends the process at once, leaving the controller and its replicas running)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def interrupt(signum: int, _frame: FrameType | None) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM is not held up by the clean-up
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    # -- the story -----------------------------------------------------------------------------------------
    def run(self) -> bool:
        self.console.rule("skyloop demo")
        with self._sigterm_cleans_up():
            return self._run()

    def _run(self) -> bool:
        from skyloop.monitoring.report import render_report

        try:
            self.train_first_model()
            self.start_controller()
            url = self.deploy()
            self.agents = Agents(url, self.world)
            self.agents.start()
            deadline = self.started + self.limit
            with self.progress(self.agents) as show:
                phase_end = time.time() + self.baseline
                while time.time() < phase_end:
                    time.sleep(0.5)
                    self.sample(self.agents)
                    show("baseline: the model sees what it was trained on")
                before, _ = self._agents_accuracy(self.baseline - 2)
                self.world.shifted = True
                self.shifted_at = time.time()
                self.events.append((self.shifted_at - self.started, "shift", "the world shifts: x0 +3, x3 +1.5"))
                while not self.done() and time.time() < deadline:
                    time.sleep(0.5)
                    self.sample(self.agents)
                    show("shifted: detect, retrain, gate, canary, promote")
                tail = time.time() + 6
                while time.time() < tail and time.time() < deadline:
                    time.sleep(0.5)
                    self.sample(self.agents)
                    show("after the loop")
            after, _ = self._agents_accuracy(6)
            self.agents.stop()
            ok = self.done()
            report = self._report(before, after)
            png, html = render_report(report, self.settings.home / "demo")
            self._summary(ok, before, after, png, html)
            return ok
        finally:
            if getattr(self, "agents", None) is not None:
                self.agents.stop()
            self.stop()

    def _report(self, before: float | None, after: float | None) -> LoopReport:
        from skyloop.deploy.picture import EVENT_KINDS, drift_series
        from skyloop.monitoring.report import LoopReport

        drift, _ = drift_series(self.workspace, DEPLOYMENT, self.started)
        events = [*self.events, *[(e.at.timestamp() - self.started, EVENT_KINDS.get(e.kind, e.kind), e.reason)
                                  for e in self.history() if e.at.timestamp() >= self.started]]
        final = self.traffic[-1][1] if self.traffic else {}
        summary = {"final model": ", ".join(f"{v} ({s:.0f}%)" for v, s in final.items()),
                   "accuracy before the shift": _fmt(before), "accuracy at the end": _fmt(after),
                   "requests": f"{self.agents.requests} ({self.agents.errors} errors)",
                   "duration": f"{time.time() - self.started:.0f} s"}
        return LoopReport(title="skyloop demo: drift, retraining, gate, canary", started_at=self.started,
                           accuracy=self.accuracy, accuracy_threshold=THRESHOLD, traffic=self.traffic, drift=drift,
                           drift_threshold=DRIFT, drift_statistic="normed Wasserstein distance",
                           events=sorted(events), summary=summary)

    def _summary(self, ok: bool, before: float | None, after: float | None, png: Path, html: Path) -> None:
        table = Table("", "", box=None, show_header=False)
        for e in self.history():
            if e.at.timestamp() < self.started:
                continue
            if e.kind.startswith("loop.") or e.kind in ("promoted", "rolled_back", "alias_moved"):
                table.add_row(f"{e.at.timestamp() - self.started:5.0f} s  {e.kind}", e.reason[:120])
        self.console.print(table)
        self.console.print(f"accuracy before the shift {_fmt(before)}, at the end {_fmt(after)}; "
                           f"{self.agents.requests} requests, {self.agents.errors} errors; "
                           f"{time.time() - self.started:.0f} s")
        self.console.print(f"report: {png}\n        {html}")
        if ok:
            self.console.print("[bold green]the retrained model serves 100% and accuracy is back above "
                               f"{THRESHOLD}[/]")
        else:
            self.console.print("[bold red]the loop did not finish in time[/]; see `skyloop deploy history agent` and "
                               f"{self.settings.home / 'deployments'}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
