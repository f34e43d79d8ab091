"""The run loop: drive one or many runs on one backend, launching what the scheduling policy picks.

All state that matters lives in the metadata DB; the in-memory view can be rebuilt from it, which is
what `resume` does after an orchestrator process was killed. Each turn: activate ready tasks of every
run, let the policy pick what fits, commit the RUNNING rows, launch, wait for ends.

A backend that queues work itself (Ray: `admission()` above its capacity) gets launches ahead of
what it runs, in batches: the orchestrator refills it once it has used up half of that slack, so
that one commit covers many launches. Turns that launch nothing commit what they learned at most
`FLUSH_SECONDS` later, and at once when the attempts whose ends wait ran for `FLUSH_SECONDS` in all
(and before a run's end, and with any launch unless as below): one killed in between loses those
ends, and resuming runs those attempts again, as it does the ones in flight. So beyond the work in
flight, a crash makes run again only attempts that took under `FLUSH_SECONDS` in all, and those
whose ends came in the turn it struck.

A turn's RUNNING rows are committed before its launches are submitted, except on a backend whose
attempts die with the process that submitted them (`attempts_die_with_driver`: Ray kills the tasks
of a dead owner). There launches go first and their rows are committed with the other writes, at
most `FLUSH_SECONDS` later (a group commit): a chain of short steps commits a batch of them at
once instead of paying a commit per step (about a millisecond of the driver's CPU, which on a small
machine the Ray worker running the step shares). An attempt that ends within that time has its
row inserted and ended in one transaction. An orchestrator killed before the commit leaves no row
for those attempts; their tasks die with it, and resuming runs those units again, as it runs again
the ones whose RUNNING rows it marks CRASHED. A commit that fails aborts the runs, cancelling what
was submitted.

On a backend that can (`submit_after`: Ray), a turn that leaves nothing waiting in the queue sends
the steps that wait only on an attempt it runs (and theirs, as far as admission goes) before that
attempt ends: see `skyloop.execution.lookahead`. Their rows are recorded when their upstream's end
is taken, as if they were launched then; one whose upstream did not succeed is forgotten.

On a backend that starts only so many attempts at once (`launch_limit`: the local backend's workers),
each launch takes one of those slots too, a resource the policy weighs with the others: what cannot
start waits in the policy's order, not first come first served in the backend (steps asking for a
fraction of a CPU, or none, were handed over in any number, and urgent work queued behind them).

An unexpected error in one run's bookkeeping fails that run alone (`_alone`); one that says the DB is
away is raised on (the agent hands every run back).
"""

from __future__ import annotations

import contextlib
import heapq
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from skyloop.config import Settings
from skyloop.errors import Conflict
from skyloop.execution.backends.base import Backend
from skyloop.execution.estimates import estimate_run, rank_together
from skyloop.execution.history import Prior, crash_orphans, load_prior
from skyloop.execution.leases import Heartbeat, db_unreachable, interrupts_held
from skyloop.execution.poolslots import POLL_SECONDS, PoolSlots
from skyloop.execution.recorder import Recorder
from skyloop.execution.runstate import Observer, Prepared, RunState
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.execution.units import Unit
from skyloop.scheduling.policy import Candidate, PolicyConfig, ReadyQueue
from skyloop.spec.resources import Resources
from skyloop.store.artifacts import ArtifactStore
from skyloop.store.db import Database
from skyloop.store.runs import (
    CANCELLED_BY_USER,
    ORCHESTRATOR_LOST,
    claim_run,
    create_run,
    disown_runs,
    process_owner,
    release_run,
)

__all__ = ["FLUSH_SECONDS", "LAUNCH_SLOTS", "Observer", "Orchestrator", "Prepared"]

FLUSH_SECONDS = 0.1
"""Longest a turn that launches nothing leaves its writes uncommitted."""

LAUNCH_SLOTS = "skyloop.launch-slots"
"""The resource each launch takes one of on a backend with a `launch_limit` (not one a user declares)."""


@dataclass
class _Entry:
    run: RunState
    unit: Unit
    candidate: Candidate = field(init=False)
    ahead_of: str | None = None
    """For an attempt sent ahead (see `skyloop.execution.lookahead`): its upstream's key, until its row is
    recorded; such an attempt never went through the policy's queue."""
    parked: TaskResult | None = None
    """Its end, when it came before the row was recorded."""
    dropped: bool = False
    """Sent ahead of an upstream that did not succeed: nothing is recorded of it, its end is ignored."""


class Orchestrator:
    """Drives runs to their ends on one backend; `skyloop run` holds one run, `skyloop agent` many."""

    def __init__(self, settings: Settings, db: Database, store: ArtifactStore, backend: Backend,
                 observer: Observer | None = None) -> None:
        self.settings, self.db, self.store, self.backend = settings, db, store, backend
        self.observer = observer
        self.owner = process_owner()
        execution = settings.execution
        self.config = PolicyConfig(aging_seconds=execution.aging_seconds, pools=dict(execution.pools),
                                   fair_share_seconds=execution.fair_share_seconds)
        self.queue = ReadyQueue(self.config)
        self.slots = PoolSlots(db, self.owner, self.config)
        """The DB slots of limited pools (a pool's limit holds across every process on the DB)."""
        self.recorder = Recorder(db, owner=self.owner, lease_seconds=execution.lease_seconds)
        self.capacity = backend.capacity()
        node_capacities = getattr(backend, "node_capacities", None)
        self.nodes: list[Resources] | None = node_capacities() if node_capacities is not None else None
        """What each node offers, on a backend of several nodes (a step must fit one)."""
        # A backend that queues work itself (Ray) may take more than it runs at once: launching ahead
        # saves a loop turn (and a DB commit) per short step, while the launch order stays the policy's.
        admission = getattr(backend, "admission", None)
        self.admission: Resources = admission() if admission is not None else self.capacity
        self._refill_at = self.capacity.cpus + max(0.0, self.admission.cpus - self.capacity.cpus) / 2
        """CPUs launched at or under which to launch more (with slack: once half of it is used up)."""
        launch_limit = getattr(backend, "launch_limit", None)
        self._slot: Resources | None = None
        """One launch slot, taken by every attempt on a backend with a `launch_limit` (see the module docstring)."""
        if launch_limit is not None:
            self._slot = Resources(cpus=0, custom={LAUNCH_SLOTS: 1})
            self.admission = self.admission + Resources(cpus=0, custom={LAUNCH_SLOTS: float(launch_limit())})
        self._submit_first = bool(getattr(backend, "attempts_die_with_driver", False))
        """Submit a turn's launches before committing their RUNNING rows (see the module docstring)."""
        self._submit_after = getattr(backend, "submit_after", None) \
            if settings.execution.lookahead and self._submit_first else None
        """The backend's way to send an attempt that waits for another's end (None: no lookahead). Not where
        attempts outlive the driver (Ray Client): those sent ahead run before their rows are committed."""
        self._dispatch = getattr(backend, "dispatch", None)
        """The backend's way to send what it was given this turn at once (it may hold launches until `wait`)."""
        self.ahead: dict[str, list[str]] = {}
        """Running attempt -> the attempts sent ahead of it."""
        self._confirmed: list[_Entry] = []
        """Attempts sent ahead whose rows this turn recorded (what may be sent ahead of them next)."""
        self.in_use = Resources(cpus=0, memory=0, gpus=0)
        self.ahead_use = Resources(cpus=0, memory=0, gpus=0)
        """What the attempts sent ahead and not confirmed yet ask for: they wait on others, so they count
        only against how far lookahead goes, not against what may launch."""
        self.runs: dict[str, RunState] = {}
        self.pending: dict[int, _Entry] = {}
        self.running: dict[str, _Entry] = {}
        self.delayed: list[tuple[float, int, _Entry]] = []
        self.finished: dict[str, tuple[str, str | None]] = {}
        self._failing: set[str] = set()
        """Runs an unexpected error fails (`_fail`): released FAILED with `cancelling` as the error."""
        self._rerank = False
        """Runs came or went since the ranks were last taken together (see `_rank_together`)."""
        self._seq = 0
        self._heartbeat = Heartbeat(self)
        self._heartbeat.start()

    # -- runs in and out ----------------------------------------------------------------------------
    def start(self, prepared: Prepared, priority: int = 0, weight: float = 1.0) -> str:
        """Create a run of `prepared` and drive it to its end; returns the run id."""
        run_id = self.create(prepared, priority, weight)
        self.drive_until_done(run_id)
        return run_id

    def create(self, prepared: Prepared, priority: int = 0, weight: float = 1.0) -> str:
        """Create a run owned by this orchestrator and hold it (it advances with `turn`)."""
        run_id = uuid.uuid4().hex
        with self.db.session() as session:
            create_run(session, run_id=run_id, pipeline=prepared.spec.name,
                       spec=prepared.spec.model_dump(mode="json"), params=prepared.params,
                       backend=self.backend.name, owner=self.owner,
                       lease_seconds=self.settings.execution.lease_seconds, priority=priority, weight=weight)
        self.hold(run_id, prepared, Prior(), priority, weight)
        return run_id

    def resume(self, run_id: str, prepared: Prepared) -> str:
        """Adopt an unfinished run and complete it without re-running finished units."""
        run_id = self.adopt(run_id, prepared)
        self.drive_until_done(run_id)
        return run_id

    def adopt(self, run_id: str, prepared: Prepared) -> str:
        """Claim a run whose owner is gone (or a queued one) and hold it."""
        with self.db.session() as session:
            row = claim_run(session, run_id, self.owner, self.settings.execution.lease_seconds, self.backend.name)
            crash_orphans(session, row.id, f"{ORCHESTRATOR_LOST}; re-run on resume")
            prior = load_prior(session, row.id)
            priority, weight = row.priority, row.weight
        # Claimed again after another process had adopted it from us: ours again, not to be let go of.
        self._heartbeat.lost.discard(row.id)
        self.recorder.lost.discard(row.id)
        self.hold(row.id, prepared, prior, priority, weight)
        return row.id

    def hold(self, run_id: str, prepared: Prepared, prior: Prior, priority: int, weight: float) -> None:
        """Start advancing a run this process owns in the DB."""
        with self.db.read() as session:
            learned = estimate_run(session, prepared, self.settings.execution.default_estimate_seconds)
        self.runs[run_id] = RunState(
            run_id, prepared, prior, db=self.db, store=self.store, recorder=self.recorder,
            capacity=self.capacity, backend_name=self.backend.name, logs=self.settings.logs_dir / run_id,
            capacity_fix=getattr(self.backend, "capacity_fix", None), nodes=self.nodes,
            priority=priority, weight=weight, estimates=learned.estimates, ranks=learned.ranks, observer=self.observer,
            home=self.settings.home, estimator=learned.estimator, sized=learned.sized,
        )
        self.config.run_weights[run_id] = weight
        self._rerank = True
        if self.observer:
            self.observer.run_changed(run_id, "RUNNING")

    def _rank_together(self) -> None:
        """Rank the held runs together where they share a limited pool, and requeue what moved (at the
        start of a turn after runs came or went: several runs held at once are planned once)."""
        self._rerank = False
        if not rank_together(list(self.runs.values()), self.config, self.capacity):
            return
        for entry in self.pending.values():
            rank = entry.run.ranks.get(entry.unit.task.name, entry.candidate.rank)
            if rank != entry.candidate.rank:
                entry.candidate = replace(entry.candidate, rank=rank)
                self.queue.push(entry.candidate)

    def _release(self, run: RunState, status: str, error: str | None, *, leftover: str | None = None) -> None:
        """End `run` with `status`; with `leftover`, its attempts whose ends were not taken in (an abort cut
        short) end in that state, in the same transaction, rather than stay RUNNING under an ended run."""
        self.runs.pop(run.run_id, None)
        self.config.run_weights.pop(run.run_id, None)
        self.finished[run.run_id] = (status, error)
        self._rerank = True
        if run.run_id not in self._heartbeat.lost:
            with self.db.session() as session:
                if release_run(session, run.run_id, self.owner, status, error) and leftover is not None:
                    # (CANCELLED, or CRASHED as "orchestrator lost": neither spends a retry on resume.)
                    reason = error if leftover == "CANCELLED" else f"{ORCHESTRATOR_LOST} ({error})"
                    crash_orphans(session, run.run_id, reason or status.lower(), state=leftover)
        if self.observer:
            self.observer.run_changed(run.run_id, status)

    # -- the loop -----------------------------------------------------------------------------------
    def _enqueue(self, run: RunState, unit: Unit) -> None:
        self._seq += 1
        unit.seq = self._seq
        entry = _Entry(run, unit)
        self._push(entry)

    def _push(self, entry: _Entry, queued: bool = True) -> None:
        run, unit = entry.run, entry.unit
        estimate = run.estimate(unit)[0]
        entry.candidate = Candidate(
            key=unit.seq, resources=self._asks(unit), priority=run.priority + unit.task.priority, seq=unit.seq,
            run_id=run.run_id, rank=run.ranks.get(unit.task.name, estimate), estimate=estimate,
            pool=unit.task.pool, ready_at=time.monotonic(),
        )
        if queued:
            self.pending[unit.seq] = entry
            self.queue.push(entry.candidate)
        else:
            self.queue.occupy(entry.candidate, time.monotonic())

    def _asks(self, unit: Unit) -> Resources:
        """What an attempt of `unit` takes while it runs: its request, and a launch slot where the backend has them."""
        return unit.task.resources if self._slot is None else unit.task.resources + self._slot

    def _launch_ready(self) -> list[TaskLaunch]:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self._push(heapq.heappop(self.delayed)[2])
        if not self.pending:
            return []
        if self.in_use.cpus > self._refill_at + 1e-9:  # the backend still has plenty queued
            return []
        if self._slot is not None and self.in_use.custom.get(LAUNCH_SLOTS, 0.0) \
                >= self.admission.custom[LAUNCH_SLOTS] - 0.5:  # every slot taken: nothing could launch
            return []
        if self.config.pools:
            self.slots.refresh(entry.unit.task.pool for entry in self.pending.values())
        launches = []
        # A member of a limited pool launches only with its slot in the DB; one whose slot another process
        # took meanwhile stays queued as it was (its class and aging clock kept), and counts it as held elsewhere.
        claim = self._claim_slot if self.config.pools else None
        for cand in self.queue.take(self.admission - self.in_use, now=now, claim=claim):
            entry = self.pending.get(cand.key)
            if entry is None:  # of a run that failed at an earlier launch of this call
                self.queue.done(cand.key)
                self.slots.free([cand.key])
                continue
            del self.pending[cand.key]
            with self._alone(entry.run, cand.key):
                launch = entry.run.launch(entry.unit)
                self.in_use = self.in_use + cand.resources
                self.running[launch.key] = entry
                launches.append(launch)
        return self._unlaunch(launches, self._failing) if self._failing else launches

    def _claim_slot(self, cand: Candidate) -> bool:
        return not self.slots.limited(cand.pool) or self.slots.take(cand)

    def _finish(self, result: TaskResult) -> None:
        entry = self.running.get(result.key)
        if entry is None:
            return
        if entry.ahead_of is not None and not entry.dropped:
            entry.parked = result  # taken once its upstream's end is (see `_confirm`)
            return
        del self.running[result.key]
        if entry.dropped:
            self.ahead_use = self.ahead_use - entry.unit.task.resources
            return
        self.in_use = self.in_use - self._asks(entry.unit)
        self.queue.done(entry.candidate.key)
        self.slots.free([entry.candidate.key])
        if self.runs.get(entry.run.run_id) is not entry.run:
            # The end of an attempt of a run another process adopted (cancelled by `_drop`): not ours to take,
            # nor to retry.
            self.ahead.pop(result.key, None)
            return
        if entry.run.cancelling is not None:  # recorded as it ended; nothing after it runs, nor again
            self.recorder.finished(result, entry.run.run_id)
            self.ahead.pop(result.key, None)
            return
        with self._alone(entry.run):
            delay = entry.run.finish(entry.unit, result)
            if delay is not None:
                heapq.heappush(self.delayed, (time.monotonic() + delay, entry.unit.seq, entry))
            followers = self.ahead.pop(result.key, ())
            if entry.run.tasks[entry.unit.task.name].state not in (TaskState.SUCCEEDED, TaskState.CACHED):
                for key in followers:  # their workers see the failure and do not run them
                    self._drop_sent(key)

    @contextlib.contextmanager
    def _alone(self, run: RunState, key: int | None = None) -> Iterator[None]:
        """Fail `run` alone (`_fail`) on an unexpected error in the block, as `orchestrator error: Type: message`;
        with the `key` of a candidate the policy took, that counts as running no more."""
        try:
            yield
        except Exception as exc:
            if db_unreachable(exc):
                raise
            if key is not None:
                self.queue.done(key)
                self.slots.free([key])
            self._fail(run, f"orchestrator error: {type(exc).__name__}: {exc}")

    def _fail(self, run: RunState, error: str) -> None:
        """End `run` FAILED with `error` as a cancel ends it: its attempts are cancelled, what waits is forgotten,
        and it is released once their ends are in (`turn`)."""
        if self.runs.get(run.run_id) is not run or run.run_id in self._failing:
            return
        self._failing.add(run.run_id)
        run.cancelling = error
        self._stop_attempts(run)

    # -- lookahead (see `skyloop.execution.lookahead`) ----------------------------------------------
    def _send_ahead(self, entries: list[_Entry]) -> None:
        """Send the successors waiting only on these running attempts, and theirs in turn (as far as the
        backend's admission goes), when nothing else waits to launch."""
        assert self._submit_after is not None
        work = list(entries)
        while work and not self.pending:
            entry = work.pop(0)
            if entry.unit.step_run_id not in self.running:
                continue
            for launch in entry.run.ahead_of(entry.unit):
                sent = _Entry(entry.run, entry.run.ahead[launch.task_name], ahead_of=entry.unit.step_run_id)
                if not (self.in_use + self.ahead_use + launch.resources).fits(self.admission) \
                        or not self._submit_after(launch, entry.unit.step_run_id):
                    entry.run.forget_ahead(launch.task_name)
                    continue
                self.running[launch.key] = sent
                self.ahead_use = self.ahead_use + launch.resources
                self.ahead.setdefault(entry.unit.step_run_id, []).append(launch.key)
                work.append(sent)

    def _drop_sent(self, key: str) -> None:
        """Forget an attempt sent ahead (its upstream did not succeed), and those sent ahead of it."""
        sent = self.running.get(key)
        if sent is None or sent.dropped:
            return
        sent.dropped = True
        sent.run.forget_ahead(sent.unit.task.name)
        if sent.parked is not None:  # its end came already: nothing more will
            del self.running[key]
            self.ahead_use = self.ahead_use - sent.unit.task.resources
        for follower in self.ahead.pop(key, ()):
            self._drop_sent(follower)

    def _confirm(self, run: RunState, unit: Unit) -> None:
        """The row of an attempt sent ahead was recorded: it runs like any other now."""
        entry = self.running[unit.step_run_id]
        entry.ahead_of = None
        resources = unit.task.resources
        self.ahead_use, self.in_use = self.ahead_use - resources, self.in_use + self._asks(unit)
        self._seq += 1
        unit.seq = self._seq  # its place, should it go through the queue for a retry
        self._push(entry, queued=False)  # running: counted by the policy (fair share, reservations)
        self._confirmed.append(entry)
        if entry.parked is not None:
            parked, entry.parked = entry.parked, None
            self._finish(parked)

    def turn(self, max_wait: float) -> None:
        """One pass: activate, launch what the policy picks, wait up to `max_wait` for ends, close runs."""
        self._drop_lost()
        self._take_cancels()
        if self._rerank:
            self._rank_together()
        for run in list(self.runs.values()):
            if run.cancelling is not None:
                continue
            with self._alone(run):
                run.activate_ready(self._enqueue, self._confirm)
            for unit in run.dropped:  # sent ahead, then not confirmed: as if never sent
                self._drop_sent(unit.step_run_id)
            run.dropped.clear()
        launches = self._launch_ready()
        taken_back = False
        if launches and not self._submit_first:
            self.recorder.flush()  # the RUNNING rows before their launch (see the docstring)
            if self.recorder.lost:  # their rows were not written: not launched either
                kept = self._unlaunch(launches, self.recorder.lost)
                taken_back, launches = len(kept) < len(launches), kept
        for launch in launches:
            self.backend.submit(launch)
        if self._submit_after is not None:
            started = [self.running[launch.key] for launch in launches] + self._confirmed
            self._confirmed = []
            if started:
                self._send_ahead(started)
        if self._dispatch is not None:
            self._dispatch()  # before the commit below: the launches are not kept waiting for it
        since = self.recorder.waiting_since()
        if since is not None and (time.monotonic() - since >= FLUSH_SECONDS
                                  or self.recorder.work_at_risk >= FLUSH_SECONDS):
            self.recorder.flush()
        for run in [r for r in self.runs.values()
                    if (r.done and r.cancelling is None) or (r.cancelling is not None and not self._attempts_of(r))]:
            self.recorder.flush()
            if run.run_id in self.recorder.lost:  # another process holds it now: let go below
                continue
            if run.run_id in self._failing:  # (an attempt whose end was not taken in ends CRASHED with it)
                self._failing.discard(run.run_id)
                self._release(run, "FAILED", run.cancelling, leftover="CRASHED")
            else:
                self._release(run, *(("CANCELLED", run.cancelling) if run.cancelling is not None else run.outcome()))
        # A flush of this turn may have found runs adopted by another process (this one was held up past
        # its lease): let go of them now, with the steps they have waiting, before judging what waits.
        self._drop_lost()
        if not self.runs:
            return
        blocked = self.slots.waiting and bool(self.pending)
        if not (self.running or self.delayed or launches or taken_back or blocked) and self.pending:
            # (Launches taken back made room that steps of the runs still held take at the next turn; slots
            # of a pool that other processes hold free up when their attempts end.)
            # Requests are checked against capacity on activation, so this cannot happen; say so loudly.
            raise RuntimeError(f"{len(self.pending)} step(s) wait for resources that will never free up")
        timeout = max_wait
        if self.delayed:
            timeout = max(0.0, min(timeout, self.delayed[0][0] - time.monotonic()))
        since = self.recorder.waiting_since()
        if since is not None:
            timeout = max(0.0, min(timeout, since + FLUSH_SECONDS - time.monotonic()))
        if blocked:
            timeout = min(timeout, POLL_SECONDS)
        if self.running:
            for result in self.backend.wait(timeout):
                self._finish(result)
        elif self.delayed or blocked:  # nothing of ours runs: a retry delay, or pool slots other processes hold
            time.sleep(timeout)

    def _unlaunch(self, launches: list[TaskLaunch], lost: set[str]) -> list[TaskLaunch]:
        """The launches of runs still held; those of `lost` runs are taken back before they were submitted."""
        kept = []
        for launch in launches:
            entry = self.running[launch.key]
            if entry.run.run_id in lost:
                del self.running[launch.key]
                self.in_use = self.in_use - entry.candidate.resources
                self.queue.done(entry.candidate.key)
                self.slots.free([entry.candidate.key])
            else:
                kept.append(launch)
        return kept

    def _take_cancels(self) -> None:
        """Cancel the runs a user asked to (seen by the heartbeat): their attempts are cancelled, what waits is
        forgotten, and each run ends CANCELLED once its attempts' ends are recorded."""
        for run_id in list(self._heartbeat.cancels):
            self._heartbeat.cancels.discard(run_id)
            run = self.runs.get(run_id)
            if run is None or run.cancelling is not None:
                continue
            run.cancelling = CANCELLED_BY_USER
            self.recorder.event(run_id, "run.cancelled", CANCELLED_BY_USER)
            self._stop_attempts(run)

    def _attempts_of(self, run: RunState) -> bool:
        """Whether attempts of `run` still run (those sent ahead and dropped aside)."""
        return any(entry.run is run and not entry.dropped for entry in self.running.values())

    def _stop_attempts(self, run: RunState) -> None:
        """Cancel the attempts of `run` that run (their ends still come), and forget those that wait to launch
        or to be retried."""
        for key, entry in list(self.running.items()):
            if entry.run is run:
                self.backend.cancel(key)
                if entry.ahead_of is not None:
                    self._drop_sent(key)
        for seq, entry in list(self.pending.items()):
            if entry.run is run:
                del self.pending[seq]
                self.queue.remove(seq)
        self.delayed = [d for d in self.delayed if d[2].run is not run]
        heapq.heapify(self.delayed)

    def _drop_lost(self) -> None:
        """Let go of the runs another process adopted (seen by the heartbeat, or by a fenced flush)."""
        lost = self._heartbeat.lost | self.recorder.lost
        self.recorder.lost.clear()
        for run_id in list(lost & set(self.runs)):
            self._drop(self.runs[run_id])

    def _drop(self, run: RunState) -> None:
        """Stop driving a run another process adopted (its lease was lost)."""
        self._stop_attempts(run)
        self.runs.pop(run.run_id, None)
        self.finished[run.run_id] = ("LOST", "adopted by another process")

    def drive_until_done(self, run_id: str) -> None:
        """Turn until `run_id` has ended (other runs held advance too)."""
        beat = self.settings.execution.heartbeat_seconds
        try:
            while run_id in self.runs:
                self.turn(beat)
        except BaseException as exc:
            # SystemExit here comes from a signal handler (Ray's driver turns SIGTERM into one): a stop, as
            # Ctrl-C is, not a failure of the run (steps calling sys.exit() are caught by the backends).
            stopped = isinstance(exc, KeyboardInterrupt | SystemExit)
            status = "CANCELLED" if stopped else "FAILED"
            error = (("cancelled by the user" if isinstance(exc, KeyboardInterrupt) else "stopped by a signal")
                     if stopped else f"orchestrator error: {type(exc).__name__}: {exc}")
            self.abort(status, error)
            raise
        if self.finished.get(run_id, ("", None))[0] == "LOST":
            raise Conflict(f"run {run_id} was adopted by another process while this one was held up past its "
                           f"lease; it goes on there (skyloop runs show {run_id})")

    def _cancel_all(self, hurry: list[int] | None = None) -> None:
        """Cancel every attempt and take in their ends (at most 5 s, or until `hurry` gets a signal: a second
        Ctrl-C); those sent ahead are forgotten."""
        for key in list(self.running):
            self.backend.cancel(key)
            if key in self.running and self.running[key].ahead_of is not None:
                self._drop_sent(key)  # no row to end; one whose end came already leaves at once
        deadline = time.monotonic() + 5
        while self.running and time.monotonic() < deadline and not hurry:
            for result in self.backend.wait(0.2):
                entry = self.running.pop(result.key, None)
                if entry is not None and not entry.dropped:
                    self.queue.done(entry.candidate.key)
                    self.recorder.finished(result, entry.run.run_id)
        self.slots.free_all()  # (where the DB is away, they go stale with the runs' leases)

    def abort(self, status: str, error: str) -> None:
        """Cancel everything running and end every held run with `status`. A Ctrl-C meanwhile (users press it
        again when cancelling takes seconds) cuts the wait for the attempts' ends short, not the release."""
        with interrupts_held() as hurry:
            self._cancel_all(hurry)
            # The run rows are released next; an attempt row lost here is reaped as CRASHED later.
            with contextlib.suppress(Exception):
                self.recorder.flush()
            leftover = "CANCELLED" if status == "CANCELLED" else "CRASHED"
            for run in list(self.runs.values()):
                with contextlib.suppress(Exception):
                    self._release(run, status, error, leftover=leftover)

    def relinquish(self) -> None:
        """Give up every held run: cancel its attempts and clear the owner so another process adopts it (a
        Ctrl-C meanwhile cuts the wait for the attempts short, as in `abort`)."""
        with interrupts_held() as hurry:
            self._cancel_all(hurry)
            with contextlib.suppress(Exception):
                self.recorder.flush()
            with self.db.session() as session:
                disown_runs(session, list(self.runs), self.owner)
            self.runs.clear()

    def close(self) -> None:
        """Stop the heartbeat (held runs keep their leases until they expire) and close the DB connection."""
        self._heartbeat.stopped.set()
        self._heartbeat.join(timeout=5)
        self.slots.free_all()
        self.recorder.close()
