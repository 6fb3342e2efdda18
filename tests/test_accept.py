"""New connections shared out evenly among the async workers (lb/aio/accept.py): the rule, the
shared table across a real fork, and a real two-worker balancer under gunicorn."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from pathlib import Path

import psutil
import pytest
import uvloop

from lb.aio import accept
from lb.aio.accept import FREE, PATIENCE_SECONDS, Acceptor, ConnectionTable, Share, should_take
from tests.conftest import StackFactory
from tests.helpers_chaos import balancer_workers_of


def test_a_worker_takes_a_connection_only_when_no_other_holds_fewer() -> None:
    assert should_take(2, [2, 3], 0.0)
    assert should_take(0, [], 0.0)
    assert not should_take(3, [2, 5], 0.0)
    assert should_take(3, [FREE, FREE], 0.0)  # the others stopped or never started


def test_a_worker_that_waited_long_enough_takes_it_anyway() -> None:
    assert not should_take(4, [1], PATIENCE_SECONDS / 2)
    assert should_take(4, [1], PATIENCE_SECONDS)


def test_slots_are_claimed_lowest_free_first_and_released() -> None:
    table = ConnectionTable(slots=3)
    assert table.claim([]) == 0
    assert table.claim([0]) == 1
    assert table.claim([0, 1, 2]) is None
    assert table.counts.tolist() == [FREE] * 3  # until their workers accept
    Share(table, 1, lambda: 0).publish()
    assert table.counts.tolist() == [FREE, 0, FREE]
    table.release(1)
    assert table.counts.tolist() == [FREE] * 3
    assert table.claim([1]) == 0


def test_a_forked_worker_sees_the_others_counts_and_they_see_its() -> None:
    table = ConnectionTable(slots=4)
    mine, theirs = table.claim([]), table.claim([0])
    assert mine is not None and theirs is not None
    held = [5]
    share = Share(table, mine, lambda: held[0])
    share.publish()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other worker: publishes 2, reports what it read of the first
        os.close(read)
        Share(table, theirs, lambda: 2).publish()
        os.write(write, str(table.others(theirs)).encode())
        os._exit(0)
    os.close(write)
    seen = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert seen == str([5, FREE, FREE])
    assert table.others(mine) == [2, FREE, FREE]
    assert not share.takes(0.0)  # 5 against 2
    share.release()
    assert table.counts[mine] == FREE and share.takes(0.0)  # no slot: takes everything


def test_out_of_descriptors_a_worker_backs_off_then_accepts_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """accept() failing with EMFILE (a real RLIMIT_NOFILE, every descriptor under it in use)
    pauses the worker's accepting instead of spinning on a socket that stays readable."""
    monkeypatch.setattr(accept, "BACKOFF_SECONDS", 0.2)
    loop = uvloop.new_event_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    made: list[asyncio.BaseTransport] = []

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    acceptor = Acceptor(loop, listener, Keep, Share(None, None, lambda: 0))
    client = socket.create_connection(listener.getsockname())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []

    async def starved_then_fed() -> None:
        # Inside the running loop: uvloop opens descriptors of its own when it starts running.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
        with pytest.raises(OSError) as full:
            while True:  # every descriptor under the limit, holes included
                filler.append(os.dup(listener.fileno()))
        assert full.value.errno == errno.EMFILE
        acceptor.start()
        await asyncio.sleep(0.1)
        assert not made and not acceptor._listening  # paused, not spinning
        for fd in filler:
            os.close(fd)
        filler.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        deadline = loop.time() + 5
        while not made and loop.time() < deadline:
            await asyncio.sleep(0.05)

    try:
        with caplog.at_level(logging.ERROR, logger="lb.aio"):
            loop.run_until_complete(starved_then_fed())
        assert any("Too many open files" in r.getMessage() for r in caplog.records)
        assert len(made) == 1 and acceptor._listening  # accepting again after the pause
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        acceptor.close()
        for transport in made:
            transport.close()
        client.close()
        listener.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def _held_by(workers: list[psutil.Process], port: int) -> list[int]:
    """How many client connections each worker holds: the test's, and any other (lb-run's
    checks), which the rule counts alike."""
    return sorted(sum(1 for c in w.net_connections("tcp")
                      if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
                  for w in workers)


def _get(conn: socket.socket) -> bytes:
    conn.sendall(b"GET /home HTTP/1.1\r\nHost: x\r\n\r\n")
    return conn.recv(65536)


@pytest.mark.system
@pytest.mark.parametrize("burst", [False, True], ids=["one-by-one", "all-at-once"])
def test_keep_alive_connections_are_spread_evenly_over_the_workers(
        tmp_path: Path, burst: bool) -> None:
    factory = StackFactory(tmp_path, "async")  # the threads worker accepts as gthread does
    conns: list[socket.socket] = []
    try:  # from here on, whatever fails: the stack is stopped (a failed check once left it)
        stack = factory(workers=2)
        stack.session.close()  # its connection from the start-up checks would count too
        # lb-run is ready once one worker answers: the second may still be forking.
        deadline = time.monotonic() + 30
        while len(workers := balancer_workers_of(stack.proc.pid)) < 2:
            assert time.monotonic() < deadline, f"balancer workers: {workers}"
            time.sleep(0.1)
        assert len(workers) == 2
        port = stack.settings.port
        # Until both workers accept (the second may still be loading the app), and again
        # until they hold none of the test's.
        deadline = time.monotonic() + 30
        while _held_by(workers, port)[0] == 0:
            assert time.monotonic() < deadline, "a worker never took a connection"
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            assert _get(conns[-1]).startswith(b"HTTP/1.1 200")
        others = sum(_held_by(workers, port)) - len(conns)  # lb-run's, if it holds any
        for conn in conns:
            conn.close()
        conns.clear()
        while sum(_held_by(workers, port)) > others:
            assert time.monotonic() < deadline, "connections left open"
            time.sleep(0.05)
        for _ in range(8):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conns.append(conn)
            if not burst:
                assert _get(conn).startswith(b"HTTP/1.1 200")
        for conn in conns:
            if burst:
                assert _get(conn).startswith(b"HTTP/1.1 200")
        # One by one, each lands on the worker with fewer. At once, a worker that waited
        # PATIENCE_SECONDS for a busy one takes it itself. Without the rule a burst lands
        # mostly on the first worker awake (8 and 0).
        spread = 1 if not burst else 2
        deadline = time.monotonic() + 5
        while (held := _held_by(workers, port))[1] - held[0] > spread \
                or sum(held) < len(conns):
            assert time.monotonic() < deadline, f"connections per worker: {held}"
            time.sleep(0.05)
    finally:
        for conn in conns:
            conn.close()
        factory.stop_all()
