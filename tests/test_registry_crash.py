"""Registry crash safety: writers killed with SIGKILL at random points, many writers at once.

``REGISTRY_KILLS`` (default 200; a soak run uses 1000) writer processes are killed while they
write; after every kill the registry must read cleanly and hold a state some write completed
(the old one or the new one, never a mix), its lock must be free, and versions never go back.
``REGISTRY_WRITERS`` x ``REGISTRY_UPDATES`` (default 8 x 50) parallel increments lose nothing
while readers, who take no lock, never see a half-written file.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lb.bootstrap import initial_state
from lb.registry import Registry, RegistryError, Replica, State
from lb.settings import Settings
from tests.helpers_chaos import env_int, report

# fork: a writer must be up and writing within milliseconds for a thousand kills to be cheap.
CTX = multiprocessing.get_context("fork")


def _stamp(state: State) -> None:
    """One write's content: every part of it derived from the version it will have, and a
    size that changes from write to write, so a torn or mixed file cannot pass ``_check``."""
    version = state.version + 1
    state.replicas = [r for r in state.replicas if not r.hostname.startswith("pad-")]
    state.replicas[0].restarts = version
    for i in range(version % 7):
        state.replicas.append(Replica(f"pad-{version}-{i}", 1000 + i, [], failures=version))


def _check(state: State) -> None:
    version = state.version
    assert state.replicas[0].restarts == version
    pads = [r for r in state.replicas if r.hostname.startswith("pad-")]
    assert len(pads) == version % 7
    assert all(r.hostname == f"pad-{version}-{i}" and r.failures == version
               for i, r in enumerate(pads))


def _write_forever(path: str, writing: Any) -> None:
    registry = Registry(path, lock_timeout=30)
    while True:
        with registry.update() as state:
            _stamp(state)
        writing.set()


def _fresh(tmp_path: Path) -> Registry:
    registry = Registry(str(tmp_path / "registry.json"), lock_timeout=30)
    registry.create(initial_state(Settings.from_env({}, n=3)))
    with registry.update() as state:
        _stamp(state)
    return registry


def test_sigkilled_writers_leave_the_old_or_the_new_state(tmp_path: Path) -> None:
    kills = env_int("REGISTRY_KILLS", 200)
    registry = _fresh(tmp_path)
    rng = random.Random(1000)
    last = registry.read().version
    began = time.monotonic()
    advanced = mid_write = 0
    for _ in range(kills):
        writing = CTX.Event()
        writer = CTX.Process(target=_write_forever, args=(registry.path, writing), daemon=True)
        writer.start()
        assert writing.wait(60)  # it is writing, one write after the other (~1-2 ms each):
        time.sleep(rng.uniform(0.0, 0.005))  # strike somewhere in the next few
        os.kill(writer.pid, signal.SIGKILL)  # type: ignore[arg-type]
        writer.join(10)
        assert writer.exitcode == -signal.SIGKILL
        state = registry.read()  # never RegistryCorrupt, never missing
        _check(state)
        assert state.version >= last
        advanced += state.version > last
        last = state.version
        mid_write += bool(_temp_files(registry))  # killed between temp file and rename
        with registry.update() as state:  # the lock is free again: a dead writer holds nothing
            _stamp(state)
        last = registry.read().version
    litter = _temp_files(registry)
    report("registry: writers SIGKILLed mid-write", kills=kills, corrupt_reads=0,
           kills_between_temp_file_and_rename=mid_write, kills_after_progress=advanced,
           final_version=last, temp_files_left=len(litter),
           duration_s=round(time.monotonic() - began, 1))
    assert advanced == kills  # every writer was killed in the middle of its writing
    assert mid_write > 0  # and some of them between temp file and rename
    # A dead writer's temp file is cleared by the next write, not left to pile up.
    assert litter == [], f"{len(litter)} temp files of killed writers left behind"


def _temp_files(registry: Registry) -> list[str]:
    return glob.glob(os.path.join(os.path.dirname(registry.path), ".*.tmp"))


def _increment(path: str, name: str, times: int) -> None:
    registry = Registry(path, lock_timeout=60)
    for _ in range(times):
        with registry.update() as state:
            state.replicas[0].restarts += 1
            entry = state.find(name)
            if entry is None:
                state.replicas.append(Replica(name, 100 + len(state.replicas), [], restarts=1))
            else:
                entry.restarts += 1


def _read_until(path: str, stop: Any, errors: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    registry = Registry(path)
    reads = bad = 0
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            registry.read()
        except RegistryError as exc:
            bad += 1
            if bad == 1:
                errors.put(repr(exc))
        reads += 1
    errors.put((reads, bad))


def test_parallel_writer_processes_lose_no_update_and_readers_see_whole_files(
        tmp_path: Path) -> None:
    writers = env_int("REGISTRY_WRITERS", 8)
    updates = env_int("REGISTRY_UPDATES", 50)
    registry = Registry(str(tmp_path / "registry.json"))
    registry.create(initial_state(Settings.from_env({}, n=3)))
    v0 = registry.read().version
    began = time.monotonic()
    queue: multiprocessing.Queue = CTX.Queue()  # type: ignore[type-arg]
    procs = [CTX.Process(target=_increment, args=(registry.path, f"w{i}", updates))
             for i in range(writers)]
    stop = CTX.Event()
    readers = [CTX.Process(target=_read_until, args=(registry.path, stop, queue))
               for _ in range(2)]
    for p in procs + readers:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    stop.set()
    for r in readers:
        r.join(30)
        assert r.exitcode == 0
    state = registry.read()
    reads = 0
    while not queue.empty():
        item = queue.get_nowait()
        assert not isinstance(item, str), f"a reader saw a broken registry: {item}"
        reads += item[0]
        assert item[1] == 0
    report("registry: parallel writer processes", writers=writers, updates_each=updates,
           expected=writers * updates, counted=state.replicas[0].restarts, readers=len(readers),
           reads=reads, duration_s=round(time.monotonic() - began, 1))
    assert state.replicas[0].restarts == writers * updates
    assert state.version == v0 + writers * updates
    assert sorted((r.hostname, r.restarts) for r in state.replicas if r.hostname[0] == "w") == \
        [(f"w{i}", updates) for i in sorted(range(writers), key=str)]


@pytest.mark.parametrize("when", ["after-temp-file", "after-fsync"])
def test_a_writer_dying_before_the_rename_changes_nothing(tmp_path: Path, when: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The deterministic twin of the random kills: die right before ``os.replace``."""
    registry = _fresh(tmp_path)
    before = registry.read()

    class Killed(BaseException):
        pass

    def die(*_: object) -> None:
        raise Killed

    monkeypatch.setattr(os, "replace" if when == "after-fsync" else "fsync", die)
    with pytest.raises(Killed), registry.update() as state:
        _stamp(state)
    monkeypatch.undo()
    assert registry.read() == before
