"""The supervisor's reconcile step (``Supervisor.tick``), one round at a time, over the fake
backend: no process, no socket, and a clock the test moves (``time.time``, which the supervisor
and the leases read). ``tests/test_supervisor.py`` runs the same loop over real processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import supervisor.core
from lb.backends import Instance
from lb.bootstrap import ensure_registry
from lb.events import SupervisorEvents
from lb.leases import SUPERVISOR_HOLDER, Lease, Purpose
from lb.registry import DOWN, READY, REMOVING, STARTING, Registry, Replica, State
from lb.settings import Settings
from supervisor.core import Supervisor
from tests.helpers_backend import NOBODY, FakeBackend

START_TIMEOUT = 5.0
BACKOFF = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder(SupervisorEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def marked_down(self, replica: Replica, reason: str) -> None:
        self.seen.append(("down", f"{replica.hostname} {reason}"))

    def replacing(self, replica: Replica) -> None:
        self.seen.append(("replacing", replica.hostname))

    def became_ready(self, replica: Replica) -> None:
        self.seen.append(("ready", replica.hostname))

    def start_failed(self, hostname: str) -> None:
        self.seen.append(("start_failed", hostname))


@dataclass
class World:
    registry: Registry
    backend: FakeBackend
    sup: Supervisor
    clock: Clock
    events: Recorder

    def tick(self, times: int = 1) -> State:
        for _ in range(times):
            self.sup.tick()
        return self.registry.read()

    def settle(self) -> State:
        """Let the stops the supervisor runs in the background finish (it stops)."""
        self.sup.close()
        return self.registry.read()

    def ready(self) -> State:
        state = self.tick(2)  # a round starts the wanted set, the next hears its heartbeats
        assert [(r.hostname, r.state) for r in state.replicas] == [("Server1", READY),
                                                                    ("Server2", READY)]
        return state


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    settings = Settings.from_env({}, registry=str(tmp_path / "registry.json"), n=2,
                                 start_timeout=START_TIMEOUT, heartbeat_failures=2,
                                 restart_backoff=BACKOFF)
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    backend = FakeBackend()
    monkeypatch.setattr(supervisor.core, "probe", backend.probe)
    events = Recorder()
    sup = Supervisor(settings, registry, backend, events)
    yield World(registry, backend, sup, clock, events)
    sup.close()


def dead_holder(purpose: Purpose) -> str:
    """The holder tag of a process of this pid namespace that has ended: this process's own
    tag with another start time (the pid since reused by this process)."""
    kind, pid, nonce, space, ticks = Lease.take(purpose, 0.0).holder.split(":")
    return ":".join([kind, pid, nonce, space, str(int(ticks) + 1)])


def test_the_wanted_set_is_started_then_ready_at_its_first_heartbeat(world: World) -> None:
    state = world.tick()
    assert world.backend.started == ["Server1", "Server2"]
    for r in state.replicas:
        assert (r.state, r.handle) == (STARTING, f"{r.hostname}#{r.server_id}")
        # The supervisor holds what it started until the replica answers or its time is up.
        assert r.lease == Lease(SUPERVISOR_HOLDER, world.clock.now + START_TIMEOUT)
    state = world.tick()
    assert all(r.state == READY and r.lease is None for r in state.replicas)
    assert world.events.seen == [("ready", "Server1"), ("ready", "Server2")]
    world.tick(3)
    assert world.backend.started == ["Server1", "Server2"]  # nothing more to do


def test_answered_heartbeats_are_recorded_at_the_record_pace_not_every_round(
        world: World) -> None:
    """Each write of the registry makes every balancer worker read it again: a quiet round
    writes nothing until the heartbeats on record are ``record_seconds`` old, then all at once;
    a change (a miss, a replica ready again) is written in its own round, its time with it."""
    record = world.sup.settings.record_seconds
    interval = world.sup.settings.heartbeat_interval
    state = world.ready()
    first = state.version
    assert {r.last_heartbeat for r in state.replicas} == {world.clock.now}
    rounds = int(record / interval)
    versions = []
    for _ in range(rounds):
        world.clock.advance(interval)
        versions.append(world.tick().version)
    assert versions[:-1] == [first] * (rounds - 1)  # nothing new to say: nothing written
    assert versions[-1] == first + 1  # the heartbeats on record were record_seconds old
    assert {r.last_heartbeat for r in world.registry.read().replicas} == {world.clock.now}
    world.backend.mute.add("Server2")
    world.clock.advance(interval)
    state = world.tick()  # a miss is news: written at once
    assert state.version == first + 2
    assert state.find("Server2").failures == 1  # type: ignore[union-attr]
    world.backend.mute.discard("Server2")
    world.clock.advance(interval)
    state = world.tick()  # answered again: written, with the time it answered
    assert state.version == first + 3
    back = state.find("Server2")
    assert back is not None and (back.failures, back.last_heartbeat) == (0, world.clock.now)
    # A clock that went back never leaves the registry unwritten for good.
    world.clock.advance(-3600)
    assert world.tick().version == first + 4


def test_a_dead_replica_is_replaced_under_a_new_name_with_its_server_id_and_slots(
        world: World) -> None:
    before = world.ready().find("Server1")
    assert before is not None
    dead = world.backend.die("Server1")
    state = world.tick()
    [new] = [r for r in state.replicas if r.server_id == 1]
    assert new.hostname.startswith("replica-") and new.slots == before.slots
    assert (new.state, new.handle) == (STARTING, f"{new.hostname}#3")
    assert world.backend.log[-2:] == [("stop", dead.handle), ("start", new.handle)]
    assert world.events.seen[-2:] == [("down", "Server1 process_gone"),
                                      ("replacing", new.hostname)]
    state = world.tick()
    assert [(r.hostname, r.server_id, r.state) for r in state.replicas] == [
        (new.hostname, 1, READY), ("Server2", 2, READY)]


def test_a_hung_replica_is_down_after_its_missed_heartbeats_and_replaced(world: World) -> None:
    world.ready()
    world.backend.mute.add("Server2")
    state = world.tick()
    hung = state.find("Server2")
    assert hung is not None and (hung.state, hung.failures) == (READY, 1)  # one miss: kept
    state = world.tick()
    assert state.find("Server2") is None  # the second: down, and replaced at once
    assert ("down", "Server2 missed_heartbeats") in world.events.seen
    assert world.backend.stopped == ["Server2#2"]


def test_a_replica_that_never_answers_is_retried_under_its_name_with_back_off(
        world: World) -> None:
    world.backend.mute.add("Server1")
    world.tick(2)
    world.clock.advance(START_TIMEOUT)  # its time is up: a failed start
    waits = []
    for attempt in range(1, 5):
        state = world.tick()
        entry = state.find("Server1")
        assert entry is not None and (entry.state, entry.restarts) == (DOWN, attempt)
        waits.append(entry.not_before - world.clock.now)
        starts = len(world.backend.started)
        world.clock.advance(waits[-1] / 2)
        world.tick()
        assert len(world.backend.started) == starts  # not before its back-off is over
        world.clock.advance(waits[-1] / 2)
        state = world.tick()
        assert len(world.backend.started) == starts + 1  # then again, under its own name
        assert world.backend.started[-1] == "Server1" and state.find("Server1") is not None
        world.clock.advance(START_TIMEOUT)
    assert waits == [0.5, 1.0, 2.0, BACKOFF]  # doubling, up to LB_RESTART_BACKOFF
    # Each try's replica is stopped before the next starts (a container would hold the name).
    tries = [h for op, h in world.backend.log if op == "start" and h.startswith("Server1#")]
    assert [("stop", h) in world.backend.log for h in tries] == [True] * 4 + [False]
    world.backend.mute.clear()
    state = world.tick()
    entry = state.find("Server1")
    assert entry is not None and (entry.state, entry.restarts) == (READY, 0)
    assert world.events.seen.count(("down", "Server1 never_ready")) == 4


def test_an_orphan_is_stopped_after_it_is_seen_twice(world: World) -> None:
    world.ready()
    stray = Instance("stray", "stray#0", f"{NOBODY}/stray", 99)
    world.backend.running[stray.handle] = stray
    # A replica an /add has started and not yet recorded: known by the name it reserved.
    adding = Lease.take(Purpose.ADD, START_TIMEOUT)
    with world.registry.update() as state:
        slots = state.hash_ring().add(3)
        state.replicas.append(Replica("Adding1", 3, list(slots), lease=adding))
    fresh = Instance("Adding1", "Adding1#0", f"{NOBODY}/Adding1", 3)
    world.backend.running[fresh.handle] = fresh
    world.tick()
    assert world.backend.stopped == []  # seen once: it may be an /add's, not yet recorded
    world.tick()
    world.settle()
    assert world.backend.stopped == [stray.handle]


def test_an_rm_that_died_half_way_is_finished(world: World) -> None:
    world.ready()
    with world.registry.update() as state:
        for name, holder in (("Server1", dead_holder(Purpose.RM)), ("Server2", "rm:elsewhere")):
            entry = state.find(name)
            assert entry is not None
            entry.state, entry.lease = REMOVING, Lease(holder, world.clock.now + 20)
    world.tick()
    state = world.settle()
    # Its holder is gone: finished at once. The other's holder cannot be seen from here
    # (another host or pid namespace): it is left to its /rm until its lease ends.
    assert [r.hostname for r in state.replicas] == ["Server2"]
    assert world.backend.log[-1] == ("stop", "Server1#1")
    assert "Server2#2" not in world.backend.stopped


def test_an_rm_whose_lease_ended_is_finished(world: World) -> None:
    world.ready()
    with world.registry.update() as state:
        entry = state.find("Server2")
        assert entry is not None
        entry.state, entry.lease = REMOVING, Lease("rm:elsewhere", world.clock.now + 20)
    world.tick(3)
    assert world.registry.read().find("Server2") is not None
    world.clock.advance(20)
    world.tick()
    state = world.settle()
    assert [r.hostname for r in state.replicas] == ["Server1"]
    assert world.backend.stopped == ["Server2#2"]
    assert world.backend.started == ["Server1", "Server2"]  # never resurrected


def test_the_hold_of_a_dead_add_is_released_and_its_replica_taken_in(world: World) -> None:
    world.ready()
    # Two /adds in flight: one whose worker was killed after starting its replica, before
    # recording it ready; one alive, still waiting for its replica's heartbeat.
    with world.registry.update() as state:
        ring = state.hash_ring()
        for name, server_id, holder in (("Orphaned", 3, dead_holder(Purpose.ADD)),
                                        ("Waiting", 4, Lease.take(Purpose.ADD, 0).holder)):
            inst = Instance(name, f"{name}#0", f"{NOBODY}/{name}", server_id)
            world.backend.running[inst.handle] = inst
            state.replicas.append(Replica(
                name, server_id, list(ring.add(server_id)), handle=inst.handle,
                address=inst.address, lease=Lease(holder, world.clock.now + 70)))
    state = world.tick()
    orphaned, waiting = state.find("Orphaned"), state.find("Waiting")
    assert orphaned is not None and not orphaned.held  # released: the supervisor's now
    assert waiting is not None and waiting.adding and waiting.state == STARTING
    state = world.tick()
    assert [(r.hostname, r.state) for r in state.replicas] == [
        ("Server1", READY), ("Server2", READY), ("Orphaned", READY), ("Waiting", STARTING)]
    assert world.backend.started == ["Server1", "Server2"]  # taken in, not started again
    assert world.backend.stopped == []


def test_a_supervisor_restarted_mid_start_takes_back_what_it_had_reserved(
        world: World) -> None:
    world.ready()
    world.backend.die("Server1")
    # The previous supervisor reserved the replacement, started it, and died before recording
    # it: a reserved entry, and a replica of that name running.
    with world.registry.update() as state:
        entry = state.find("Server1")
        assert entry is not None
        entry.hostname, entry.state, entry.handle, entry.address = "replica-abcdef", STARTING, \
            None, None
        entry.lease = Lease(SUPERVISOR_HOLDER, world.clock.now + START_TIMEOUT)
    started = Instance("replica-abcdef", "replica-abcdef#0", f"{NOBODY}/replica-abcdef", 1)
    world.backend.running[started.handle] = started
    sup = Supervisor(world.sup.settings, world.registry, world.backend, world.events)
    try:
        sup.start_up()
        sup.tick()
        state = sup.registry.read()
    finally:
        sup.close()
    entry = state.find("replica-abcdef")
    assert entry is not None and entry.handle == started.handle  # adopted, not doubled
    assert world.backend.started == ["Server1", "Server2"]


# -- what an /add wants of the leading supervisor (the etcd registry) -----------------------------
def want(world: World, name: str, server_id: int, holder: str | None = None) -> Lease:
    """An entry an /add reserved for the supervisor to start (``Purpose.WANT``)."""
    lease = Lease.take(Purpose.WANT, START_TIMEOUT)
    if holder is not None:
        lease = Lease(holder, lease.until)
    with world.registry.update() as state:
        slots = state.hash_ring().add(server_id)
        state.replicas.append(Replica(name, server_id, list(slots), lease=lease))
    return lease


def test_a_wanted_entry_is_started_under_the_calls_lease_and_left_to_the_add(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The /add waits for its replicas' heartbeats and commits them itself: the supervisor
    starts them, and neither probes them nor makes them ready nor takes their lease."""
    world.ready()
    lease = want(world, "Wanted", 3)
    probed: list[str] = []
    monkeypatch.setattr(supervisor.core, "probe",
                        lambda address, timeout: probed.append(address) or
                        world.backend.probe(address, timeout))
    state = world.tick()
    entry = state.find("Wanted")
    assert entry is not None and world.backend.started[-1] == "Wanted"
    assert (entry.state, entry.handle, entry.lease) == (STARTING, "Wanted#3", lease)
    world.clock.advance(START_TIMEOUT)  # past the supervisor's own start time, within the call's
    state = world.tick(3)
    entry = state.find("Wanted")
    assert entry is not None
    assert (entry.state, entry.lease, entry.last_heartbeat) == (STARTING, lease, None)
    assert world.backend.started.count("Wanted") == 1  # started once
    assert entry.address is not None and entry.address not in probed


@pytest.mark.parametrize("how", ["its lease ran out", "its caller died"])
def test_a_wanted_entry_left_uncommitted_is_removed_and_its_replica_stopped(
        world: World, caplog: pytest.LogCaptureFixture, how: str) -> None:
    world.ready()
    lease = want(world, "Wanted", 3,
                 holder=dead_holder(Purpose.WANT) if how == "its caller died" else None)
    state = world.tick()
    if how == "its lease ran out":
        entry = state.find("Wanted")
        assert entry is not None and entry.handle == "Wanted#3"  # started, never committed
        world.clock.advance(lease.until - world.clock.now)
    caplog.set_level("WARNING", logger="supervisor.core")
    world.tick()
    state = world.settle()
    assert any("did not commit it in time: removing it" in r.getMessage()
               for r in caplog.records)
    assert [r.hostname for r in state.replicas] == ["Server1", "Server2"]
    if how == "its lease ran out":
        assert world.backend.stopped == ["Wanted#3"]
    assert "Wanted" not in {i.hostname for i in world.backend.list()}


def test_a_wanted_entry_whose_lease_ran_out_before_it_started_is_never_started(
        world: World) -> None:
    world.ready()
    lease = want(world, "Late", 3)
    world.clock.advance(lease.until - world.clock.now)
    world.tick()
    state = world.settle()
    assert state.find("Late") is None
    assert "Late" not in world.backend.started


def test_a_supervisor_that_may_not_act_starts_and_stops_nothing(world: World) -> None:
    """A supervisor that lost its leadership: another acts, so this one must not start or stop
    a replica, whatever the registry asks for."""
    world.ready()
    stray = Instance("stray", "stray#0", f"{NOBODY}/stray", 99)
    world.backend.running[stray.handle] = stray
    want(world, "Wanted", 3)
    with world.registry.update() as state:
        gone = state.find("Server2")
        assert gone is not None
        gone.state, gone.lease = REMOVING, Lease("rm:elsewhere", 0.0)  # an /rm's, released
    world.backend.die("Server1")
    log_before = list(world.backend.log)
    passive = Supervisor(world.sup.settings, world.registry, world.backend, world.events,
                         may_act=lambda: False)
    try:
        for _ in range(3):
            passive.tick()
    finally:
        passive.close()  # waits for anything it put in the background
    assert world.backend.log == log_before  # nothing started, nothing stopped
    assert stray.handle in world.backend.running
