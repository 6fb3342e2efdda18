"""The supervisor's reconcile loop, one ``tick()`` at a time (after gunicorn's arbiter).

Each tick:
1. **probe**: every replica's ``/heartbeat`` from a small thread pool, and whether its process
   or container still exists;
2. **mark**: record the results; a replica whose process is gone, or that missed
   ``heartbeat_failures`` heartbeats in a row, is *down*; a new one that never became ready in
   ``start_timeout`` is *down* too and counts towards the crash-loop guard. A ready replica
   whose heartbeat was only *late* (no answer in time: it queues behind requests under load)
   is forgiven when balancer workers got answers from it since the last tick (``lb.evidence``);
   a refused connection or a process gone never is, so a crash is found as fast as ever;
3. **reconcile**: every wanted replica that is down or has no process gets one: a dead
   replica's replacement takes a new random hostname and keeps the server id and the slots, so
   no request key moves; removals that an ``/rm`` left half-done are finished; replicas of this
   deployment that no registry entry knows are stopped.

A replacement is reserved in the registry before it starts and committed after, with checks
that the entry is still the one we reserved, so an ``/rm`` racing with it, or a supervisor
killed half-way and restarted, leaves neither a duplicate nor an orphan.

The supervisor owns the replicas, so it restores the registry when its file is lost (corrupt,
deleted): from the last state it read, brought up to date with what runs. An ``/add`` or
``/rm`` whose process died lets go of its entries as soon as that is known, not at its deadline.

With the etcd registry, the replicas an ``/add`` wants (``Replica.wanted``) are started here,
and removed again if the call's lease runs out before it committed them; only the elected
supervisor ticks, and it asks ``may_act`` (its leadership, checked on its own clock) before
each start or stop, since a write refused by the fence comes only after the act.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lb.backends import Backend, Instance, ReplicaSpec
from lb.bootstrap import recovered_state
from lb.events import SupervisorEvents
from lb.evidence import Evidence
from lb.heartbeat import ANSWERED, FAILED, LATE, Heartbeat, probe
from lb.leases import SUPERVISOR_HOLDER, Lease, Purpose
from lb.naming import random_hostname
from lb.registry import (
    DOWN,
    READY,
    REMOVING,
    STARTING,
    RegistryMissing,
    RegistryUnreadable,
    RegistryUnwritable,
    Replica,
    State,
)
from lb.settings import Settings
from lb.stores import Store

log = logging.getLogger(__name__)

# A replica being replaced is dead or hung: no requests worth draining, so no long graceful stop.
DEAD_STOP_TIMEOUT = 2.0


class NotActing(Exception):
    """This supervisor may no longer act (it lost its leadership): the act was not done."""


@dataclass(frozen=True)
class Job:
    """Start a replica for ``hostname`` (server id ``server_id``), first stopping ``old``."""

    hostname: str
    server_id: int
    old_handle: str | None


class Supervisor:
    def __init__(self, settings: Settings, registry: Store, backend: Backend,
                 events: SupervisorEvents | None = None,
                 may_act: Callable[[], bool] = lambda: True) -> None:
        self.settings = settings
        self.may_act = may_act  # whether this supervisor may still start and stop replicas
        self.events = events or SupervisorEvents()
        self.registry = registry
        self.backend = backend
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="heartbeat")
        self.reaper = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reaper")
        self._stopping: set[str] = set()
        self._stopping_lock = threading.Lock()
        self._orphan_sightings: dict[str, int] = {}
        self.last_good: State | None = None  # the last state read: what a restore starts from
        self._unwritten: set[tuple[str, str]] = set()  # said, not yet recorded (see _first_time)
        self.evidence = Evidence()  # which replicas balancer workers got answers from
        self._answers_unread = False  # their counts could not be read last tick (said once)

    def start_up(self) -> None:
        """Before the first tick: a registry file that is missing or unreadable is restored,
        and what an earlier supervisor reserved and never committed is ours now."""
        self._read()
        self.release_own_holds()

    def release_own_holds(self) -> None:
        """At start-up: what an earlier supervisor reserved and never committed is ours now.
        (A replica it did start keeps its lease: it has until then to answer.)"""
        with self.registry.update() as state:
            for r in state.replicas:
                if r.leased_to(SUPERVISOR_HOLDER) and r.handle is None:
                    r.release()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.reaper.shutdown(wait=True)  # a stop under way finishes: no half-stopped replica

    # -- one round -----------------------------------------------------------------------------
    def tick(self) -> None:
        state = self._read()
        # Not probed: what an /add is starting, and what an /add wanted and never committed
        # (its lease ran out: it is removed below, not made ready by its answer).
        targets = [r for r in state.replicas if r.handle and r.address
                   and r.state != REMOVING and not r.adding and not r.wanted]
        alive = {r.handle: self.backend.is_running(r.handle) for r in targets if r.handle}
        answers = dict(zip(
            [r.hostname for r in targets],
            self.pool.map(lambda r: probe(r.address, self.settings.heartbeat_timeout)
                          if alive[r.handle] else FAILED, targets),
        ))
        # Read after the probes: answers counted while a heartbeat was waiting are in.
        serving = self._serving()
        jobs, removals = self._mark(answers, alive, serving)
        self._finish_removals(removals)
        self._run(jobs)
        self._stop_orphans()
        self.events.ticked()

    def _serving(self) -> set[str]:
        """Hostnames balancer workers got answers from since the last tick (``lb.evidence``).
        Read every tick (a few small files, or one etcd range read), so "since" is one
        interval; a tick that cannot read them has none, and the next starts afresh."""
        if self.settings.late_heartbeats != "forgive":
            return set()
        try:
            serving = self.evidence.serving(self.registry.read_answers())
        except Exception as exc:  # noqa: BLE001 - no evidence this tick: late counts as missed
            if not self._answers_unread:  # said once while it lasts
                log.warning("cannot read the balancers' answer counts: %s", exc)
            self._answers_unread = True
            self.evidence.forget()
            return set()
        self._answers_unread = False
        return serving

    def _read(self) -> State:
        try:
            state = self.registry.read()
        except RegistryUnreadable as exc:
            state = self._restore(exc)
        self.last_good = state
        return state

    def _restore(self, problem: RegistryUnreadable) -> State:
        """Rewrite a lost registry from the last good state and what runs; or, if it cannot be
        written, say clearly that a person must act."""
        state = recovered_state(self.settings, self.last_good, self.backend.list())
        try:
            written = self.registry.restore(state)
        except RegistryUnwritable as exc:
            raise RegistryUnwritable(
                f"{problem}, and it cannot be restored ({exc}): a person must act: make "
                f"{os.path.dirname(self.registry.where)} writable or put a good registry back",
                exc.detail) from exc
        if written is None:  # readable again: someone else restored it
            return self.registry.read()
        if self.last_good is None and isinstance(problem, RegistryMissing) and not any(
                r.handle for r in written.replicas):
            log.info("created registry %s: %s", self.registry.where, written.rep())
        else:
            log.warning("%s: restored it from %s: version %d, %s", problem,
                        "the last good state and the running replicas" if self.last_good
                        else "the running replicas", written.version, written.rep())
        return written

    def _mark(self, answers: dict[str, Heartbeat], alive: dict[str, bool],
              serving: set[str]) -> tuple[list[Job], list[Replica]]:
        now = time.time()
        jobs: list[Job] = []
        with self.registry.update() as state:
            self._release_dead_owners(state)
            taken = {r.hostname for r in state.replicas}
            # An /rm may have taken the entry since the probe: a heartbeat answered before
            # must not turn it back into a ready replica (which, stopped, gets replaced).
            heard = [(r, answers[r.hostname], alive[r.handle]) for r in state.replicas
                     if r.hostname in answers and r.handle is not None and r.handle in alive
                     and r.state != REMOVING]
            for r, heartbeat, running in heard:
                self._record(r, heartbeat, running, r.hostname in serving, now)
            self._stamp([r for r, heartbeat, _ in heard if heartbeat is ANSWERED], now)
            for r in state.replicas:
                if r.wanted and not r.held and r.state != REMOVING:
                    log.warning("the /add that wanted replica %s did not commit it in time: "
                                "removing it", r.hostname)
                    r.state = REMOVING
                if r.state == REMOVING or r.not_before > now:
                    continue
                if r.wanted:  # an /add waits for it: start it, under the call's lease
                    if r.handle is None:
                        jobs.append(Job(r.hostname, r.server_id, None))
                    continue
                if r.held:
                    continue
                if r.state == DOWN or r.handle is None:
                    old = r.handle
                    # A dead replica's replacement gets a new name; one that never came up
                    # (restarts counts its failed starts) is tried again under its own.
                    if r.state == DOWN and r.restarts == 0:
                        r.hostname = random_hostname(taken)
                        taken.add(r.hostname)
                        self.events.replacing(r)
                    r.state = STARTING
                    r.unplaced()
                    r.lease = Lease.take(Purpose.SUPERVISOR, self.settings.start_timeout, now)
                    r.failures, r.created = 0, now
                    jobs.append(Job(r.hostname, r.server_id, old))
            removals = [r for r in state.replicas if r.state == REMOVING and not r.held]
        self._unwritten.clear()  # written: what this round found is on record
        return jobs, removals

    def _release_dead_owners(self, state: State) -> None:
        """An ``/add`` or ``/rm`` whose process is gone holds its entries no longer: they are
        the supervisor's to finish now, not at the hold's deadline (which only counts where
        the owner's process cannot be seen: another host or pid namespace)."""
        for r in state.replicas:
            if r.lease is not None and r.held and r.lease.holder_gone():
                log.warning("the %s holding replica %s has died (%s): finishing it",
                            r.lease.purpose, r.hostname, r.lease.holder)
                r.release()

    def _record(self, r: Replica, heartbeat: Heartbeat, running: bool, serving: bool,
                now: float) -> None:
        if heartbeat is LATE and serving and running and r.state == READY:
            # Late but serving: balancer workers got answers from it since the last tick, so
            # its heartbeat queued behind requests. Not a miss, and the misses in a row end.
            # A hang stops those answers at once: one tick later its misses count again.
            r.failures = 0
            self.events.heartbeat_forgiven(r)
            return
        if heartbeat is ANSWERED:
            if r.state != READY:
                log.info("replica %s (server id %d) is ready", r.hostname, r.server_id)
                self.events.became_ready(r)
                if r.last_heartbeat is not None:
                    # A replacement or a recovery: slow start ramps its share from here. (A
                    # stack's first replicas have none to hand their keys to meanwhile.)
                    r.ready_since = now
            if r.state != READY or r.failures or r.restarts or r.lease is not None:
                r.last_heartbeat = now  # the entry is written anyway: the time goes with it
            r.state, r.failures, r.restarts, r.lease = READY, 0, 0, None
            return
        r.failures += 1
        self.events.heartbeat_missed(r)
        if r.state == READY and (not running or r.failures >= self.settings.heartbeat_failures):
            r.state = DOWN
            if self._first_time(("down", r.handle or r.hostname)):
                log.warning("replica %s (server id %d) is down: %s", r.hostname, r.server_id,
                            "its process is gone" if not running else
                            f"missed {r.failures} heartbeats")
                self.events.marked_down(r, "missed_heartbeats" if running else "process_gone")
        elif r.state == STARTING and (not running or not r.held_at(now)):
            delay = self._failed_start(r, now)
            if self._first_time(("never_ready", r.handle or r.hostname)):
                self.events.marked_down(r, "never_ready")
                log.error("replica %s (server id %d) never became ready (%d in a row); "
                          "next try in %.1fs", r.hostname, r.server_id, r.restarts, delay)

    def _stamp(self, answered: list[Replica], now: float) -> None:
        """Answered heartbeats go on record all together, once the oldest on record is
        ``record_seconds`` old: not every round, since each write of the registry makes every
        balancer worker read it again. (Readiness reads a registry left unwritten much longer
        as a supervisor gone.)"""
        if any(r.last_heartbeat is None
               or not 0 <= now - r.last_heartbeat < self.settings.record_seconds
               for r in answered):
            for r in answered:
                r.last_heartbeat = now

    def _first_time(self, news: tuple[str, str]) -> bool:
        """Whether ``news`` is new since the last round that could write the registry: while
        it cannot, each round finds the same replica down again, and says so once."""
        if news in self._unwritten:
            return False
        self._unwritten.add(news)
        return True

    def _failed_start(self, r: Replica, now: float) -> float:
        """The crash-loop guard: a start that never became ready waits 0.5, 1, 2 ... seconds
        (capped at ``restart_backoff``) before the next try; returns the wait."""
        r.restarts += 1
        delay = min(self.settings.restart_backoff, 0.5 * 2 ** (r.restarts - 1))
        r.state, r.not_before, r.lease = DOWN, now + delay, None
        return delay

    # -- acting --------------------------------------------------------------------------------
    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        running = {i.hostname: i for i in self.backend.list()}
        for job, result in zip(jobs, self.pool.map(lambda j: self._start(j, running), jobs)):
            self._commit(job, result)

    def _start(self, job: Job, running: dict[str, Instance]) -> Instance | Exception:
        if not self.may_act():
            return NotActing(f"not starting {job.hostname}: this supervisor no longer leads")
        try:
            if job.old_handle:
                self.backend.stop(job.old_handle, DEAD_STOP_TIMEOUT)
            found = running.get(job.hostname)
            if found is not None and found.handle != job.old_handle:
                # Started before a crash of ours: adopt it (not the failed one just stopped).
                log.info("adopting running replica %s", job.hostname)
                return found
            return self.backend.start(ReplicaSpec(job.hostname, job.server_id))
        except Exception as exc:  # noqa: BLE001 - recorded below, retried with back-off
            return exc

    def _commit(self, job: Job, result: Instance | Exception) -> None:
        now = time.time()
        orphan: Instance | None = None
        if isinstance(result, NotActing):
            return
        with self.registry.update() as state:
            r = state.find(job.hostname)
            ours = r is not None and r.leased_to(SUPERVISOR_HOLDER) and r.state == STARTING
            wanted = (r is not None and r.wanted and r.held and r.handle is None
                      and r.state == STARTING)
            if isinstance(result, Exception):
                log.error("could not start replica %s: %s", job.hostname, result)
                self.events.start_failed(job.hostname)
                if ours and r is not None:
                    self._failed_start(r, now)
                elif wanted and r is not None:  # tried again next round while the /add waits
                    r.not_before = now + 0.5
                return
            if wanted and r is not None:  # the /add commits it once it answers
                r.runs_as(result)
                log.info("started replica %s (server id %d) for an /add", r.hostname,
                         r.server_id)
            elif ours and r is not None:
                r.runs_as(result)
                # Its time to answer starts now.
                r.lease = Lease.take(Purpose.SUPERVISOR, self.settings.start_timeout, now)
                log.info("started replica %s (server id %d)", r.hostname, r.server_id)
            else:  # removed (or taken over) while we were starting it
                orphan = result
        if orphan is not None:
            log.info("replica %s is no longer wanted; stopping it", orphan.hostname)
            self.backend.stop(orphan.handle)

    def _finish_removals(self, removals: list[Replica]) -> None:
        """Finish what an ``/rm`` that died half-way left: stop, then forget."""
        for r in removals:
            def forget(name: str = r.hostname) -> None:
                with self.registry.update() as state:
                    state.replicas = [x for x in state.replicas
                                      if not (x.hostname == name and x.state == REMOVING)]

            if self._stop_in_background(r.handle, then=forget, key=f"rm:{r.hostname}"):
                log.info("finishing the removal of %s", r.hostname)

    def _stop_in_background(self, handle: str | None, then: Callable[[], None] | None = None,
                            key: str | None = None) -> bool:
        """Stop without holding up the tick (a graceful stop takes seconds); once per key.
        Whether it was not under way already."""
        key = key or handle or ""
        with self._stopping_lock:
            if key in self._stopping:
                return False
            self._stopping.add(key)

        def work() -> None:
            try:
                if not self.may_act():
                    return  # the next leader finishes it
                if handle:
                    self.backend.stop(handle)
                if then is not None:
                    then()
            except Exception as exc:  # noqa: BLE001 - logged; the next tick tries again
                log.error("stopping %s failed: %s", key, exc)
            finally:
                with self._stopping_lock:
                    self._stopping.discard(key)

        self.reaper.submit(work)
        return True

    def _stop_orphans(self) -> None:
        """Stop replicas of this deployment that no entry knows, seen twice in a row.

        The registry is read after listing, so a replica an ``/add`` has just started is
        already reserved under its hostname; the second sighting covers the rest.
        """
        instances = self.backend.list()
        state = self._read()
        known_handles = {r.handle for r in state.replicas if r.handle}
        known_names = {r.hostname for r in state.replicas if r.handle is None or r.held}
        sightings: dict[str, int] = {}
        for inst in instances:
            if inst.handle in known_handles or inst.hostname in known_names:
                continue
            sightings[inst.handle] = self._orphan_sightings.get(inst.handle, 0) + 1
            if sightings[inst.handle] >= 2:
                log.warning("stopping orphan replica %s (%s)", inst.hostname, inst.handle)
                self._stop_in_background(inst.handle)
        self._orphan_sightings = sightings
