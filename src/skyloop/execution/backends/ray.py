"""The `ray` backend: each step attempt is one Ray task, placed by Ray with the step's resources.

skyloop keeps what Ray lacks or does its own way: the order of launches (the scheduling policy's),
retries (`max_retries=0`: the orchestrator retries per step policy), and timeouts, which Ray tasks
do not have (ray-project/ray#17451): the backend tracks each attempt's deadline and force-cancels
it, which kills its worker process. A timeout counts from submission, so on a busy shared cluster
the time Ray spends placing the task counts too. Step memory is a placement request to Ray; above
it nothing is enforced, except by Ray's own memory monitor (reported as OUT_OF_MEMORY).

Ray queues tasks itself, so the backend admits `queue_factor` times its capacity (`admission`): the
orchestrator launches steps ahead, in its policy's order (Ray's queue keeps submission order), and
Ray starts them as CPUs free up, without a scheduler turn and a DB commit between one step's end
and the next one's start. The price: work launched later (say, of a higher priority) waits behind
up to that much queued work. An attempt with a timeout is not queued in Ray, where its clock would
run while it waits: the backend holds it until what it has in Ray leaves room for it, and with it every
launch after it that Ray could not start at once beside it (those that can, in resources it does not
need, go: backfilling, so a CPU step does not idle behind a GPU step waiting for its device).

Attempts expected to take under `PACK_BELOW_SECONDS` (known from history, or from the units of the same
`.map` that already ended) travel in packs: one Ray task runs several of them one after the other,
so that Ray's own cost per task (about a millisecond on a small machine, more than such a step) is
paid once per pack. A turn's packable launches are split into packs when the orchestrator next
waits, no more per pack than keeps every CPU busy and none longer than `PACK_SECONDS`. Each attempt
in a pack keeps its own log, result and memory peak; a worker that dies takes its whole pack with
it (each attempt CRASHED, retried per its step's policy), and cancelling one attempt of a pack
cancels the pack and sends the others again on their own.

Steps sent ahead of their upstream (`submit_after`, see `skyloop.execution.lookahead`) take its
result as an argument, so Ray starts them when it ends. Without timeouts, and asking for the same
resources, they travel with it as a chain: one Ray task (a streaming generator) runs them one after
the other in one worker and yields each one's outcome as it ends, so the driver sees every end at
once while Ray's round trip (1.5 ms on a small machine: the owner learns of the end, then leases and
pushes the next task) is saved between them. The one after a step that did not succeed ends unrun
(`NOT_RUN`, dropped by the orchestrator); a worker that dies takes the step it ran; cancelling one
step of a chain sends those before it again as a chain of their own and ends those after it unrun.
A turn's launches are held until the orchestrator calls `dispatch` (or `wait`), so that the steps
sent ahead of them can join them.

Artifacts go through the artifact store from inside the task: only the launch and the result (with
small inline values) pass through the driver. What runs in the worker (and how a launch travels
there) lives in `ray_task`, the connection to Ray in `ray_connect`, each attempt's record in `ray_attempts`.
The backend is driven by one thread (the orchestrator's scheduler); it is not thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import time
from collections import deque
from typing import Any

from skyloop.config import ExecutionSettings
from skyloop.execution.backends.limits import DEVICES_VAR
from skyloop.execution.backends.ray_attempts import Attempt, Chain, ended, failed
from skyloop.execution.backends.ray_connect import connect_ray, ray_resources
from skyloop.execution.backends.ray_task import DriverContext, own_paths, pickled, run_attempt, run_attempts, run_chain
from skyloop.execution.lookahead import not_run
from skyloop.execution.procworker import drop_spares, wait_gone
from skyloop.execution.tasks import TaskLaunch, TaskResult, TaskState
from skyloop.spec.resources import Resources

__all__ = ["RayBackend"]

_CANCEL_GRACE_SECONDS = 3.0
"""How long a force-cancelled attempt gets to be confirmed dead by Ray before it is reported anyway."""
_EXIT_GRACE_SECONDS = 2.0
"""How long `shutdown` waits for the workers of a Ray it stopped (or disconnected from) to exit (their spares)."""
QUEUE_FACTOR = 8.0
"""How many times its capacity the backend admits by default (the rest waits in Ray's queue)."""
PACK_BELOW_SECONDS = 0.01
"""Attempts expected to take less than this (and without a timeout) travel in packs."""
PACK_SECONDS = 0.05
"""The longest a pack is expected to take."""
MAX_PACK = 32
"""The most attempts in one pack."""
MAX_CHAIN = 32
"""The most attempts in one chain (see `submit_after`)."""


class RayBackend:
    """Runs each attempt as a Ray task on the cluster at `address`, or on a Ray started here."""

    name = "ray"

    def __init__(self, settings: ExecutionSettings, address: str | None = None,
                 queue_factor: float = QUEUE_FACTOR) -> None:
        self.settings = settings
        self.address = address
        self.queue_factor = max(1.0, queue_factor)
        """`admission()` is the capacity times this."""
        self._ray: Any = None
        self._owns_ray = False
        self._capacity: Resources | None = None
        self._remote: Any = None
        self._remote_pack: Any = None
        self._remote_chain: Any = None
        self._options: dict[tuple[Any, ...], Any] = {}
        self._context = b""  # the pickled `DriverContext` every task gets
        self._running: dict[str, Attempt] = {}
        self._by_ref: dict[Any, list[Attempt]] = {}
        """Ray object ref -> the attempts waiting on it (several for a pack)."""
        self.tasks_sent = 0
        """Ray tasks submitted (a pack counts one)."""
        self._packable: dict[str, TaskLaunch] = {}
        """Launches to be sent in packs at the next `wait`, in order."""
        self._done: list[TaskResult] = []
        self._held: deque[TaskLaunch] = deque()
        """Launches not given to Ray yet: one with a timeout that would queue there, and those after it."""
        self._in_ray = Resources(cpus=0, memory=0, gpus=0)
        """What the attempts given to Ray that can start (not those waiting for another's end) ask for."""
        self._followers: dict[Attempt, list[Attempt]] = {}
        """Attempt -> those given to Ray that start once it ended (counted in `_in_ray` from then on)."""
        self._unsent: dict[str, Chain] = {}
        """Launches to send at the next `wait`, by the key of their chain's first (most are alone)."""
        self._tails: dict[str, Chain] = {}
        """The unsent chains by the key of their last launch (what `submit_after` may extend)."""
        self._nodes: int | None = None
        """Live nodes of the cluster (counted once, when a cache lookup in a worker is first considered)."""
        self._chain_last: dict[Any, Any] = {}
        """A running chain's generator -> the ref of the last outcome it yielded."""
        self._spares: dict[str, str] = {}
        """Worker on this node -> the log of the last attempt it ran, beside which it keeps its spare log file
        (see `StepOutput`): Ray ends workers without letting them remove it, so `shutdown` does."""

    @property
    def attempts_die_with_driver(self) -> bool:
        """Ray fails the tasks of an owner that died and kills their workers, so the orchestrator may commit
        a launch's RUNNING row while the launch travels (see `skyloop.execution.orchestrator`). Not over
        Ray Client (`ray://`): there tasks outlive a lost driver for the reconnect grace period."""
        return not (self.address or "").startswith("ray://")

    def start(self) -> None:
        """Connect to `address`, or start a local Ray sized by the settings; reuse a Ray already up here
        (see `connect_ray`)."""
        if self._ray is not None:
            return
        ray, self._owns_ray = connect_ray(self.address, self.settings)
        self._ray = ray
        self._remote, self._remote_pack = ray.remote(run_attempt), ray.remote(run_attempts)
        self._remote_chain = ray.remote(run_chain)
        context = DriverContext(node_id=self._node_id(ray), sys_path=own_paths())
        self._context = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def _node_id(ray: Any) -> str:
        with contextlib.suppress(Exception):  # a Ray Client driver is on no node: attempts send logs back
            return str(ray.get_runtime_context().get_node_id())
        return ""

    def capacity(self) -> Resources:
        """The cluster's CPUs, GPUs, memory and custom resources, as Ray counts them."""
        if self._capacity is None:
            self.start()
            self._capacity = ray_resources(self._ray.cluster_resources())
        return self._capacity

    def node_capacities(self) -> list[Resources]:
        """What each live node of the cluster offers: a step runs on one node, so it must fit one (Ray holds a
        task that fits the cluster's total but no node as infeasible, for ever)."""
        self.start()
        return [ray_resources(node.get("Resources") or {}) for node in self._ray.nodes() if node.get("Alive")]

    def admission(self) -> Resources:
        """What the orchestrator may have launched at once: `queue_factor` times the capacity."""
        cap, factor = self.capacity(), self.queue_factor
        return Resources(cpus=cap.cpus * factor, memory=int(cap.memory * factor), gpus=math.floor(cap.gpus * factor),
                         custom={name: amount * factor for name, amount in cap.custom.items()})

    def submit(self, launch: TaskLaunch) -> None:
        """Submit the attempt as a Ray task with the step's resources; Ray places it (at the next `wait`,
        so that attempts sent ahead of it may travel with it)."""
        if launch.key in self._running or launch.key in self._packable or launch.key in self._tails \
                or any(launch.key == each.key for each in self._held):
            raise ValueError(f"task {launch.key!r} is already running")
        self.start()
        launch = self._hide_devices(launch)
        if launch.timeout is not None:  # whether it has room depends on them
            self.dispatch()
        if self._held or (launch.timeout is not None and not self._has_room(launch)):
            self._held.append(launch)
            self._release()  # it may go beside what the held launches before it wait for
        elif launch.timeout is None and launch.estimate is not None and launch.estimate < PACK_BELOW_SECONDS:
            self._packable[launch.key] = launch
        else:
            self._chain_up(Chain([launch]))

    def submit_after(self, launch: TaskLaunch, upstream: str) -> bool:
        """Submit the attempt to start once the attempt `upstream` ended, with that attempt's result (see
        `skyloop.execution.lookahead`); False when it cannot: it has a timeout (which must not run while
        it waits in Ray's queue), the upstream travels in a pack or a chain already sent, launches wait
        in `_held` (whose order this would jump), or its worker could not look it up in the cache (a
        SQLite metadata DB, which only this node's workers reach, on a cluster of several nodes).

        With the same resources as its upstream, it joins the upstream's chain: one Ray task that runs
        them one after the other in one worker, without Ray's round trip between them (about a
        millisecond on a small machine). Otherwise, it is a Ray task of its own that waits for the
        upstream's."""
        if launch.key in self._running or launch.key in self._tails or self._held or launch.timeout is not None:
            return False
        launch = self._hide_devices(launch)
        if launch.after is not None and launch.after.cache_version is not None and not self._db_reachable(launch):
            return False
        first = self._packable.pop(upstream, None)
        if first is not None:  # in a pack its result would be hidden among others': a chain instead
            self._chain_up(Chain([first]))
        split = self._unsent.get(upstream)
        if split is not None and len(split.launches) > 1:  # a second step after it: it goes alone, now
            rest = Chain(split.launches[1:])
            split.launches = split.launches[:1]
            self._tails[upstream] = split
            self._send_chain(split)
            rest.after = self._running.get(upstream)
            if rest.after is None:  # it could not be sent (its result says why): the rest never runs
                self._done.extend(not_run(each.key) for each in rest.launches)
                return False
            self._chain_up(rest)
        chain = self._tails.get(upstream)
        if chain is not None:
            head = chain.launches[0]
            if head.timeout is None and len(chain.launches) < MAX_CHAIN \
                    and self._options_key(head)[:-1] == self._options_key(launch)[:-1]:
                chain.launches.append(launch)
                self._tails[launch.key] = self._tails.pop(upstream)
                return True
            self._send_chain(chain)
        attempt = self._running.get(upstream)
        if attempt is None or attempt.packed or attempt.chained or attempt.stopped is not None:
            return False
        self._chain_up(Chain([launch], after=attempt))
        return True

    def _hide_devices(self, launch: TaskLaunch) -> TaskLaunch:
        """A launch asking for no GPU on a cluster with some gets `CUDA_VISIBLE_DEVICES=""` (Ray sets it only
        for tasks given GPUs), so that a CPU step takes no memory on the devices of others, as on `local`."""
        if launch.resources.gpus or not self.capacity().gpus or DEVICES_VAR in launch.env:
            return launch
        return dataclasses.replace(launch, env={**launch.env, DEVICES_VAR: ""})

    @property
    def capacity_fix(self) -> str | None:
        """How to offer what a step asks beyond `capacity()`, when the settings cannot (a cluster reached by
        address is sized by its nodes, not by skyloop's --max-* settings)."""
        if self.address is None:
            return None
        return (f"add it to the nodes of the Ray cluster at {self.address} (`ray start --num-cpus N --num-gpus N "
                "--memory BYTES --resources '{\"license\": 1}'`): skyloop's --max-* settings size only a Ray it "
                "starts itself")

    def _db_reachable(self, launch: TaskLaunch) -> bool:
        """Whether every worker can reach the launch's metadata DB: not a SQLite file on a cluster of nodes."""
        if not (launch.db_url or "").startswith("sqlite"):
            return True
        if self._nodes is None:
            self._nodes = sum(1 for node in self._ray.nodes() if node.get("Alive"))
        return self._nodes <= 1

    def _chain_up(self, chain: Chain) -> None:
        self._unsent[chain.launches[0].key] = self._tails[chain.launches[-1].key] = chain

    def dispatch(self) -> None:
        """Send what `submit` and `submit_after` took since the last call (also done by `wait`)."""
        for chain in list(self._unsent.values()):
            self._send_chain(chain)

    def _send_chain(self, chain: Chain) -> None:
        del self._unsent[chain.launches[0].key]
        del self._tails[chain.launches[-1].key]
        self._send(*chain.launches, after=chain.after, chained=len(chain.launches) > 1)

    def _has_room(self, launch: TaskLaunch) -> bool:
        """Whether Ray can start the launch now, as far as our own attempts go."""
        return not self._running or (self._in_ray + launch.resources).fits(self.capacity())

    def _release(self) -> None:
        """Give held launches to Ray, in order, each that Ray can start now beside what it runs of ours and what
        the launches held before it ask for (they keep their place: a later one goes first only into room they
        do not need, as backfilling does), and the first one whenever nothing of ours is in Ray. Before, every
        launch waited behind the first held one: a CPU step behind a held GPU step idled while CPUs were free."""
        if not self._held:
            return
        capacity, claimed, kept = self.capacity(), self._in_ray, deque[TaskLaunch]()
        for launch in self._held:
            if launch.resources.fits_beside(claimed, capacity) or (not kept and not self._running):
                self._send(launch)
            else:
                kept.append(launch)
            claimed = claimed + launch.resources
        self._held = kept

    def _send(self, launch: TaskLaunch, *pack: TaskLaunch, after: Attempt | None = None,
              chained: bool = False, upstream: Any = None) -> None:
        """One Ray task for `launch`, or for the pack (or with `chained`, the chain) of it and `pack` (same
        task, same resources); with `after` (or the ref `upstream`, which wins), one that Ray starts once
        that attempt's task ended, given its result."""
        submitted, now = time.time(), time.monotonic()
        launches = (launch, *pack)
        upstream = after.ref if after is not None and upstream is None else upstream
        try:
            # As bytes, which Ray passes as they are (its own serialization of an object costs ~0.3 ms
            # more per task).
            payload = pickled(list(launches) if pack else launch)
            options = self._options_for(launch, kind="chain" if chained else "pack" if pack else "one")
            ref = options.remote(payload, self._context) if upstream is None else \
                options.remote(payload, self._context, upstream)
        except Exception as exc:  # e.g. an input value that cannot be pickled
            for each in launches:
                self._done.append(TaskResult(key=each.key, state=TaskState.FAILED, ended_at=time.time(),
                                             error=f"cannot submit the task to Ray: {type(exc).__name__}: {exc}"))
            return
        self.tasks_sent += 1
        attempts = self._by_ref[ref] = []
        for each in launches:
            deadline = None if each.timeout is None else now + each.timeout
            attempt = self._running[each.key] = Attempt(each, ref, submitted, deadline, chained=chained,
                                                         packed=bool(pack) and not chained, upstream=upstream,
                                                         after=after)
            if after is None or after.ended is not None:
                self._count(attempt)
            else:  # it waits, holding nothing, until `after` ends: a held launch must not wait for it
                self._followers.setdefault(after, []).append(attempt)
            after = attempt if chained else None
            attempts.append(attempt)

    def _count(self, attempt: Attempt) -> None:
        if not attempt.counted:
            attempt.counted, self._in_ray = True, self._in_ray + attempt.launch.resources

    def _uncount(self, attempt: Attempt) -> None:
        if attempt.counted:
            attempt.counted, self._in_ray = False, self._in_ray - attempt.launch.resources

    def _send_packs(self) -> None:
        """Send the packable launches of this turn: per task, in order, in packs that keep every CPU busy."""
        groups: dict[tuple[Any, ...], list[TaskLaunch]] = {}
        for launch in self._packable.values():
            groups.setdefault(self._options_key(launch), []).append(launch)
        self._packable = {}
        cpus = self.capacity().cpus
        for launches in groups.values():
            first = launches[0]
            slots = max(1, math.floor(cpus / first.resources.cpus)) if first.resources.cpus > 0 else len(launches)
            longest = max(launch.estimate or 0.0 for launch in launches)
            size = min(MAX_PACK, max(1, math.floor(PACK_SECONDS / max(longest, 1e-6))),
                       math.ceil(len(launches) / slots))
            for start in range(0, len(launches), size):
                self._send(*launches[start:start + size])

    @staticmethod
    def _options_key(launch: TaskLaunch) -> tuple[Any, ...]:
        res = launch.resources
        return res.cpus, res.gpus, res.memory, tuple(sorted(res.custom.items())), launch.task_name

    def _options_for(self, launch: TaskLaunch, kind: str = "one") -> Any:
        key = (*self._options_key(launch), kind)
        options = self._options.get(key)
        if options is None:
            res = launch.resources
            extra: dict[str, Any] = {"memory": res.memory} if res.memory > 0 else {}
            if kind == "chain":
                extra["num_returns"] = "streaming"
            remote = {"one": self._remote, "pack": self._remote_pack, "chain": self._remote_chain}[kind]
            options = self._options[key] = remote.options(
                num_cpus=res.cpus, num_gpus=res.gpus, resources=dict(res.custom), name=launch.task_name,
                max_retries=0, retry_exceptions=False, **extra,
            )
        return options

    def wait(self, timeout: float) -> list[TaskResult]:
        """Results of attempts that ended, waiting up to `timeout` seconds for one while any runs."""
        self.dispatch()
        if self._packable:
            self._send_packs()
        end = time.monotonic() + max(0.0, timeout)
        while True:
            now = time.monotonic()
            self._expire(now)
            if not self._by_ref:
                break
            wake = min([end, *self._wakeups()])
            self._collect(0.0 if self._done else max(0.0, wake - now))
            if self._done or time.monotonic() >= end:
                break
        done, self._done = self._done, []
        return done

    def cancel(self, key: str) -> None:
        """Force-cancel the attempt (killing its worker if it runs); `wait` reports it CANCELLED."""
        attempt = self._running.get(key)
        if attempt is not None and attempt.stopped is None and attempt.chained:
            self._cancel_in_chain(attempt)
        elif attempt is not None and attempt.stopped is None:
            pack = self._by_ref.get(attempt.ref, [])
            if len(pack) > 1:  # the others of its pack go again on their own
                self._by_ref[attempt.ref] = [attempt]
                for other in pack:
                    if other is not attempt:
                        del self._running[other.launch.key]
                        self._uncount(other)
                        self._send(other.launch)
            self._stop(attempt, TaskState.CANCELLED, "cancelled")
        if self._packable.pop(key, None) is not None:
            self._done.append(TaskResult(key=key, state=TaskState.CANCELLED, error="cancelled", ended_at=time.time()))
        for chain in [c for c in self._unsent.values() if any(launch.key == key for launch in c.launches)]:
            keys = [launch.key for launch in chain.launches]
            cut = keys.index(key)
            del self._tails[keys[-1]]
            chain.launches, later = chain.launches[:cut], chain.launches[cut + 1:]
            if chain.launches:
                self._tails[chain.launches[-1].key] = chain
            else:
                del self._unsent[key]
            self._done.append(TaskResult(key=key, state=TaskState.CANCELLED, error="cancelled", ended_at=time.time()))
            self._done.extend(not_run(launch.key) for launch in later)
        for held in [h for h in self._held if h.key == key]:
            self._held.remove(held)
            self._done.append(TaskResult(key=key, state=TaskState.CANCELLED, error="cancelled",
                                         ended_at=time.time()))
            self._release()  # the launches behind it may go now

    def _cancel_in_chain(self, attempt: Attempt) -> None:
        """Stop the chain's task: the attempts after `attempt` end `NOT_RUN` (they needed it), those before
        it go again as a chain of their own, from the last result the chain gave."""
        members = self._by_ref.get(attempt.ref, [])
        cut = members.index(attempt)
        before, later = members[:cut], members[cut + 1:]
        self._by_ref[attempt.ref] = [attempt]
        for other in before + later:
            del self._running[other.launch.key]
            self._uncount(other)
            self._followers.pop(other, None)
        if before:
            upstream = self._chain_last.get(attempt.ref, before[0].upstream)
            self._send(*(other.launch for other in before), chained=len(before) > 1, upstream=upstream,
                       after=before[0].after)
        self._done.extend(not_run(other.launch.key) for other in later)
        self._stop(attempt, TaskState.CANCELLED, "cancelled")

    def shutdown(self) -> None:
        """Cancel what still runs, and stop Ray if this backend started it; safe to repeat."""
        if self._ray is None:
            return
        for ref in self._by_ref:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=True)
        self._running.clear()
        self._by_ref.clear()
        self._packable.clear()
        self._unsent.clear()
        self._tails.clear()
        self._chain_last.clear()
        self._options.clear()
        self._held.clear()
        self._followers.clear()
        self._in_ray = Resources(cpus=0, memory=0, gpus=0)
        if self._owns_ray:
            self._ray.shutdown()  # our job's workers end with it (with a connection to a cluster, soon after)
        drop_spares({int(name.rpartition(":")[2]): log for name, log in self._spares.items()},
                    grace=_EXIT_GRACE_SECONDS if self._owns_ray else 0.0)
        self._spares.clear()
        self._ray, self._remote, self._remote_pack, self._owns_ray, self._capacity = None, None, None, False, None

    # -- ends of attempts --------------------------------------------------------------------------

    def _wakeups(self) -> list[float]:
        """When `wait` must look again though no attempt ended: deadlines, and cancels not yet confirmed."""
        times = []
        for attempt in self._running.values():
            when = attempt.deadline if attempt.stopped is None else attempt.give_up
            if when is not None:
                times.append(when)
        return times

    def _stop(self, attempt: Attempt, state: TaskState, error: str) -> None:
        attempt.stopped, attempt.stopped_at = (state, error), time.time()
        attempt.give_up = time.monotonic() + _CANCEL_GRACE_SECONDS
        try:
            self._ray.cancel(attempt.ref, force=True)
        except Exception:  # Ray could not even take the cancel: report the attempt now
            attempt.give_up = time.monotonic()

    def _expire(self, now: float) -> None:
        for attempt in list(self._running.values()):
            if attempt.stopped is None and attempt.deadline is not None and attempt.deadline <= now:
                self._stop(attempt, TaskState.TIMED_OUT, f"timed out after {attempt.launch.timeout:g}s")
            elif attempt.stopped is not None and attempt.give_up is not None and attempt.give_up <= now:
                self._end(attempt, ended(attempt, *attempt.stopped))

    def _collect(self, block: float) -> None:
        """Take in every attempt that has ended, waiting up to `block` seconds for the first."""
        refs = list(self._by_ref)
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=block)
        if not ready:
            return
        if len(refs) > 1:
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        streams = [ref for ref in ready if isinstance(ref, self._ray.ObjectRefGenerator)]
        for stream in streams:
            self._stream(stream)
        if streams:
            ready = [ref for ref in ready if not isinstance(ref, self._ray.ObjectRefGenerator)]
            if not ready:
                return
        try:
            values = self._ray.get(ready)
        except Exception:  # one of them failed: take them one by one
            values = None
        for i, ref in enumerate(ready):
            if values is not None:
                self._returned(ref, values[i])
                continue
            try:
                value = self._ray.get(ref)
            except Exception as exc:
                for attempt in list(self._by_ref.get(ref, ())):
                    self._end(attempt, failed(self._ray.exceptions, attempt, exc))
            else:
                self._returned(ref, value)

    def _stream(self, stream: Any) -> None:
        """Take in the outcomes a chain yielded so far; if its task died, the attempt it ran ends with why,
        and those after it `NOT_RUN`."""
        while self._by_ref.get(stream) and (stream.next_ready() or stream.is_finished()):
            try:
                ref = next(stream)
                value = self._ray.get(ref)
            except Exception as exc:  # StopIteration too: a chain that ended without a word for some
                first, *later = self._by_ref[stream]
                self._end(first, failed(self._ray.exceptions, first, exc) if not isinstance(exc, StopIteration)
                          else ended(first, TaskState.CRASHED, "the chain's Ray task ended before the step"))
                for other in later:
                    self._end(other, not_run(other.launch.key))
                break
            self._chain_last[stream] = ref
            self._returned(stream, value)
        if stream not in self._by_ref:
            self._chain_last.pop(stream, None)

    def _end(self, attempt: Attempt, result: TaskResult) -> None:
        # What waits on it started then; forgetting what it waited on keeps no line of ended attempts alive.
        attempt.ended, attempt.after = result.ended_at or time.time(), None
        if self._running.get(attempt.launch.key) is attempt:
            del self._running[attempt.launch.key]
            self._uncount(attempt)
        for follower in self._followers.pop(attempt, ()):
            if self._running.get(follower.launch.key) is follower:  # it starts now
                self._count(follower)
        pack = self._by_ref.get(attempt.ref)
        if pack is not None and attempt in pack:
            pack.remove(attempt)
            if not pack:
                del self._by_ref[attempt.ref]
        self._done.append(result)
        self._release()

    def _returned(self, ref: Any, value: bytes) -> None:
        """End the attempts of `ref` with their own results. A result that ended before we cancelled its attempt
        wins over the cancel; one that ended after it does not: the kill reached the step's own processes first
        (a `subprocess` it waited on), and the step went on to return what that left it with."""
        attempts = list(self._by_ref.get(ref, ()))
        if not attempts:
            return
        outcomes: list[tuple[TaskResult, bytes | None]] = pickle.loads(value) if attempts[0].packed \
            else [pickle.loads(value)]
        by_key = {result.key: (result, log_tail) for result, log_tail in outcomes}
        for attempt in attempts:
            if attempt.chained and attempt.launch.key not in by_key:
                continue  # a chain yields one outcome at a time
            result, log_tail = by_key[attempt.launch.key]
            if log_tail:  # it ran on another node, which cannot write our log folder
                path = attempt.launch.log_path
                folder = os.path.dirname(path)
                if folder:
                    os.makedirs(folder, exist_ok=True)
                with open(path, "ab") as log:
                    log.write(log_tail)
            elif log_tail is None and result.worker:  # it ran on this node, in our log folder
                self._spares[result.worker] = attempt.launch.log_path
            if attempt.stopped is not None and (result.ended_at or math.inf) >= attempt.stopped_at:
                if log_tail is None and result.worker:
                    # Its worker (on this node) is on its way out: reported before it is gone, the attempt's
                    # retry could be pushed to it by Ray and die with it.
                    wait_gone(int(result.worker.rpartition(":")[2]), _CANCEL_GRACE_SECONDS)
                result = ended(attempt, *attempt.stopped)
            self._end(attempt, result)
