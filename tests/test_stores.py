"""The registry stores' one contract, held by every store: the JSON file and etcd.

Everything above the stores (the admin, the supervisor, the routers) is written once against
this face, so each case runs once per store, on a fresh empty one: a file in ``tmp_path`` or a
prefix of its own on the session's etcd cluster. Writers in other processes are real
processes; the etcd store talks to real etcd members.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import etcd3gw
import pytest

import lb.etcd
from lb.bootstrap import HashMapMismatch, ensure_registry, initial_state
from lb.etcd import EtcdRegistry, put
from lb.evidence import STALE_SECONDS, Publisher
from lb.registry import (
    READY,
    Registry,
    RegistryCorrupt,
    RegistryError,
    RegistryMissing,
    State,
)
from lb.settings import EtcdAddress, Settings
from lb.stores import Store, View
from tests.helpers_etcd import etcd_cluster, etcd_prefix, etcd_registry, new_cluster  # noqa: F401

pytestmark = pytest.mark.system  # the etcd cases run etcd members, the races run processes

SETTINGS = Settings.from_env({}, n=2)
WAIT = 20.0  # seconds any bounded wait gives up after: far beyond what a change takes


@pytest.fixture(params=["file", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh, empty store of each kind."""
    if request.param == "file":
        return Registry(str(tmp_path / "registry.json"), lock_timeout=10.0)
    registry: EtcdRegistry = request.getfixturevalue("etcd_registry")
    return registry


@pytest.fixture
def views(store: Store) -> Iterator[Callable[[], View]]:
    """Views of the store, each following it (a watch thread for etcd, a poll for the file);
    closed at the end."""
    made: list[View] = []

    def make() -> View:
        view = store.view()
        view.follow(0.05)
        made.append(view)
        return view

    yield make
    for view in made:
        close = getattr(view, "close", None)
        if close is not None:
            close()


def seed() -> State:
    return initial_state(SETTINGS)


def damage(store: Store, raw: bytes) -> None:
    """The store's value replaced by ``raw`` behind its back (a bad hand edit, a bad disk)."""
    if isinstance(store, Registry):
        Path(store.path).write_bytes(raw)
    else:
        store.etcd.txn([], [put(store.state_key, raw)])


def kept_aside(store: Store) -> list[bytes]:
    """What ``restore`` kept of unreadable values."""
    if isinstance(store, Registry):
        return [Path(p).read_bytes() for p in sorted(glob.glob(store.path + ".corrupt-*"))]
    host, port = store.address.endpoints[0]
    client = etcd3gw.Etcd3Client(host=host, port=port, api_path="/v3/")
    return [value for value, _meta in client.get_prefix(store.address.prefix + "/corrupt-")]


def eventually(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


# -- in other processes: the store rebuilt from what can be pickled ------------------------------
def recipe(store: Store) -> tuple[str, Any]:
    return ("file", store.path) if isinstance(store, Registry) else ("etcd", store.address)


def reopen(kind: str, where: Any) -> Store:
    if kind == "file":
        return Registry(where, lock_timeout=60.0)
    assert isinstance(where, EtcdAddress)
    return EtcdRegistry(where, lock_timeout=60.0)


def _create_one(kind: str, where: Any, name: str, go: Any, out: Any) -> None:
    state = seed()
    state.replicas[0].hostname = name  # which process's state it is
    go.wait()
    out.put(reopen(kind, where).create(state).replicas[0].hostname)


def _increment(kind: str, where: Any, times: int, go: Any) -> None:
    store = reopen(kind, where)
    go.wait()
    for _ in range(times):
        with store.update() as state:
            state.replicas[0].failures += 1


def run_processes(target: Callable[..., None], args: list[tuple[Any, ...]],
                  out: bool = False) -> list[Any]:
    """``target(*a, go[, out])`` in one spawned process per ``a``, all let go at once; what
    they put in ``out``."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, go, *((queue,) if out else ())))
             for a in args]
    for p in procs:
        p.start()
    try:
        go.set()
        results = [queue.get(timeout=60) for _ in procs] if out else []
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


# -- create ----------------------------------------------------------------------------------------
def test_create_writes_version_one_then_keeps_what_is_there(store: Store) -> None:
    first = store.create(seed())
    assert first.version == 1 and store.exists()
    other = seed()
    other.replicas.pop()
    again = store.create(other)
    assert again.to_dict() == first.to_dict()  # the existing state, not ours
    assert store.read().to_dict() == first.to_dict()


def test_a_replicas_failure_domain_is_stored_and_read_back(store: Store) -> None:
    store.create(seed())
    with store.update() as state:
        state.replicas[0].domain = "worker1"
    assert [r.domain for r in store.read().replicas] == ["worker1", None]


def test_create_with_replace_moves_the_version_past_the_old_one(store: Store) -> None:
    """Readers rebuild their tables when the version changes: a reset must never hand out a
    version they already saw."""
    store.create(seed())
    for _ in range(3):
        with store.update() as state:
            state.replicas[0].failures += 1
    assert store.read().version == 4
    fresh = seed()
    fresh.replicas.pop()
    replaced = store.create(fresh, replace=True)
    assert replaced.version == 5
    assert [r.hostname for r in store.read().replicas] == ["Server1"]


def test_concurrent_creates_from_several_processes_yield_one_state(store: Store) -> None:
    names = run_processes(_create_one, [(*recipe(store), f"p{i}") for i in range(4)], out=True)
    written = store.read()
    assert written.version == 1
    assert set(names) == {written.replicas[0].hostname}  # every process got the one written


# -- update ----------------------------------------------------------------------------------------
def test_update_adds_one_to_the_version_and_an_unchanged_state_writes_nothing(
        store: Store) -> None:
    store.create(seed())
    with store.update() as state:
        state.replicas[0].state = READY
    changed = store.read()
    assert changed.version == 2 and changed.replicas[0].state == READY
    before = store.read_bytes()
    with store.update():
        pass
    with store.update() as state:
        state.replicas[0].state = READY  # as it was
    assert store.read_bytes() == before


def test_an_exception_inside_update_writes_nothing(store: Store) -> None:
    store.create(seed())
    before = store.read_bytes()
    with pytest.raises(RuntimeError, match="half-way"), store.update() as state:
        state.replicas.clear()
        raise RuntimeError("rejected half-way")
    assert store.read_bytes() == before


def test_update_of_a_missing_store_is_registry_missing(store: Store) -> None:
    with pytest.raises(RegistryMissing), store.update():
        pass
    assert not store.exists()


def test_writers_in_several_processes_lose_no_update(store: Store) -> None:
    """Each increment reads, changes and writes under the store's lock: one lost update would
    leave the count short."""
    store.create(seed())
    run_processes(_increment, [(*recipe(store), 20) for _ in range(4)])
    state = store.read()
    assert state.replicas[0].failures == 80
    assert state.version == 1 + 80


# -- restore ---------------------------------------------------------------------------------------
def test_restore_writes_a_missing_registry(store: Store) -> None:
    written = store.restore(seed())
    assert written is not None
    assert store.read().to_dict() == written.to_dict()


def test_restore_keeps_an_unreadable_value_aside_and_replaces_it(store: Store) -> None:
    store.create(seed())
    damage(store, b"garbage")
    with pytest.raises(RegistryCorrupt):
        store.read()
    good = seed()
    good.version = 1000
    assert store.restore(good) is not None
    assert store.read().version == 1000
    assert kept_aside(store) == [b"garbage"]


def test_restore_leaves_a_readable_registry_alone(store: Store) -> None:
    """Someone else restored it first: theirs stays."""
    store.create(seed())
    before = store.read_bytes()
    other = seed()
    other.replicas.pop()
    assert store.restore(other) is None
    assert store.read_bytes() == before
    assert kept_aside(store) == []


# -- views -----------------------------------------------------------------------------------------
def test_a_view_sees_what_another_process_writes(store: Store,
                                                 views: Callable[[], View]) -> None:
    store.create(seed())
    view = views()
    assert view.current().version == 1
    assert view.latest().version == 1
    writer = reopen(*recipe(store))  # another store object: another process's
    with writer.update() as state:
        state.replicas[0].state = READY
    eventually(lambda: view.current().version == 2, "the view sees the write")
    assert view.current().replicas[0].state == READY
    assert view.latest().version == 2 and view.problem is None


def test_a_view_fails_static_on_garbage_and_recovers_when_fixed(
        store: Store, views: Callable[[], View]) -> None:
    """Routing goes on with the last good state while the registry cannot be read; replies
    about the registry itself refuse; a good value is taken up again by itself."""
    store.create(seed())
    with store.update() as state:
        state.replicas[0].state = READY
    view = views()
    eventually(lambda: view.current().version == 2, "the view has the state")
    good = view.current()
    damage(store, b"garbage")

    def noticed() -> bool:
        view.current()  # the file's view looks when asked (its follow thread asks too)
        return view.problem is not None

    eventually(noticed, "the view notices the garbage")
    assert isinstance(view.problem, RegistryCorrupt)
    assert view.current() is good  # the last good state, not an error
    with pytest.raises(RegistryError):
        view.latest()
    fixed = seed()
    fixed.version = 1000
    assert store.restore(fixed) is not None
    eventually(lambda: view.current().version == 1000 and view.problem is None,
               "the view takes the fixed value")
    assert view.latest().version == 1000 and view.stale_since is None


# -- the hash map a registry was written with ------------------------------------------------------
def test_ensure_registry_refuses_a_registry_written_with_another_hash_map(
        store: Store) -> None:
    created = ensure_registry(SETTINGS, store)
    assert ensure_registry(SETTINGS, store).to_dict() == created.to_dict()  # same map: resumed
    other = Settings.from_env({}, n=2, virtual=SETTINGS.virtual_per_server + 1)
    with pytest.raises(HashMapMismatch, match="another|settings ask for"):
        ensure_registry(other, store)
    assert store.read().to_dict() == created.to_dict()  # refused: nothing changed


# -- evidence of life: the answers balancer workers got (lb.evidence) -------------------------------
def test_answer_counts_are_published_read_and_withdrawn_per_source(store: Store) -> None:
    assert store.read_answers() == {}
    store.publish_answers("lb-a-1", {"Server1": 3})
    store.publish_answers("lb-b-2", {"Server1": 1, "Server2": 9})
    store.publish_answers("lb-a-1", {"Server1": 4})  # replaced, not added to
    assert store.read_answers() == {"lb-a-1": {"Server1": 4},
                                    "lb-b-2": {"Server1": 1, "Server2": 9}}
    store.withdraw_answers("lb-a-1")
    store.withdraw_answers("lb-a-1")  # already gone: fine
    assert store.read_answers() == {"lb-b-2": {"Server1": 1, "Server2": 9}}
    assert not store.exists()  # beside the registry, not in it: no state was made


def test_a_workers_publisher_follows_its_counts_and_withdraws_them_at_its_stop(
        store: Store) -> None:
    counts: dict[str, int] = {}
    publisher = Publisher(store, lambda: counts, 0.05, source="lb-test-1")
    publisher.start()
    try:
        counts["Server1"] = 1
        eventually(lambda: store.read_answers() == {"lb-test-1": {"Server1": 1}},
                   "the counts are published")
        counts["Server1"] = 2
        eventually(lambda: store.read_answers() == {"lb-test-1": {"Server1": 2}},
                   "a change is published")
    finally:
        publisher.stop()
    assert store.read_answers() == {}


def test_answer_files_sit_in_a_folder_of_their_own_and_old_ones_go(tmp_path: Path) -> None:
    """The registry's folder is watched (inotify, lb.watch): these writes must not wake every
    balancer worker. A worker killed without withdrawing leaves a file that stops changing;
    it goes once STALE_SECONDS old. Half a file (a writer killed) is ignored."""
    registry = Registry(str(tmp_path / "registry.json"))
    registry.publish_answers("lb-a-1", {"Server1": 1})
    registry.publish_answers("lb-dead-2", {"Server1": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json.answers"]
    folder = Path(registry.answers_folder)
    old = time.time() - STALE_SECONDS - 1
    os.utime(folder / "lb-dead-2.json", (old, old))
    (folder / "lb-half-3.json").write_text('{"Server1": ')
    assert registry.read_answers() == {"lb-a-1": {"Server1": 1}}
    assert sorted(p.name for p in folder.iterdir()) == ["lb-a-1.json", "lb-half-3.json"]


def test_an_answers_key_goes_with_its_workers_lease(etcd_registry: EtcdRegistry,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies without withdrawing (SIGKILL) stops refreshing its lease: its key
    goes when the lease runs out, so no counter is left that nothing will change."""
    monkeypatch.setattr(lb.etcd, "ANSWERS_TTL", 2)  # etcd's shortest lease
    worker = EtcdRegistry(etcd_registry.address, lock_timeout=5.0)
    worker.publish_answers("lb-dead-1", {"Server1": 1})
    etcd_registry.publish_answers("lb-live-2", {"Server1": 5})
    assert set(etcd_registry.read_answers()) == {"lb-dead-1", "lb-live-2"}
    deadline = time.monotonic() + WAIT
    while "lb-dead-1" in etcd_registry.read_answers():
        etcd_registry.publish_answers("lb-live-2", {"Server1": 5})  # refreshes its own lease
        assert time.monotonic() < deadline, "the dead worker's key is still there"
        time.sleep(0.2)
    assert etcd_registry.read_answers() == {"lb-live-2": {"Server1": 5}}
