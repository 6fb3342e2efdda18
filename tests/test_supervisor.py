"""The supervisor's reconcile loop, tick by tick, over real local replica processes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.backends import BackendError, ReplicaSpec
from lb.backends.local import LocalBackend
from lb.bootstrap import ensure_registry
from lb.leases import SUPERVISOR_HOLDER, Lease
from lb.registry import DOWN, READY, REMOVING, Registry
from lb.settings import Settings
from supervisor.core import Supervisor
from tests.helpers_backend import FakeBackend

pytestmark = pytest.mark.system


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Settings, Registry, LocalBackend, Supervisor]]:
    settings = Settings.from_env({}, deployment=f"sv{os.getpid()}{tmp_path.name[-6:]}",
                                 registry=str(tmp_path / "registry.json"), n=2,
                                 heartbeat_timeout=1.0)
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    backend = LocalBackend(settings)
    sup = Supervisor(settings, registry, backend)
    yield settings, registry, backend, sup
    sup.close()
    backend.stop_all()


def tick_until(sup: Supervisor, registry: Registry, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done(registry.read()):
        assert time.monotonic() < deadline, registry.read().to_dict()
        sup.tick()
        time.sleep(0.1)


def all_ready(n: int):
    return lambda s: len(s.members()) == n and all(r.state == READY for r in s.members())


def test_brings_up_the_wanted_set_then_replaces_the_dead(world) -> None:
    _settings, registry, backend, sup = world
    tick_until(sup, registry, all_ready(2))
    assert sorted(i.hostname for i in backend.list()) == ["Server1", "Server2"]
    dead = registry.read().find("Server1")
    assert dead is not None and dead.handle
    os.kill(int(dead.handle.split("/")[0]), signal.SIGKILL)
    tick_until(sup, registry, lambda s: s.find("Server1") is None and all_ready(2)(s))
    new = next(r for r in registry.read().members() if r.server_id == dead.server_id)
    assert new.hostname != "Server1" and new.slots == dead.slots
    assert sorted(i.hostname for i in backend.list()) == sorted(
        r.hostname for r in registry.read().members())


def test_a_hung_replica_is_declared_down_by_heartbeat(world) -> None:
    _settings, registry, backend, sup = world
    tick_until(sup, registry, all_ready(2))
    hung = registry.read().find("Server2")
    assert hung is not None and hung.handle
    for proc in backend._processes(hung.handle.split("/")[1]):
        proc.suspend()  # SIGSTOP: the socket still accepts, nothing answers
    tick_until(sup, registry, lambda s: s.find("Server2") is None and all_ready(2)(s), 30)


def test_removed_replicas_are_not_resurrected_and_half_done_removals_finish(world) -> None:
    _settings, registry, backend, sup = world
    tick_until(sup, registry, all_ready(2))
    with registry.update() as state:  # what an /rm that died half-way leaves behind
        r = state.find("Server2")
        assert r is not None
        r.state, r.lease = REMOVING, Lease("rm:dead", 0.0)
    tick_until(sup, registry, lambda s: s.find("Server2") is None)
    for _ in range(5):  # and it stays gone
        sup.tick()
    state = registry.read()
    assert len(state.replicas) == 1 and state.replicas[0].hostname == "Server1"
    assert [i.hostname for i in backend.list()] == ["Server1"]


def test_orphans_are_stopped_and_unrecorded_starts_adopted(world) -> None:
    _settings, registry, backend, sup = world
    tick_until(sup, registry, all_ready(2))
    orphan = backend.start(ReplicaSpec("stray", 99))
    # A replica started for an entry whose handle was never recorded (a crash in between).
    with registry.update() as state:
        state.replicas[0].handle = state.replicas[0].address = None
        state.replicas[0].lease = Lease(SUPERVISOR_HOLDER, 0.0)
    deadline = time.monotonic() + 20
    while backend.is_running(orphan.handle) and time.monotonic() < deadline:
        sup.tick()
        time.sleep(0.1)
    names = sorted(i.hostname for i in backend.list())
    assert names == ["Server1", "Server2"], names  # stray stopped, Server1 adopted, not doubled
    assert not backend.is_running(orphan.handle)
    tick_until(sup, registry, all_ready(2))


def test_crash_loop_guard_backs_off(tmp_path: Path) -> None:
    settings = Settings.from_env({}, registry=str(tmp_path / "r.json"), n=1,
                                 restart_backoff=2.0)
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    backend = FakeBackend(start_error=BackendError("image missing"))
    sup = Supervisor(settings, registry, backend)
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        sup.tick()
        time.sleep(0.05)
    sup.close()
    # Without the guard: ~80 attempts in 4 s. With it: 0.5, 1, 2, 2 ... seconds apart.
    gaps = [b - a for a, b in zip(backend.start_times, backend.start_times[1:])]
    assert 3 <= len(backend.started) <= 6, backend.start_times
    assert all(g >= 0.45 for g in gaps)
    entry = registry.read().replicas[0]
    assert entry.state == DOWN and entry.restarts == len(backend.started)
    assert entry.hostname == "Server1"  # never up, so tried again under its own name
    assert backend.started == ["Server1"] * len(backend.started)


def test_a_replica_that_never_answers_is_restarted_under_its_name(tmp_path: Path) -> None:
    settings = Settings.from_env({}, registry=str(tmp_path / "r.json"), n=1, start_timeout=0.3,
                                 heartbeat_timeout=0.2, restart_backoff=0.5)
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    backend = FakeBackend()  # started, at an address where nothing answers its heartbeat
    sup = Supervisor(settings, registry, backend)
    end = time.monotonic() + 10.0
    while len(backend.started) < 3 and time.monotonic() < end:
        sup.tick()
        time.sleep(0.05)
    sup.close()
    assert len(backend.started) >= 3, backend.log
    # Each try is a new start under the same name, after the previous one was stopped (its
    # container would hold the name); the stopped one is never adopted back.
    assert {i.hostname for i in backend.list()} == {"Server1"}
    assert backend.log[:5] == [("start", "Server1#1"), ("stop", "Server1#1"),
                               ("start", "Server1#2"), ("stop", "Server1#2"),
                               ("start", "Server1#3")]
    assert registry.read().replicas[0].hostname == "Server1"
