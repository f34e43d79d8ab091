"""The closed loop of one deployment: log, watch, retrain on a trigger, gate, canary, promote.

Runs inside the deployment's runner (the controller process), next to its gateway:

1. the gateway logs answered inferences (`monitoring.payloads`); the loop writes them out every second;
2. every `drift.every` seconds it measures the serving version: drift of its recent inputs against the
   reference stored with the model (`monitoring.drift`), live quality from feedback joined by id, and
   the labelled rows since the last firing; results go to `drift_reports` and Prometheus gauges;
3. `monitoring.triggers` decides; a firing is a `loop.fired` event with its cause;
4. the retraining pipeline runs on the most recent labelled rows minus a holdout, and must register a
   new version of the model (found by the run's id); it gets the `challenger` alias;
5. the gate compares challenger and champion on the holdout (absolute and relative thresholds): a
   `loop.blessed` or `loop.rejected` event with both figures, and the verdict as tags on the version;
6. a blessed challenger is written as a new spec version: champion at 100%, challenger as a canary
   with the loop's steps; the deployment's analysis judges it and, on success, the `champion` alias
   moves. The cooldown starts when the rollout ends, promoted or rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from skyloop.deploy.analysis import SLACK, same_answer
from skyloop.deploy.spec import DeploymentSpec, GateSpec, LoopSpec, RolloutSpec, Strategy
from skyloop.errors import Conflict, SkyloopError
from skyloop.monitoring.drift_inputs import drift_inputs, masked_as
from skyloop.monitoring.payloads import (
    META,
    PayloadLog,
    UnwrittenPayloads,
    count_feedback,
    input_name,
    labelled,
    read_payloads,
)
from skyloop.monitoring.triggers import Firing, Signals, Triggers

if TYPE_CHECKING:
    import pandas as pd

    from skyloop.deploy.runner import DeploymentRunner
    from skyloop.registry.api import LoadedModel

__all__ = ["Loop", "gate_failures", "holdout_split"]

log = logging.getLogger("skyloop.deploy")

_LABELS = ("truth", "reward")
_PRUNE_EVERY = 3600.0
"""Seconds between deletions of drift reports past their retention."""
_ENDS = ("loop.finished", "loop.rejected", "loop.skipped", "loop.failed", "loop.stopped")
"""The events that end an iteration (its cooldown starts)."""


CHALLENGER = "challenger"
"""The predictor name of the model a loop rolls out (its canary's target)."""


def gate_failures(gate: GateSpec, champion: float, challenger: float) -> list[str]:
    """Why a challenger's holdout score fails the gate against the champion's (empty: it passes).

    The bounds hold as written (`>=`) despite float rounding: 0.85 passes `min_delta: 0.05` over 0.80.
    """
    failures = []
    if gate.min is not None and challenger < gate.min - SLACK:
        failures.append(f"challenger accuracy {challenger:.3f} < min {gate.min:g}")
    if challenger < champion + gate.min_delta - SLACK:
        failures.append(f"challenger accuracy {challenger:.3f} < champion {champion:.3f} + {gate.min_delta:g}")
    return failures


def holdout_accuracy(model: LoadedModel, rows: pd.DataFrame, truth: list[Any]) -> float:
    """The share of logged `rows` that `model` answers as `truth` says, given the rows and judged on its answers
    as the server and live quality do (`monitoring.replay`): not on the columns in the order clients sent them."""
    from skyloop.monitoring.replay import answered_rows, logged_inputs

    name = model.uri or model.name
    answer = model.predict(logged_inputs(rows, model.signature, name))
    hits = [same_answer(p, t) for p, t in zip(answered_rows(answer, model.signature, len(rows), name), truth,
                                              strict=True)]
    return sum(hits) / len(hits) if hits else 0.0


def holdout_split(data: pd.DataFrame, share: float, unseen_after: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labelled rows to train the challenger on, and `share` of them held out for the gate.

    The holdout is drawn only from rows answered after the champion was registered (`unseen_after`, unix
    time): it may have been trained on any row before (the loop's previous iteration trained it on them), and
    scored on its own training rows it would look better than it is and turn down better challengers. Every
    row not held out trains the challenger."""
    shuffled = data.sample(frac=1.0, random_state=len(data)).reset_index(drop=True)
    size = len(shuffled) - int(len(shuffled) * (1 - share))
    held = shuffled[shuffled["at"] > unseen_after].head(size)
    return shuffled.drop(index=held.index), held


def training_frame(train: pd.DataFrame, features: list[str], label: str) -> pd.DataFrame:
    """The retraining file: the model's inputs under their own names, and the labels as column `label`."""
    frame = train[features].rename(columns=input_name)
    if label in frame.columns:
        raise ValueError(f"the model has an input named {label!r}, the column the retraining data gives the labels "
                         "in: set loop.retrain.label_column to a name that is not an input")
    truths = train["truth"]
    kinds = sorted({type(t).__name__ for t in truths if t is not None})
    if len(kinds) > 1 and not set(kinds) <= {"int", "float", "bool"}:  # a parquet column holds one type
        raise ValueError(f"the labels are of mixed types ({', '.join(kinds)}), which one column of the retraining "
                         "data cannot hold: send every truth as one type (e.g. 1, not \"1\")")
    return frame.assign(**{label: truths.to_numpy()})


class Loop:
    """The loop of one deployment, driven by its runner's ticks."""

    def __init__(self, runner: DeploymentRunner, spec: LoopSpec) -> None:
        self.runner = runner
        self.spec = spec
        self.workspace = runner.controller.workspace
        self.payloads = PayloadLog(runner.name, self.workspace, spec.log)
        runner.gateway.payloads = self.payloads
        self.triggers = Triggers(spec.triggers, time.monotonic()) if spec.triggers else None
        self.phase = "watching"
        self.rollout_version = 0
        """The spec version this loop wrote for its canary (the rollout to follow once it is applied)."""
        self.task: asyncio.Task[None] | None = None
        self.write_failing = False
        self.writing = asyncio.Lock()
        """Held while logged inferences are written: a flush waits for a write in flight."""
        self.resumed = False
        """Whether the triggers took up the cooldown and schedule recorded before this loop started."""
        self.last_check = 0.0
        self.labelled_since = time.time()
        self.references: dict[str, pd.DataFrame | None] = {}
        self.last: dict[str, Any] = {}
        self.gauges = runner.gateway.metrics
        self.pruned_at: float | None = None
        """When old drift reports were last deleted (monotonic)."""
        self.gauged: str | None = None
        """The model version the drift and quality gauges are about (the serving one when last measured)."""
        name = runner.name
        self._name = name

    # -- ticking -------------------------------------------------------------------------------------------
    async def tick(self) -> None:
        """Write logs, follow a rollout in progress, and check the triggers when due."""
        if not self.resumed:
            self.resumed = True
            await asyncio.to_thread(self._resume_triggers)
        if self.payloads.due():
            await self._flush()
        now = time.monotonic()
        rollout = self.runner.rollout
        busy = rollout is not None and not rollout.done
        if self.phase == "watching" and busy and rollout is not None and rollout.target == CHALLENGER:
            # This loop's canary, taken up where it stood by a restarted controller: follow it to its end
            # (and its cooldown), never fire a second iteration over it.
            self.phase, self.rollout_version = "rolling_out", self.runner.applied
        if self.phase == "rolling_out" and self.runner.applied >= self.rollout_version and not busy:
            failed, why = self.runner.not_applied
            if failed == self.rollout_version:  # the rollout the runner goes on with is an earlier one, not ours
                outcome = f"the challenger's canary (spec version {failed}) was not applied: {why}"
            else:
                outcome = f"the challenger's rollout ended {rollout.phase.value if rollout else 'stopped'}"
            await self.runner.event("loop.finished", f"loop iteration over: {outcome}")
            self._idle(now)
        if now - self.last_check < self.spec.drift.every:
            return
        self.last_check = now
        said, noted = self.last.get("error"), self.last.get("unchecked")
        try:
            signals = await asyncio.to_thread(self.measure)  # measured in every phase, so gauges and reports go on
        except SkyloopError as exc:
            message = f"cannot measure drift and quality: {exc}"
            if said != message:
                await self.runner.event("loop.measure_failed", message)
            self.last = {"phase": self.phase, "error": message}
            return
        # Drift that cannot be measured (e.g. a new champion's reference lacks a feature the spec tests) is said
        # once, and the other conditions (quality, labelled rows, schedule) are still checked without it.
        if (error := self.last.get("error")) and error != said:
            await self.runner.event("loop.measure_failed", error)
        if (note := self.last.get("unchecked")) and note != noted:  # said once, as long as it stays the same
            await self.runner.event("loop.unchecked", f"drift leaves out {note}")
        if self.triggers is None or self.phase != "watching" or busy:  # not over a rollout in flight
            return
        firing = self.triggers.check(signals, now)
        if firing is not None:
            self.phase = "retraining"
            self.labelled_since = time.time()
            await self.runner.event("loop.fired", f"trigger fired: {firing.reason}", metrics=firing.cause)
            self.task = asyncio.create_task(self._iterate(firing))

    async def stop(self, why: str | None = None) -> None:
        """Stop: an iteration in flight ends where it is (a retraining run already begun finishes, but nothing of
        it is gated or rolled out), and the inferences logged and not yet written are written out."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait([self.task])
            if why is not None:
                await self.runner.event("loop.stopped", f"loop iteration stopped: {why}")
        await self._flush()

    async def _flush(self) -> None:
        """Write the logged inferences held now, once any write in flight is done; what a failed write leaves
        goes back to the log for the next one."""
        async with self.writing:
            batch = self.payloads.take()
            if not batch:
                return
            try:
                await asyncio.to_thread(self.payloads.write, batch)
            except UnwrittenPayloads as exc:
                self.payloads.give_back(exc.rest)
                if not self.write_failing:  # said once until a write succeeds again
                    log.warning("%s: %s; kept to write again", self._name, exc)
                self.write_failing = True
            else:
                self.write_failing = False

    def _resume_triggers(self) -> None:
        """Cooldown and schedule go on from the deployment's last firing and iteration end, as its events recorded
        them: a restarted controller, or a loop whose section changed, does not fire in the middle of a cooldown.
        Labelled rows are counted from that firing too (from the deployment's creation before any), not from
        this loop's start: a restart must not throw away the labels collected towards `labelled_rows`."""
        from skyloop.store.deployments import last_event_times

        with self.workspace.db.read() as session:
            last = last_event_times(session, self._name, ("loop.fired", *_ENDS),
                                    datetime.fromtimestamp(self.runner.created_at, UTC))
        fired = last.pop("loop.fired", None)
        self.labelled_since = fired.timestamp() if fired is not None else self.runner.created_at
        if fired is None or self.triggers is None:
            return
        end = max(last.values(), default=fired)
        now, wall = time.monotonic(), time.time()
        self.triggers.last_fired = now - (wall - fired.timestamp())
        self.triggers.idle_since = now - (wall - max(end, fired).timestamp())

    def _idle(self, now: float) -> None:
        self.phase = "watching"
        if self.triggers is not None:
            self.triggers.finished(now)

    def _since(self) -> float:
        """Where the logs that the checks read begin: `drift.horizon` ago, but never before the deployment was
        created (a deployment deleted and created again under the same name does not inherit the old one's logs)."""
        return max(time.time() - self.spec.drift.horizon, self.runner.created_at)

    def serving(self) -> str | None:
        """The model version (`name/version`) of the predictor with the most traffic."""
        weights = self.runner.gateway.weights
        live = [n for n in weights if n in self.runner.hosts and weights[n] > 0]
        if not live:
            return None
        rollout = self.runner.rollout
        target = rollout.target if rollout is not None and not rollout.done else None
        # At an even split (a canary's 50% step) the stable predictor is still the one serving.
        return self.runner.hosts[max(live, key=lambda n: (weights[n], n != target))].version

    # -- measuring -----------------------------------------------------------------------------------------
    def _reference(self, version: str) -> pd.DataFrame | None:
        if version not in self.references:
            from skyloop.registry.api import REFERENCE, materialize
            from skyloop.registry.registry import resolve
            from skyloop.registry.uri import parse_model_ref

            frame = None
            try:
                with self.workspace.db.read() as session:
                    info = resolve(session, parse_model_ref(f"models:/{version}"))
                path = materialize(self.workspace, info) / REFERENCE
                if path.exists():
                    import pandas as pd

                    frame = pd.read_parquet(path)
            except Exception as exc:  # no reference: drift is not measured, the rest goes on
                log.warning("%s: no reference data for %s: %s", self._name, version, exc)
            self.references[version] = frame
        return self.references[version]

    def measure(self) -> Signals:
        """Drift, quality and labelled rows of the serving version now (worker thread)."""
        from skyloop.monitoring.drift import detect_drift
        from skyloop.store.models import DriftReportRow
        from skyloop.store.runs import utcnow

        version = self.serving()
        if self.gauged is not None and version != self.gauged:  # a rollout ended: the old version's figures go
            self.gauges.forget_version(self._name, self.gauged)
        self.gauged = version
        since = self._since()
        new_rows = count_feedback(self.workspace, self._name, self.labelled_since)
        recent_feedback = count_feedback(self.workspace, self._name, since)
        quality, samples = self._quality(version, since) if recent_feedback else (None, 0)
        self.gauges.labelled_rows.labels(self._name).set(new_rows)
        drift: bool | None = None
        detail = error = ""
        reference = self._reference(version) if version is not None else None
        window: tuple[float, float] | None = None
        unchecked: dict[str, str] = {}
        if version is not None and reference is not None:
            recent = read_payloads(self.workspace, self._name, since=since, version=version,
                                   last=self.spec.drift.window)
            if len(recent) >= self.spec.drift.tests.min_rows:
                inputs = drift_inputs(reference, recent, self.spec.log.mask, self.spec.drift.tests,
                                      self.payloads.hashed)
                report = None
                if inputs is None:  # nothing to compare is no measure, not a measured absence of drift
                    names = [str(c) for c in reference.columns]
                    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                    error = (f"cannot measure drift: none of the features of the reference of {version} ({listed}) "
                             "is among the logged inputs")
                else:
                    unchecked = inputs.unchecked
                    try:
                        report = detect_drift(inputs.reference, inputs.current, inputs.tests)
                    except SkyloopError as exc:
                        error = f"cannot measure drift: {exc}"
                if report is not None and report.enough_data:
                    drift = report.dataset_drift
                    window = (float(recent["at"].min()), float(recent["at"].max()))
                    detail = f"{report.drifted}/{len(report.features)} features drift"
                    if untestable := [f.feature for f in report.features if not f.testable]:
                        detail += f" ({len(untestable)} not testable: {', '.join(untestable)})"
                    self.gauges.dataset_drift.labels(self._name, version).set(1.0 if drift else 0.0)
                    self.gauges.drift_share.labels(self._name, version).set(report.share)
                    for f in report.features:
                        self.gauges.feature_drift.labels(self._name, version, f.feature).set(f.statistic)
                    # The live quality measured with it rides along, for pictures of the history.
                    doc = {**report.to_dict(), "quality": quality, "quality_metric": self.spec.quality.metric,
                           "quality_samples": samples}
                    with self.workspace.db.session() as session:
                        session.add(DriftReportRow(deployment=self._name, version=version, at=utcnow(),
                                                   dataset_drift=bool(drift), share=report.share, report=doc))
                    self._prune_reports()
        self.last = {"version": version, "dataset_drift": drift, "drift": detail, "quality": quality,
                     "quality_samples": samples, "labelled_rows": new_rows, "phase": self.phase,
                     **({"error": error} if error else {}),
                     **({"unchecked": "; ".join(f"{k}: {v}" for k, v in unchecked.items())} if unchecked else {})}
        return Signals(drift, quality, new_rows, detail, samples, drift_window=window)

    def _prune_reports(self) -> None:
        """Delete this deployment's drift reports older than the retention (`monitoring.drift_report_days`),
        at the first check and then hourly: one row a check (17,280 a day at `every: 5s`) would grow forever."""
        now = time.monotonic()
        if self.pruned_at is not None and now - self.pruned_at < _PRUNE_EVERY:
            return
        from sqlalchemy import delete

        from skyloop.store.models import DriftReportRow

        self.pruned_at = now
        days = self.workspace.settings.monitoring.drift_report_days
        cutoff = datetime.fromtimestamp(time.time() - days * 86_400, UTC)
        with self.workspace.db.session() as session:
            session.execute(delete(DriftReportRow).where(DriftReportRow.deployment == self._name,
                                                         DriftReportRow.at < cutoff))

    def _quality(self, version: str | None, since: float) -> tuple[float | None, int]:
        if version is None:
            return None, 0
        rows = labelled(self.workspace, self._name, since=since, version=version, last=self.spec.quality.window)
        if self.spec.quality.metric == "mean_reward":
            rows = rows[rows["reward"].notna()]
            value = float(rows["reward"].mean()) if len(rows) else None
        else:
            rows = rows[rows["truth"].notna()]
            hits = [same_answer(p, t) for p, t in zip(rows["prediction"], rows["truth"], strict=True)]
            value = sum(hits) / len(hits) if hits else None
        if value is not None:
            self.gauges.live_quality.labels(self._name, version, self.spec.quality.metric).set(value)
        if len(rows) < self.spec.quality.min_samples:
            return None, len(rows)
        return value, len(rows)

    # -- one iteration ---------------------------------------------------------------------------------------
    async def _iterate(self, firing: Firing) -> None:
        try:
            await self._retrain_and_roll_out()
        except Exception as exc:
            log.exception("%s: loop iteration failed", self._name)
            await self.runner.event("loop.failed", f"loop iteration failed: {type(exc).__name__}: {exc}")
            self._idle(time.monotonic())

    async def _retrain_and_roll_out(self) -> None:
        retrain = self.spec.retrain
        assert retrain is not None
        champion = self.serving()
        await self._flush()  # the answers the labels that fired it are about may still be held, unwritten
        # The most recent `rows` labels, however long they took to come (not only those of the drift horizon, which
        # a slow labelling rate would keep below `min_rows` at every firing, so that it never retrained).
        since = self.runner.created_at
        if retrain.fresh:
            since = time.time()
            await self.runner.event("loop.collecting", f"waiting for {retrain.min_rows} rows labelled after the "
                                                       "firing (fresh data)")
            deadline = time.monotonic() + retrain.wait
            while time.monotonic() < deadline:
                got = await asyncio.to_thread(labelled, self.workspace, self._name, since)
                if got["truth"].notna().sum() >= retrain.min_rows:  # rewards alone train nothing
                    break
                await asyncio.sleep(1.0)
        data = await asyncio.to_thread(labelled, self.workspace, self._name, since, None, retrain.rows)
        data = data[data["truth"].notna()]
        if len(data) < retrain.min_rows or champion is None:
            why = "no predictor serves traffic: no champion to retrain against" if champion is None else \
                f"{len(data)} labelled rows, {retrain.min_rows} needed to retrain; waiting for more feedback"
            await self.runner.event("loop.skipped", why)
            self._idle(time.monotonic())
            return
        features = [c for c in data.columns if c not in (*META, *_LABELS)]
        if hashed := [input_name(c) for c in features if masked_as(c, self.spec.log.mask) == "hash"]:
            # A challenger trained on hashes gets the clients' values once served, and the gate would score both
            # models on hashes: no iteration can come of such logs (an input masked with drop is not in them).
            await self.runner.event("loop.failed", f"cannot retrain on the logs: {', '.join(map(repr, hashed))} "
                                                   "masked with hash in loop.log.mask, so logged as hashes, not the "
                                                   "values the model takes; mask it with drop (then it is not in "
                                                   "the retraining data) or not at all")
            self._idle(time.monotonic())
            return
        registered = await asyncio.to_thread(self._registered_at, champion)
        train, holdout = holdout_split(data, retrain.holdout, registered)
        if holdout.empty:
            await self.runner.event("loop.skipped", f"none of {len(data)} labelled rows was answered after "
                                                    f"{champion} was registered, the only rows the gate can judge it "
                                                    "on; waiting for more feedback")
            self._idle(time.monotonic())
            return
        folder = self.runner.folder / "loop"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"train-{int(time.time())}.parquet"
        train_frame = training_frame(train, features, retrain.label_column)
        await asyncio.to_thread(train_frame.to_parquet, path, index=False)
        await self.runner.event("loop.retraining", f"running {retrain.pipeline} on {len(train)} labelled rows "
                                                   f"({len(holdout)} held out for the gate)")
        run = await asyncio.to_thread(self._run_pipeline, str(path))
        if run.status != "SUCCEEDED":
            await self.runner.event("loop.failed", f"retraining run {run.id} {run.status}: {run.error}")
            self._idle(time.monotonic())
            return
        challenger = await asyncio.to_thread(self._registered_by, run.id)
        if challenger is None:
            await self.runner.event("loop.failed", f"retraining run {run.id} registered no version of "
                                                   f"{retrain.model!r}")
            self._idle(time.monotonic())
            return
        blessed, figures = await asyncio.to_thread(self._gate, champion, challenger, holdout, features)
        figures["run_id"] = run.id
        if not blessed:
            await self.runner.event("loop.rejected", f"{challenger} not rolled out: {figures['reason']}",
                                    metrics=figures)
            self._idle(time.monotonic())
            return
        await self.runner.event("loop.blessed", f"{challenger} blessed: {figures['reason']}", metrics=figures)
        # The canary is written over the spec as it is now, and only if nobody changed it in between: a rollout
        # applied while it retrained (or a spec version not yet applied) is the user's, and is never replaced.
        rollout = self.runner.rollout
        try:
            if rollout is not None and not rollout.done:
                raise Conflict(f"the rollout of {rollout.target!r} applied while it retrained is in progress")
            version = await asyncio.to_thread(self._apply_canary, champion, challenger, self.runner.applied)
        except Conflict as exc:
            await self.runner.event("loop.skipped", f"{challenger} blessed but not rolled out: {exc}")
            self._idle(time.monotonic())
            return
        self.rollout_version = version
        self.phase = "rolling_out"
        await self.runner.event("loop.rollout", f"spec version {version}: {challenger} as a canary against "
                                                f"{champion}")

    def _run_pipeline(self, data_path: str) -> Any:
        from skyloop.deploy.replicas import absolute_ref
        from skyloop.execution.api import run

        retrain = self.spec.retrain
        assert retrain is not None
        target = absolute_ref(retrain.pipeline, self.runner.spec.base_dir)
        params = {**retrain.params, retrain.data_param: data_path}
        return run(target, params, backend=retrain.backend, settings=self.runner.controller.settings)

    def _registered_at(self, version: str) -> float:
        from skyloop.registry.registry import resolve
        from skyloop.registry.uri import parse_model_ref

        with self.workspace.db.read() as session:
            at = resolve(session, parse_model_ref(f"models:/{version}")).created_at
        return at.timestamp()  # the DB's datetimes come back timezone-aware (UTC)

    def _registered_by(self, run_id: str) -> str | None:
        from sqlalchemy import select

        from skyloop.registry.registry import set_alias
        from skyloop.store.models import ModelRow, ModelVersionRow

        retrain = self.spec.retrain
        assert retrain is not None
        with self.workspace.db.session() as session:
            row = session.execute(
                select(ModelVersionRow.version).join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
                .where(ModelRow.name == retrain.model, ModelVersionRow.run_id == run_id)
                .order_by(ModelVersionRow.version.desc())).first()
            if row is None:
                return None
            set_alias(session, retrain.model, self.spec.challenger_alias, int(row[0]))
            return f"{retrain.model}/{row[0]}"

    def _gate(self, champion: str, challenger: str, holdout: pd.DataFrame,
              features: list[str]) -> tuple[bool, dict[str, Any]]:
        from skyloop.registry.api import load_model
        from skyloop.registry.registry import set_tags
        from skyloop.registry.uri import parse_model_ref

        settings = self.runner.controller.settings
        truth = holdout["truth"].tolist()
        scores = {}
        for label, version in (("champion", champion), ("challenger", challenger)):
            scores[label] = holdout_accuracy(load_model(f"models:/{version}", settings), holdout[features], truth)
        gate = self.spec.gate
        reasons = gate_failures(gate, scores["champion"], scores["challenger"])
        blessed = not reasons
        reason = "; ".join(reasons) if reasons else (
            f"accuracy {scores['challenger']:.3f} vs champion {scores['champion']:.3f} on {len(holdout)} held-out "
            "labelled rows")
        figures = {"metric": gate.metric, **scores, "holdout_rows": len(holdout), "min": gate.min,
                   "min_delta": gate.min_delta, "champion_version": champion, "challenger_version": challenger,
                   "champion_live": self.last.get("quality"), "blessed": blessed, "reason": reason}
        with self.workspace.db.session() as session:
            set_tags(session, parse_model_ref(f"models:/{challenger}"),
                     {"blessed": str(blessed).lower(), "gate.challenger": f"{scores['challenger']:.4f}",
                      "gate.champion": f"{scores['champion']:.4f}"})
        return blessed, figures

    def _apply_canary(self, champion: str, challenger: str, over: int) -> int:
        from skyloop.store import deployments as store

        spec = self.runner.spec
        template = next(p for p in spec.predictors if p.name == self._champion_name(spec))
        predictors = [
            template.model_copy(update={"name": "champion", "model_uri": f"models:/{champion}", "graph": None,
                                        "traffic": 100.0, "shadow": 0.0}),
            template.model_copy(update={"name": CHALLENGER, "model_uri": f"models:/{challenger}", "graph": None,
                                        "traffic": 0.0, "shadow": 0.0}),
            *(p for p in spec.predictors if p.shadow),
        ]
        rollout = RolloutSpec(strategy=Strategy.CANARY, target=CHALLENGER, steps=self.spec.steps,
                              promote_alias=self.spec.champion_alias)
        new = DeploymentSpec.model_validate({**spec.model_dump(), "predictors": [p.model_dump() for p in predictors],
                                            "rollout": rollout.model_dump()})
        with self.workspace.db.session() as session:
            version, _ = store.apply_deployment(session, self._name, new.model_dump(mode="json"), over=over)
        return version

    def _champion_name(self, spec: DeploymentSpec) -> str:
        weights = self.runner.gateway.weights
        live = [p.name for p in spec.predictors if not p.shadow and p.name in weights]
        return max(live, key=lambda n: weights.get(n, 0.0)) if live else spec.predictors[0].name

    def describe(self) -> dict[str, Any]:
        """For status: the phase, the last measurements and the firings."""
        return {"phase": self.phase, **self.last, "logged": self.payloads.logged,
                "cooldown_left": round(self.triggers.cooling(time.monotonic()), 1) if self.triggers else None,
                "firings": [{"reason": f.reason} for f in self.triggers.history] if self.triggers else []}
