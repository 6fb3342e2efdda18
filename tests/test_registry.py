"""The registry: atomic writes, versions, the lock, and no lost update between processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lb.bootstrap import ensure_registry, initial_state
from lb.owners import owner_alive, owner_tag
from lb.registry import (
    READY,
    Registry,
    RegistryBusy,
    RegistryCorrupt,
    RegistryError,
    RegistryMissing,
    RegistryUnwritable,
    RegistryView,
    Replica,
    parse_state,
)
from lb.settings import Settings
from tests.helpers_stack import immutable


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


def test_a_racy_stamp_rereads_the_bytes_and_parses_only_a_change(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the file is too recent to trust its stamp, every call reads it again; the same
    bytes are the same state (not parsed again), and a rewrite that kept the stamp is seen."""
    view = RegistryView(registry)
    monkeypatch.setattr(RegistryView, "RACY_SECONDS", 3600.0)  # every stamp is racy
    parsed = []
    parse = registry.parse
    monkeypatch.setattr(registry, "parse", lambda raw: parsed.append(raw) or parse(raw))
    first = view.current()
    assert view.current() is first and view.current() is first
    assert len(parsed) == 1
    stamp = registry.stamp()
    with registry.update() as state:
        state.replicas[1].state = READY
    monkeypatch.setattr(registry, "stamp", lambda: stamp)  # a rewrite within one tick
    parsed.clear()  # update() parsed it too
    second = view.current()
    assert second is not first and second.replicas[1].state == READY
    assert view.current() is second and len(parsed) == 1


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


# -- fail static, and errors that say what without saying where -----------------------------------
def test_a_view_keeps_the_last_good_state_while_the_file_is_unreadable(
        registry: Registry, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(RegistryView, "RACY_SECONDS", 0.0)
    view = RegistryView(registry)
    good = view.current()
    assert view.problem is None and view.latest() is good
    reads = []
    real_read = registry.read
    monkeypatch.setattr(registry, "read", lambda: reads.append(1) or real_read())
    caplog.set_level(logging.WARNING, logger="lb.registry")
    for damage in ("{garbage", "", None):  # corrupt, empty, missing
        if damage is None:
            os.unlink(registry.path)
        else:
            Path(registry.path).write_text(damage)
        reads.clear()
        for _ in range(100):
            assert view.current() is good  # the last good state, not an error
        assert len(reads) <= 1  # an unreadable file is parsed once, not once per call
        assert isinstance(view.problem, RegistryMissing if damage is None else RegistryCorrupt)
        with pytest.raises(RegistryError):
            view.latest()  # replies about the registry itself refuse instead
    assert view.stale_since is not None
    # One line when it started and one per change of kind (corrupt -> missing), not per call.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("last good state (version" in line for line in lines)
    ensure_registry(Settings.from_env({}, registry=registry.path), registry)  # written again
    fresh = view.current()
    assert fresh is not good and view.problem is None and view.stale_since is None
    assert "readable again" in caplog.records[-1].getMessage() and len(caplog.records) == 3


def test_a_view_that_never_read_a_good_state_raises(tmp_path: Path) -> None:
    view = RegistryView(Registry(str(tmp_path / "r.json")))
    with pytest.raises(RegistryMissing):
        view.current()
    Path(view.registry.path).write_text("[]")
    with pytest.raises(RegistryCorrupt):
        view.current()


def test_a_followed_view_stays_recent_without_being_asked(registry: Registry) -> None:
    view = RegistryView(registry)
    first = view.current()
    view.follow(0.05)
    with registry.update() as state:
        state.replicas[0].state = READY
    deadline = time.monotonic() + 5
    while view._state is first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert view._state is not first and view._state.replicas[0].state == READY


@pytest.mark.parametrize(("content", "detail"), [
    ("{garbage", "not valid JSON: Expecting property name enclosed in double quotes"),
    ("", "not valid JSON: Expecting value"),
    ('{"version": 1}', "valid JSON, but not a registry"),
    ("[1, 2]", "valid JSON, but not a registry"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_errors_say_what_for_clients_and_where_for_logs(tmp_path: Path, content: str | bytes,
                                                        detail: str) -> None:
    reg = Registry(str(tmp_path / "r.json"))
    if isinstance(content, bytes):
        Path(reg.path).write_bytes(content)
    else:
        Path(reg.path).write_text(content)
    with pytest.raises(RegistryCorrupt) as caught:
        reg.read()
    assert caught.value.reason.startswith(f"the replica registry file is corrupt ({detail}")
    assert str(tmp_path) not in caught.value.reason
    assert reg.path in str(caught.value)  # the log line names the file


def test_an_unwritable_folder_is_its_own_error(registry: Registry) -> None:
    before = Path(registry.path).read_bytes()
    with immutable(Path(registry.path).parent):
        with pytest.raises(RegistryUnwritable) as caught, registry.update() as state:
            state.replicas[0].failures = 7
        assert caught.value.reason == ("the replica registry cannot be written "
                                       "(Operation not permitted)")
        assert registry.read().replicas[0].failures == 0
    assert Path(registry.path).read_bytes() == before
    with registry.update() as state:  # and writable again: nothing stuck
        state.replicas[0].failures = 7
    assert registry.read().replicas[0].failures == 7


def test_a_missing_lock_file_in_an_unwritable_folder_is_unwritable(registry: Registry) -> None:
    os.unlink(registry.path + ".lock")
    fresh = Registry(registry.path, lock_timeout=1)
    with immutable(Path(registry.path).parent), pytest.raises(RegistryUnwritable), \
            fresh.update():
        pass


def test_restore_keeps_the_unreadable_file_and_only_replaces_an_unreadable_one(
        registry: Registry) -> None:
    good = registry.read()
    assert registry.restore(initial_state(Settings.from_env({}, n=1))) is None  # readable
    assert registry.read().to_dict() == good.to_dict()
    Path(registry.path).write_text("{garbage")
    good.version += 1000
    assert registry.restore(good) is good
    assert registry.read().to_dict() == good.to_dict()
    [kept] = Path(registry.path).parent.glob("registry.json.corrupt-*")
    assert kept.read_text() == "{garbage"


# -- who holds an entry ---------------------------------------------------------------------------
def test_an_owner_tag_tells_a_live_owner_from_a_dead_one() -> None:
    mine = owner_tag("add")
    assert mine.startswith(f"add:{os.getpid()}:") and owner_alive(mine) is True
    code = "from lb.owners import owner_tag; print(owner_tag('rm'))"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    theirs = child.communicate(timeout=30)[0].strip()
    assert theirs.startswith(f"rm:{child.pid}:") and owner_alive(theirs) is False  # exited
    kind, pid, nonce, space, ticks = mine.split(":")
    reused = ":".join([kind, pid, nonce, space, str(int(ticks) + 1)])  # same pid, other process
    assert owner_alive(reused) is False
    elsewhere = ":".join([kind, pid, nonce, "0" * len(space), ticks])  # another pid namespace
    assert owner_alive(elsewhere) is None  # cannot tell: the deadline decides
    for legacy in ("add:123:abcd1234", "supervisor", "rm:dead", ""):
        assert owner_alive(legacy) is None


@pytest.mark.parametrize(("damage", "detail"), [
    (lambda s: s["replicas"][0].update(slots="abc"), "replica 0: bad slots"),
    (lambda s: s["replicas"][0].update(slots=[9999]), "slot 9999 is outside 0..511"),
    (lambda s: s["replicas"][1].update(slots=s["replicas"][0]["slots"]), "is already owned"),
    (lambda s: s["replicas"][1].update(server_id=1), "already"),
    (lambda s: s["replicas"][1].update(hostname="Server1"), "a hostname is there twice"),
    (lambda s: s["replicas"][0].update(server_id=True), "replica 0: bad server_id"),
    (lambda s: s["replicas"][2].update(state="zombie"), "replica 2: bad state"),
    (lambda s: s["replicas"][0].update(address=5), "replica 0: bad address"),
    (lambda s: s["replicas"][0].update(hostname=""), "replica 0: bad hostname"),
    (lambda s: s["replicas"][1].update(domain=5), "replica 1: bad domain"),
    (lambda s: s["replicas"][0].update(extra=1), "a field has the wrong type"),
    (lambda s: s["replicas"][1].update(owner="nobody:1", deadline=5.0), "replica 1: bad owner"),
    (lambda s: s["replicas"][1].update(owner=7, deadline=5.0), "replica 1: bad owner"),
    (lambda s: s["replicas"][0].update(owner="rm:1", deadline="soon"), "replica 0: bad deadline"),
    (lambda s: s["replicas"][0].update(deadline=True), "replica 0: bad deadline"),
    (lambda s: s["ring"].update(slots=10**12), "bad ring slots"),
    (lambda s: s["ring"].update(hash="nope"), "hash must be one of seed, cs60002"),
    (lambda s: s["ring"].update(probing="spiral"), "unknown ring probing or hash"),
    (lambda s: s.update(version="7"), "bad version or replicas"),
    (lambda s: s.update(replicas={}), "bad version or replicas"),
    (lambda s: s.pop("ring"), "no 'ring'"),
])
def test_a_file_that_parses_but_is_not_a_registry_is_corrupt(
        registry: Registry, damage: Callable[[dict[str, Any]], object], detail: str) -> None:
    """Caught when read, so it never reaches a router (where it would be a 500 per request)."""
    data = json.loads(Path(registry.path).read_text())
    damage(data)
    Path(registry.path).write_text(json.dumps(data))
    with pytest.raises(RegistryCorrupt) as caught:
        registry.read()
    assert caught.value.reason.startswith(
        "the replica registry file is corrupt (valid JSON, but not a registry: ")
    assert detail in caught.value.reason


def test_a_failure_domain_is_kept_and_an_entry_without_one_reads_and_writes_as_before(
        registry: Registry) -> None:
    """Only the Swarm backend knows domains: every other document stays as it was, so a
    document written before domains existed reads (domain None), and a balancer that does not
    know the field reads what one that does wrote, as long as no domain is set."""
    raw = Path(registry.path).read_bytes()
    document = json.loads(raw)
    assert not any("domain" in r for r in document["replicas"])
    state = parse_state(raw, "test")
    assert [r.domain for r in state.replicas] == [None, None, None]

    with registry.update() as state:
        state.replicas[0].domain = "worker1"
    written = json.loads(Path(registry.path).read_text())
    assert written["replicas"][0]["domain"] == "worker1"
    assert not any("domain" in r for r in written["replicas"][1:])
    again = registry.read()
    assert [r.domain for r in again.replicas] == ["worker1", None, None]
    assert again.to_dict() == written
