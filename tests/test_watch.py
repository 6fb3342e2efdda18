"""A watched registry view (``lb.watch``): routing looks at the file only after inotify said it
changed, and misses no change. Real inotify, real files, a real uvloop loop; no process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from lb.bootstrap import initial_state
from lb.registry import READY, Registry, RegistryCorrupt, RegistryMissing, RegistryView
from lb.settings import Settings
from lb.watch import INotify, RegistryWatch

pytestmark = pytest.mark.skipif(INotify is None, reason="inotify is Linux's")


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    folder = tmp_path / "deployment"
    folder.mkdir()
    registry = Registry(str(folder / "registry.json"))
    registry.create(initial_state(Settings.from_env({}, n=3)))
    return registry


@pytest.fixture()
def looks(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per look at the file (a ``stamp()``)."""
    monkeypatch.setattr(RegistryView, "RACY_SECONDS", 0.0)
    calls: list[int] = []
    stamp = registry.stamp
    monkeypatch.setattr(registry, "stamp", lambda: calls.append(1) or stamp())
    return calls


def pump(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop read what inotify has queued."""
    loop.run_until_complete(asyncio.sleep(0.05))


def watched(registry: Registry, loop: asyncio.AbstractEventLoop) -> tuple[RegistryView,
                                                                           RegistryWatch]:
    view = RegistryView(registry)
    watch = RegistryWatch.attach(view, loop)
    assert watch is not None
    return view, watch


def test_a_watched_view_looks_at_the_file_only_after_it_changed(
        registry: Registry, loop: asyncio.AbstractEventLoop, looks: list[int]) -> None:
    view, watch = watched(registry, loop)
    first = view.current()
    for _ in range(100):
        assert view.current() is first
    assert len(looks) == 1
    with registry.update() as state:
        state.replicas[0].state = READY
    pump(loop)
    second = view.current()
    assert second.replicas[0].state == READY and second.version == first.version + 1
    for _ in range(100):
        assert view.current() is second
    # The update looked once itself (it reads under the lock); the view once after it.
    assert len(looks) <= 3
    watch.close()


def test_other_files_in_its_folder_are_not_its_changes(
        registry: Registry, loop: asyncio.AbstractEventLoop, looks: list[int]) -> None:
    view, watch = watched(registry, loop)
    first = view.current()
    folder = Path(registry.path).parent
    (folder / "other.json").write_text("{}")
    os.replace(folder / "other.json", folder / "moved.json")
    (folder / "moved.json").unlink()
    pump(loop)
    assert view.current() is first and len(looks) == 1
    watch.close()


def test_every_way_the_file_changes_is_seen(registry: Registry,
                                            loop: asyncio.AbstractEventLoop,
                                            looks: list[int]) -> None:
    """Replaced by hand, written in place (corrupt: the last good state goes on), made
    unreadable, removed, written again by the project: each is looked at."""
    view, watch = watched(registry, loop)
    good = view.current()
    path = Path(registry.path)
    raw = path.read_bytes()

    by_hand = path.with_name("by-hand.tmp")
    by_hand.write_bytes(raw.replace(b'"version": %d' % good.version,
                                    b'"version": %d' % (good.version + 7)))
    os.replace(by_hand, path)
    pump(loop)
    replaced = view.current()
    assert replaced.version == good.version + 7 and view.problem is None

    path.write_text("{garbage")
    pump(loop)
    assert view.current() is replaced and isinstance(view.problem, RegistryCorrupt)

    path.unlink()
    pump(loop)
    assert view.current() is replaced and isinstance(view.problem, RegistryMissing)

    registry.create(initial_state(Settings.from_env({}, n=2)))
    pump(loop)
    again = view.current()
    assert view.problem is None and again.rep()["N"] == 2
    watch.close()


def test_a_change_reported_during_a_look_is_looked_at_again(
        registry: Registry, loop: asyncio.AbstractEventLoop, looks: list[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The look may have read the file just before the change: not trusted afterwards."""
    view, watch = watched(registry, loop)
    view.current()
    view.changed()
    stamp = registry.stamp  # the fixture's, counting looks
    monkeypatch.setattr(registry, "stamp", lambda: view.changed() or stamp())
    view.current()
    view.current()
    assert len(looks) == 3  # the first look, and both calls after a change during each
    watch.close()


def test_a_watch_whose_folder_goes_away_leaves_the_view_looking_every_time(
        registry: Registry, loop: asyncio.AbstractEventLoop, looks: list[int],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    view, watch = watched(registry, loop)
    view.current()
    folder = Path(registry.path).parent
    caplog.set_level(logging.WARNING, logger="lb.watch")
    os.rename(folder, tmp_path / "elsewhere")
    pump(loop)
    assert any("no longer watched" in r.getMessage() for r in caplog.records)
    before = len(looks)
    for _ in range(3):
        view.current()  # the last good state (fail static), looked for each time
    assert len(looks) == before + 3
    assert watch.loop is None and watch.inotify.closed


def test_a_change_is_seen_by_a_request_that_came_after_it_in_the_same_loop_turn(
        registry: Registry, loop: asyncio.AbstractEventLoop, looks: list[int]) -> None:
    """An /rm's reply goes out after its write: a request it caused reaches the loop after
    the write's event, and the loop runs the watch's callback first."""
    view, watch = watched(registry, loop)
    before = view.current().version
    client, server = socket.socketpair()
    seen: list[int] = []

    def request_arrives() -> None:
        server.recv(100)
        seen.append(view.current().version)

    loop.add_reader(server.fileno(), request_arrives)
    with registry.update() as state:  # the write, then (causally after it) the request
        state.replicas[0].state = READY
    client.send(b"GET")
    loop.run_until_complete(asyncio.sleep(0.05))
    assert seen == [before + 1]
    loop.remove_reader(server.fileno())
    client.close()
    server.close()
    watch.close()
