"""Races between the supervisor's tick and an /rm, replayed deterministically.

Found by the concurrent-admin system test, which failed now and then: an /rm that landed
between the supervisor's heartbeat probe and its registry update got its entry turned back
into a ready replica (the probe had answered); the /rm then stopped the process, left the
entry, and the supervisor "replaced" the removed replica under a new name.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import supervisor.core
from lb.backends import Backend, Instance, ReplicaSpec
from lb.bootstrap import ensure_registry
from lb.registry import READY, REMOVING, Registry
from lb.settings import Settings
from supervisor.core import Supervisor


class FakeBackend(Backend):
    """Every replica runs; starts and stops are only recorded."""

    name = "fake"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []

    def start(self, spec: ReplicaSpec) -> Instance:
        self.started.append(spec.hostname)
        return Instance(spec.hostname, f"h-{spec.hostname}", "http://127.0.0.1:9",
                        spec.server_id)

    def stop(self, handle: str, timeout: float = 10.0) -> None:
        self.stopped.append(handle)

    def list(self) -> list[Instance]:
        return []

    def is_running(self, handle: str) -> bool:
        return True


def test_rm_between_probe_and_mark_is_not_undone(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({}, registry=str(tmp_path / "registry.json"), n=2,
                                 deployment="race")
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    with registry.update() as state:
        for r in state.replicas:
            r.state, r.handle, r.address = READY, f"h-{r.hostname}", f"http://{r.hostname}"
    backend = FakeBackend()
    sup = Supervisor(settings, registry, backend)
    owner = "rm:test"

    def probe_then_rm(address: str, timeout: float) -> bool:
        if address == "http://Server1":  # the heartbeat answers; then an /rm takes Server1
            with registry.update() as state:
                entry = state.find("Server1")
                assert entry is not None
                entry.state, entry.owner, entry.deadline = REMOVING, owner, time.time() + 30
        return True

    monkeypatch.setattr(supervisor.core, "probe", probe_then_rm)
    try:
        sup.tick()
        entry = registry.read().find("Server1")
        assert entry is not None and (entry.state, entry.owner) == (REMOVING, owner)
        # The /rm finishes as it does in lb.admin: it forgets the entries it still owns.
        with registry.update() as state:
            state.replicas = [r for r in state.replicas
                              if not (r.owner == owner and r.state == REMOVING)]
        monkeypatch.setattr(supervisor.core, "probe", lambda address, timeout: True)
        for _ in range(3):
            sup.tick()
    finally:
        sup.close()
    state = registry.read()
    assert [(r.hostname, r.server_id) for r in state.replicas] == [("Server2", 2)]
    assert backend.started == []  # the removed replica was not "replaced"
