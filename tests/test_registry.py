"""The registry: atomic writes, versions, the lock, and no lost update between processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lb.bootstrap import ensure_registry, initial_state
from lb.registry import (
    READY,
    Registry,
    RegistryBusy,
    RegistryCorrupt,
    RegistryMissing,
    RegistryView,
    Replica,
)
from lb.settings import Settings


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(str(tmp_path / "registry.json"), lock_timeout=60)
    ensure_registry(Settings.from_env({}, registry=reg.path), reg)
    return reg


def test_bootstrap_wants_n_replicas_named_and_numbered_like_the_spec(registry: Registry) -> None:
    state = registry.read()
    assert [(r.hostname, r.server_id, r.handle) for r in state.replicas] == [
        ("Server1", 1, None), ("Server2", 2, None), ("Server3", 3, None)]
    assert state.rep() == {"N": 3, "replicas": ["Server1", "Server2", "Server3"]}
    assert all(len(r.slots) == 9 for r in state.replicas)


def test_ensure_registry_keeps_an_existing_one(registry: Registry) -> None:
    with registry.update() as state:
        state.replicas.pop()
    again = ensure_registry(Settings.from_env({}, registry=registry.path), registry)
    assert again.rep()["N"] == 2


def test_update_bumps_version_and_a_no_op_writes_nothing(registry: Registry) -> None:
    v0 = registry.read().version
    stamp = registry.stamp()
    with registry.update():
        pass
    assert registry.read().version == v0 and registry.stamp() == stamp
    with registry.update() as state:
        state.replicas[0].state = READY
    assert registry.read().version == v0 + 1


def test_an_exception_inside_update_changes_nothing(registry: Registry) -> None:
    before = registry.path and Path(registry.path).read_bytes()
    with pytest.raises(RuntimeError), registry.update() as state:
        state.replicas.clear()
        raise RuntimeError("rejected half-way")
    assert Path(registry.path).read_bytes() == before


def test_write_is_a_rename_of_a_complete_file(registry: Registry) -> None:
    ino = os.stat(registry.path).st_ino
    with registry.update() as state:
        state.replicas[0].failures = 1
    assert os.stat(registry.path).st_ino != ino  # replaced, not rewritten in place
    json.loads(Path(registry.path).read_text())  # complete JSON
    leftovers = [p for p in os.listdir(os.path.dirname(registry.path)) if p.endswith(".tmp")]
    assert leftovers == []


def test_missing_and_corrupt_files_are_distinct_errors(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "r.json"))
    with pytest.raises(RegistryMissing):
        reg.read()
    Path(reg.path).write_text("{not json")
    with pytest.raises(RegistryCorrupt):
        reg.read()
    Path(reg.path).write_text('{"version": 1}')
    with pytest.raises(RegistryCorrupt):
        reg.read()


def test_lock_timeout_is_registry_busy(registry: Registry) -> None:
    other = Registry(registry.path, lock_timeout=0.2)
    with registry.locked(), pytest.raises(RegistryBusy), other.update():
        pass


def test_reset_keeps_version_growing(registry: Registry) -> None:
    with registry.update() as state:
        state.replicas[0].failures = 3
    v = registry.read().version
    state = registry.create(initial_state(Settings.from_env({}, n=1)), replace=True)
    assert state.version == v + 1 and registry.read().rep()["N"] == 1


def test_view_rereads_only_after_a_change(registry: Registry, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    view = RegistryView(registry)
    monkeypatch.setattr(RegistryView, "RACY_SECONDS", 0.0)
    first = view.current()
    assert view.current() is first  # unchanged file: the cached object
    with registry.update() as state:
        state.replicas[1].state = READY
    second = view.current()
    assert second is not first and second.replicas[1].state == READY


def _add_many(path: str, prefix: str, count: int) -> None:
    reg = Registry(path, lock_timeout=60)
    for i in range(count):
        with reg.update() as state:
            sid = next(state.free_server_ids())
            state.replicas.append(Replica(f"{prefix}-{i}", sid, []))


def test_parallel_writers_lose_no_update(registry: Registry) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(registry.path, f"w{w}", 25)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    state = registry.read()
    names = [r.hostname for r in state.replicas]
    assert len(names) == 3 + 6 * 25 == len(set(names))
    ids = [r.server_id for r in state.replicas]
    assert len(set(ids)) == len(ids)  # no two writers handed out the same server id


def test_threads_sharing_one_registry_object_lose_no_update(registry: Registry) -> None:
    # A balancer worker's threads share one Registry: they must exclude each other too.
    def add(i: int) -> None:
        with registry.update() as state:
            sid = next(state.free_server_ids())
            time.sleep(0.001)  # widen the window a lost update would need
            state.replicas.append(Replica(f"thread-{i}", sid, []))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(add, range(100)))
    state = registry.read()
    assert len(state.replicas) == 103
    assert len({r.server_id for r in state.replicas}) == 103
