"""``/add`` handed to the supervisor (``Admin`` without a backend, as balancers run it on the
etcd registry), against a real supervisor in this process and real local replica processes.

The store is the file here: what is tested is the hand-over between the two (reserve under a
``WANT`` lease, started by the supervisor, committed by the call), which every store carries
alike (``tests/test_stores.py`` holds the stores to one contract).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.admin import Admin
from lb.backends.local import LocalBackend
from lb.bootstrap import ensure_registry
from lb.errors import ApiError
from lb.heartbeat import ANSWERED, probe
from lb.registry import READY, REMOVING, Registry, RegistryError
from lb.settings import Settings
from supervisor.core import Supervisor

pytestmark = pytest.mark.system

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    settings: Settings
    registry: Registry
    backend: LocalBackend
    admin: Admin
    supervise: Callable[[], None]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """One replica wanted, an admin without a backend; ``supervise()`` starts a supervisor
    ticking in a thread. Everything is stopped at the end, every replica included."""
    settings = Settings.from_env({}, deployment=f"aw{os.getpid()}{tmp_path.name[-6:]}",
                                 registry=str(tmp_path / "registry.json"), n=1,
                                 heartbeat_interval=0.1, heartbeat_timeout=1.0,
                                 start_timeout=3.0)
    registry = Registry(settings.registry_path)
    ensure_registry(settings, registry)
    backend = LocalBackend(settings)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    sup = Supervisor(settings, registry, backend)

    def loop() -> None:
        sup.start_up()
        while not stop.is_set():
            try:
                sup.tick()
            except RegistryError as exc:  # as lb-supervisor does: said, then the next round
                log.warning("supervisor round failed: %s", exc)
            stop.wait(settings.heartbeat_interval)

    def supervise() -> None:
        thread = threading.Thread(target=loop, name="supervisor", daemon=True)
        thread.start()
        threads.append(thread)

    yield Deployment(settings, registry, backend, Admin(settings, registry, None), supervise)
    stop.set()
    for thread in threads:
        thread.join(30)
    sup.close()
    backend.stop_all()


def test_an_add_returns_once_the_supervisor_started_its_replicas_and_they_answer(
        deployment: Deployment) -> None:
    deployment.supervise()
    state = deployment.admin.add(2, ["Fresh1"])
    added = [r for r in state.replicas if r.hostname != "Server1"]
    assert len(added) == 2 and "Fresh1" in {r.hostname for r in added}
    on_record = deployment.registry.read()
    for r in added:
        entry = on_record.find(r.hostname)
        assert entry is not None
        assert (entry.state, entry.lease) == (READY, None)  # committed by the call
        assert entry.address is not None and probe(entry.address, 2.0) is ANSWERED
    running = {i.hostname for i in deployment.backend.list()}
    assert {r.hostname for r in added} <= running  # the supervisor started them


def test_an_add_without_a_supervisor_adds_nothing(deployment: Deployment) -> None:
    before = [r.hostname for r in deployment.registry.read().members()]
    with pytest.raises(ApiError) as caught:
        deployment.admin.add(1, ["Orphan1"])
    assert caught.value.status == 503
    assert "No supervisor started the new replicas" in str(caught.value)
    assert "nothing was added" in str(caught.value)
    state = deployment.registry.read()
    assert [r.hostname for r in state.members()] == before  # no member added
    entry = state.find("Orphan1")
    assert entry is not None and entry.state == REMOVING and not entry.held  # handed back
    assert deployment.backend.list() == []  # nothing was started
