"""The supervisor's faults, replayed deterministically: races between its tick and an /rm, a
registry file that is lost, a folder that cannot be written, an owner that died.

Found by the concurrent-admin system test, which failed now and then: an /rm that landed
between the supervisor's heartbeat probe and its registry update got its entry turned back
into a ready replica (the probe had answered); the /rm then stopped the process, left the
entry, and the supervisor "replaced" the removed replica under a new name.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import supervisor.core
from lb.backends import Instance
from lb.bootstrap import ensure_registry
from lb.heartbeat import ANSWERED, Heartbeat
from lb.leases import Lease
from lb.owners import owner_tag
from lb.registry import (
    READY,
    REMOVING,
    Registry,
    RegistryCorrupt,
    RegistryUnwritable,
    Replica,
)
from lb.settings import Settings
from supervisor.__main__ import Trouble
from supervisor.core import Supervisor
from tests.helpers_backend import NOBODY, FakeBackend
from tests.helpers_stack import immutable

World = tuple[Registry, FakeBackend, Supervisor]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """Two ready replicas of the fake backend, whose heartbeats answer."""
    backend = FakeBackend()
    settings = Settings.from_env({}, registry=str(tmp_path / "registry.json"), n=2,
                                 deployment="restore")
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    with registry.update() as state:
        for r in state.replicas:
            r.state, r.handle, r.address = READY, f"h-{r.hostname}", f"{NOBODY}/{r.hostname}"
            backend.running[r.handle] = Instance(r.hostname, r.handle, r.address, r.server_id)
    monkeypatch.setattr(supervisor.core, "probe", backend.probe)
    sup = Supervisor(settings, registry, backend)
    yield registry, backend, sup
    sup.close()


def test_rm_between_probe_and_mark_is_not_undone(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    registry, backend, sup = world
    owner = "rm:test"

    def probe_then_rm(address: str, timeout: float) -> Heartbeat:
        if address.endswith("/Server1"):  # the heartbeat answers; then an /rm takes Server1
            with registry.update() as state:
                entry = state.find("Server1")
                assert entry is not None
                entry.state, entry.lease = REMOVING, Lease(owner, time.time() + 30)
        return ANSWERED

    monkeypatch.setattr(supervisor.core, "probe", probe_then_rm)
    try:
        sup.tick()
        entry = registry.read().find("Server1")
        assert entry is not None and entry.state == REMOVING and entry.leased_to(owner)
        # The /rm finishes as it does in lb.admin: it forgets the entries it still owns.
        with registry.update() as state:
            state.replicas = [r for r in state.replicas
                              if not (r.leased_to(owner) and r.state == REMOVING)]
        monkeypatch.setattr(supervisor.core, "probe", backend.probe)
        for _ in range(3):
            sup.tick()
    finally:
        sup.close()
    state = registry.read()
    assert [(r.hostname, r.server_id) for r in state.replicas] == [("Server2", 2)]
    assert backend.started == []  # the removed replica was not "replaced"


# -- a registry file that is lost, a folder that cannot be written, owners that die ---------------
def test_a_corrupt_registry_is_restored_from_the_last_good_state_and_what_runs(
        world: World, tmp_path: Path) -> None:
    registry, backend, sup = world
    try:
        sup.tick()
        good = registry.read()
        # An /add committed after the supervisor's last read, then the file is lost.
        backend.running["h-S9"] = Instance("S9", "h-S9", f"{NOBODY}/S9", 9)
        Path(registry.path).write_text("{garbage")
        sup.tick()
    finally:
        sup.close()
    state = registry.read()
    assert [(r.hostname, r.server_id, r.handle) for r in state.replicas] == [
        ("Server1", 1, "h-Server1"), ("Server2", 2, "h-Server2"), ("S9", 9, "h-S9")]
    assert [r.slots for r in state.replicas[:2]] == [r.slots for r in good.replicas]
    assert state.replicas[2].slots == list(state.hash_ring(state.replicas[:2]).add(9))
    assert all(r.state == READY for r in state.replicas)
    assert state.version > good.version + 999  # past anything a balancer worker saw
    assert backend.started == [] and backend.stopped == []  # nothing restarted or lost
    [kept] = tmp_path.glob("registry.json.corrupt-*")
    assert kept.read_text() == "{garbage"


def test_a_supervisor_started_on_an_unreadable_registry_takes_in_what_runs(
        tmp_path: Path) -> None:
    settings = Settings.from_env({}, registry=str(tmp_path / "registry.json"), n=3)
    Path(settings.registry_path).write_text("")
    backend = FakeBackend(Instance("Server2", "h2", f"{NOBODY}/Server2", 2),
                          Instance("S7", "h7", f"{NOBODY}/S7", 7))
    sup = Supervisor(settings, Registry(settings.registry_path), backend)
    try:
        sup.start_up()
    finally:
        sup.close()
    state = Registry(settings.registry_path).read()
    assert state.rep() == {"N": 2, "replicas": ["Server2", "S7"]}  # not a fresh N=3
    assert backend.started == []


def test_a_lost_registry_that_cannot_be_rewritten_says_a_person_must_act(
        world: World, tmp_path: Path) -> None:
    registry, _backend, sup = world
    try:
        sup.tick()
        with immutable(tmp_path):
            Path(registry.path).write_text("{garbage")
            with pytest.raises(RegistryUnwritable) as caught:
                sup.tick()
        assert "a person must act" in str(caught.value) and str(tmp_path) in str(caught.value)
        assert str(tmp_path) not in caught.value.reason
        sup.tick()  # writable again: restored
    finally:
        sup.close()
    assert registry.read().rep() == {"N": 2, "replicas": ["Server1", "Server2"]}


def test_the_hold_of_a_dead_owner_is_released_at_once(world: World) -> None:
    registry, backend, sup = world
    code = "from lb.owners import owner_tag; print(owner_tag('add'))"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    dead = child.communicate(timeout=30)[0].strip()
    with registry.update() as state:  # two /adds in flight, reserved for 70 s
        for name, server_id, owner in (("Dead1", 5, dead), ("Live1", 6, owner_tag("add"))):
            state.replicas.append(Replica(name, server_id, [],
                                          lease=Lease(owner, time.time() + 70)))
    try:
        sup.tick()
    finally:
        sup.close()
    state = registry.read()
    assert backend.started == ["Dead1"]  # finished by the supervisor, under its own name
    dead_entry, live_entry = state.find("Dead1"), state.find("Live1")
    assert dead_entry is not None and dead_entry.handle == "Dead1#1"
    assert live_entry is not None and live_entry.held and live_entry.handle is None


def test_the_loop_says_each_trouble_once_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    trouble = Trouble(interval=0.5)
    caplog.set_level(logging.INFO, logger="supervisor")
    unwritable = RegistryUnwritable("cannot write registry /x/r.json: tmp-1", "Permission denied")
    waits = [trouble.failed(unwritable) for _ in range(8)]
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    trouble.failed(RegistryUnwritable("cannot write registry /x/r.json: tmp-2",
                                      "Permission denied"))  # another temp file: no news
    trouble.failed(RegistryCorrupt("r.json is garbage", "not valid JSON"))  # news
    trouble.cleared()
    trouble.cleared()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("supervising is stuck: cannot write registry")
    assert lines[1].startswith("supervising is stuck: r.json is garbage")
    assert lines[2].startswith("supervising again after")
    assert trouble.failed(unwritable) == 0.5  # a new episode starts from the shortest wait
