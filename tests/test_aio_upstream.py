"""The event-driven path's way to the replicas, one rule at a time, against replicas that
misbehave on purpose.

``AsyncForwarder.start`` serves the usual request (a first try on a warm pooled connection) in
callbacks alone and hands anything else to a task running ``forward``'s loop; both must keep the
rules of ``lb.routing.RingWalk``: a kept-alive connection the replica had closed is not the
replica's failure (once more on a new connection, same replica), a broken or missing answer is
(the next replica clockwise, and the first one becomes a suspect), and a connection that carried
anything but one clean answer is never reused. Real sockets on loopback, a real ``Router`` over a
real registry, uvloop as in the worker; only the replicas are scripted, at the byte level.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from lb.aio.upstream import AsyncForwarder, ReplicaPool, ReplicaProtocol, Reply, UpstreamError
from lb.balancer import Balancer
from lb.errors import ApiError
from lb.registry import Replica
from tests.helpers_echo import inprocess_balancer

KEY = 123456
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
          b"Connection: keep-alive\r\n\r\n{}")


BIG = 1 << 20
# What a scripted replica sends for a mode, in order (a float: a pause of that many seconds).
SCRIPTS: dict[str, list[bytes | float]] = {
    "early hints": [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                    0.05, ANSWER],
    "continue": [b"HTTP/1.1 100 Continue\r\n\r\n" + ANSWER],
    "switch": [(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade"
                b"\r\n\r\nhello"), 2.0],
    "204 with a body": [b"HTTP/1.1 204 No Content\r\n\r\n{}"],
    "many fields": [b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 150
                    + b"Content-Length: 2\r\n\r\n{}"],
    "big head": [b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2"
                 b"\r\n\r\n{}"],
    "drip": [b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n",
             *[part for _ in range(8) for part in (0.15, b"x")]],
    "stall": [b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nxx", 3.0],
    "big": [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG, b"y" * BIG],
    "big chunked": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    *[b"%x\r\n%s\r\n" % (BIG // 4, b"z" * (BIG // 4)) for _ in range(4)],
                    b"0\r\n\r\n"],
}


class ScriptedReplica:
    """A replica on loopback whose ``mode`` decides what each request gets:

    - ``ok``: a clean kept-alive answer;
    - ``one per connection``: the first request on a connection answered, the next one met
      with a close (the replica's keep-alive time ran out just as the request came);
    - ``cut``: half a status line, then a close;
    - ``trailing bytes``: a clean answer followed by bytes nobody asked for;
    - ``silent``: the request read, never answered;
    - ``hang up``: each new connection closed as soon as it is accepted (a replica shutting
      down).
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.mode = "ok"
        self.requests = 0
        self.connections = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.mode == "hang up":
                conn.close()
                continue
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        answered = 0
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                _, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests += 1
                if self.mode == "silent":
                    continue
                if self.mode == "cut" or (self.mode == "one per connection" and answered):
                    if self.mode == "cut":
                        conn.sendall(b"HTTP/1.1 200")
                    return
                script = SCRIPTS.get(self.mode)
                if script is not None:
                    try:
                        for part in script:
                            if isinstance(part, float):
                                time.sleep(part)
                            else:
                                conn.sendall(part)
                    except OSError:
                        return
                    if self.mode in ("stall", "switch"):
                        return
                    answered += 1
                    continue
                conn.sendall(ANSWER + (b"HTTP/1.1 200 OK\r\n\r\n"
                                       if self.mode == "trailing bytes" else b""))
                answered += 1

    def close(self) -> None:
        self.listener.close()
        for conn in self._open:
            conn.close()


@pytest.fixture()
def two(tmp_path: Any) -> Iterator[tuple[Any, ScriptedReplica, ScriptedReplica]]:
    """An in-process balancer's router over two scripted replicas, ``first`` being the one
    ``KEY`` goes to, ``second`` the next one clockwise."""
    a, b = ScriptedReplica(), ScriptedReplica()
    app = inprocess_balancer(str(tmp_path), [a.address, b.address], upstream_timeout=0.5,
                             strategy="maglev")
    router = Balancer.of(app).router
    order = [r.address for r in router.candidates(KEY)]
    first, second = (a, b) if order[0] == a.address else (b, a)
    try:
        yield router, first, second
    finally:
        a.close()
        b.close()


def run(router: Any, *calls: Callable[[AsyncForwarder], Any]) -> list[Any]:
    """Each call's outcome in turn, on one pool in one uvloop loop (as one worker)."""

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        pool = ReplicaPool(loop, router.settings.connect_timeout,
                           router.settings.upstream_timeout)
        forwarder = AsyncForwarder(router.settings, router, pool)
        try:
            return [await call(forwarder) for call in calls]
        finally:
            pool.close()

    return uvloop.run(main())


async def get(forwarder: AsyncForwarder) -> tuple[Replica | None, Reply | None, Any]:
    """One routed GET through ``start`` (warm connection: callbacks; else a task)."""
    outcome: asyncio.Future[tuple[Any, Any, Any]] = asyncio.get_running_loop().create_future()
    forwarder.start(b"/home?id=1", b"Accept: */*\r\n", KEY, "/home",
                    lambda *result: outcome.set_result(result))
    return await outcome


def idle(forwarder: AsyncForwarder, replica: ScriptedReplica) -> int:
    """Connections the pool keeps for ``replica``, as far as a ``take`` can tell."""
    taken = []
    while (conn := forwarder.pool.take(replica.address)) is not None:
        taken.append(conn)
    for conn in taken:
        forwarder.pool.release(replica.address, conn)
    return len(taken)


def served_by(outcome: tuple[Any, Any, Any], replica: ScriptedReplica) -> None:
    chosen, reply, error = outcome
    assert error is None, error
    assert chosen is not None and reply is not None
    assert chosen.address == replica.address and reply.status == 200 and reply.body == b"{}"


def test_warm_connections_are_reused_and_the_first_request_connects(two: Any) -> None:
    router, first, _ = two
    outcomes = run(router, *[get] * 5, lambda f: asyncio.sleep(0, idle(f, first)))
    for outcome in outcomes[:5]:
        served_by(outcome, first)
    assert first.connections == 1 and first.requests == 5
    assert outcomes[5] == 1


def test_a_kept_alive_connection_the_replica_closed_is_not_its_failure(two: Any) -> None:
    """Every second request on a connection meets a close before any byte of an answer:
    each time once more on a new connection to the same replica, which stays first."""
    router, first, second = two
    first.mode = "one per connection"
    outcomes = run(router, *[get] * 6)
    for outcome in outcomes:
        served_by(outcome, first)
    assert second.requests == 0
    assert first.connections == 6 and first.requests == 11  # 5 met a close, each sent again
    assert router.candidates(KEY)[0].address == first.address  # not a suspect


@pytest.mark.parametrize("warm", [True, False], ids=["warm connection", "new connection"])
def test_a_cut_answer_goes_to_the_next_replica_and_the_first_becomes_a_suspect(
        two: Any, warm: bool) -> None:
    router, first, second = two

    async def cut(forwarder: AsyncForwarder) -> Any:
        if not warm:
            forwarder.pool.close()
        first.mode = "cut"
        return await get(forwarder)

    outcomes = run(router, get, cut)
    served_by(outcomes[0], first)
    served_by(outcomes[1], second)
    assert first.requests == 2 and second.requests == 1
    assert router.candidates(KEY)[0].address == second.address  # the first is a suspect now


def test_a_replica_that_does_not_answer_in_time_is_passed_over(two: Any) -> None:
    router, first, second = two

    async def silent(forwarder: AsyncForwarder) -> None:
        first.mode = "silent"

    outcomes = run(router, get, silent, get)
    served_by(outcomes[0], first)
    served_by(outcomes[2], second)
    assert first.requests == 2


def test_each_exchange_times_out_at_its_own_deadline(two: Any) -> None:
    """One timer per loop keeps every exchange's deadline: a later exchange with a shorter
    timeout ends first, an answered one never times out, and each ends near its own time."""
    router, first, second = two
    first.mode = "silent"
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    async def exchanges(forwarder: AsyncForwarder) -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        pool = forwarder.pool
        ended: list[tuple[str, float]] = []
        began = loop.time()
        conns = {}
        for name, address in (("slow", first.address), ("quick", first.address),
                              ("answered", second.address)):
            conns[name] = await pool.connect(address)
        finished = loop.create_future()

        def done(name: str) -> Callable[[Any, Any], None]:
            def record(reply: Any, error: Any) -> None:
                ended.append((name if reply is not None else f"{name}: {error}",
                              loop.time() - began))
                if len(ended) == 3:
                    finished.set_result(None)
            return record

        conns["slow"].exchange(request, 0.6, done("slow"))
        conns["quick"].exchange(request, 0.2, done("quick"))
        conns["answered"].exchange(request, 0.4, done("answered"))
        await finished
        return ended

    (ended,) = run(router, exchanges)
    names = [name for name, _ in ended]
    assert names == ["answered", "quick: no answer within 0.2s",
                     "slow: no answer within 0.6s"]
    assert ended[0][1] < 0.2
    assert 0.19 <= ended[1][1] < 0.45 and 0.59 <= ended[2][1] < 0.85  # timers: 1 ms early at most


def test_a_replica_that_hangs_up_on_new_connections_is_passed_over(two: Any) -> None:
    router, first, second = two

    async def hang_up(forwarder: AsyncForwarder) -> Any:
        forwarder.pool.close()  # no warm connection: the request needs a new one
        first.mode = "hang up"
        return await get(forwarder)

    outcomes = run(router, get, hang_up)
    served_by(outcomes[0], first)
    served_by(outcomes[1], second)
    assert router.candidates(KEY)[0].address == second.address  # the first is a suspect now


def test_a_connection_lost_before_its_request_went_out_fails_that_exchange(two: Any) -> None:
    """A new connection the replica hung up on while its task waited for its turn: the
    exchange fails at once as the replica's (uvloop would raise on the write)."""
    router, first, _ = two
    first.mode = "hang up"

    async def late(forwarder: AsyncForwarder) -> Any:
        pool = forwarder.pool
        conn = await pool.connect(first.address)
        for _ in range(200):
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed, "the replica did not hang up"
        began = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamError) as caught:
            await pool.exchange(first.address, conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return caught.value, asyncio.get_running_loop().time() - began

    ((error, seconds),) = run(router, late)
    assert "closed the connection" in str(error) and error.before_reply
    assert seconds < 0.1  # not the 0.5 s read timeout
    assert first.requests == 0


def test_bytes_after_an_answer_end_the_connection(two: Any) -> None:
    """The answer itself is good and passed back; the connection is never used again, so the
    stray bytes can never be read as the next request's answer."""
    router, first, _ = two
    first.mode = "trailing bytes"
    outcomes = run(router, get, get, lambda f: asyncio.sleep(0.1, idle(f, first)))
    served_by(outcomes[0], first)
    served_by(outcomes[1], first)
    assert first.connections == 2
    assert outcomes[2] == 0


def test_no_replica_answers(two: Any) -> None:
    router, first, second = two
    first.mode = second.mode = "cut"
    (outcome,) = run(router, get)
    chosen, reply, error = outcome
    assert chosen is None and reply is None
    assert isinstance(error, ApiError) and error.status == 502
    assert "No replica could serve the request" in error.message


@pytest.mark.parametrize("mode", ["early hints", "continue"])
def test_interim_answers_are_skipped_and_the_final_one_delivered(two: Any, mode: str) -> None:
    """A 1xx but 101 is interim (RFC 9110 section 15.2): the answer is the one after it, and
    the connection stays clean for the next request."""
    router, first, _ = two
    first.mode = mode
    outcomes = run(router, get, get, lambda f: asyncio.sleep(0.05, idle(f, first)))
    served_by(outcomes[0], first)
    served_by(outcomes[1], first)
    assert first.connections == 1 and outcomes[2] == 1


@pytest.mark.parametrize("mode", ["switch", "many fields", "big head"])
def test_a_replica_that_breaks_the_protocol_gives_502_and_is_not_asked_again(
        two: Any, mode: str) -> None:
    """A 101 (the balancer does not tunnel), a head of 150 fields or of 100 kB: a 502, never
    the next replica (the answer had begun), and the connection is not reused."""
    router, first, second = two
    first.mode = mode
    outcomes = run(router, get, lambda f: asyncio.sleep(0.05, idle(f, first)))
    _, reply, error = outcomes[0]
    assert reply is None and isinstance(error, ApiError) and error.status == 502, error
    assert second.requests == 0 and outcomes[1] == 0


def test_a_bodiless_status_ends_its_answer_and_stray_bytes_end_the_connection(
        two: Any) -> None:
    router, first, _ = two
    first.mode = "204 with a body"
    outcomes = run(router, get, lambda f: asyncio.sleep(0.05, idle(f, first)))
    _, reply, error = outcomes[0]
    assert error is None and reply is not None and reply.status == 204 and reply.body == b""
    assert outcomes[1] == 0  # the "{}" after it closed the connection


def test_a_slow_but_steady_answer_is_waited_for_past_the_first_byte_deadline(
        two: Any) -> None:
    """8 bytes over 1.2 s, each read within the between-reads deadline (0.5 s here, as the
    first-byte one): passed back whole, from the one replica."""
    router, first, second = two
    first.mode = "drip"
    (outcome,) = run(router, get)
    _, reply, error = outcome
    assert error is None and reply is not None and reply.body == b"x" * 8
    assert second.requests == 0


def test_an_answer_that_stalls_is_a_504_and_is_not_sent_again(two: Any) -> None:
    router, first, second = two
    first.mode = "stall"
    began = time.monotonic()
    (outcome,) = run(router, get)
    _, reply, error = outcome
    assert reply is None and isinstance(error, ApiError) and error.status == 504, error
    assert second.requests == 0 and first.requests == 1
    assert time.monotonic() - began < 2.0


def test_a_silent_replica_is_a_504_when_nothing_else_may_be_tried(tmp_path: Any) -> None:
    replica = ScriptedReplica()
    replica.mode = "silent"
    app = inprocess_balancer(str(tmp_path), [replica.address], upstream_timeout=0.3,
                             retries=0)
    try:
        (outcome,) = run(Balancer.of(app).router, get)
    finally:
        replica.close()
    _, reply, error = outcome
    assert reply is None and isinstance(error, ApiError) and error.status == 504, error
    assert "in time" in error.message


class Collected:
    """A sink that keeps what a streamed answer brings (``lb.aio.upstream.Sink``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.parts: list[bytes] = []
        self.finished: asyncio.Future[str] = loop.create_future()

    def body(self, data: bytes) -> None:
        self.parts.append(data)

    def end(self) -> None:
        self.finished.set_result("end")

    def broken(self, error: BaseException) -> None:
        self.finished.set_result(f"broken: {error}")


@pytest.mark.parametrize("mode", ["big", "big chunked"])
def test_a_large_answer_is_streamed_and_its_connection_kept_after_its_end(
        two: Any, mode: str) -> None:
    """1 MiB: delivered once its head and the first 64 kB are in, the rest through a sink,
    paused and resumed on demand; then the connection goes back to the pool, clean."""
    router, first, _ = two
    first.mode = mode

    async def streamed(forwarder: AsyncForwarder) -> tuple[int, int, str]:
        _, reply, error = await get(forwarder)
        assert error is None and reply is not None and reply.stream is not None
        sink = Collected(asyncio.get_running_loop())
        reply.stream.pause()
        reply.stream.follow(sink)
        await asyncio.sleep(0.2)
        during_pause = sum(map(len, sink.parts))
        reply.stream.resume()
        how = await asyncio.wait_for(sink.finished, 5)
        return len(reply.body) + sum(map(len, sink.parts)), during_pause, how

    outcomes = run(router, streamed, lambda f: asyncio.sleep(0.05, idle(f, first)))
    size, during_pause, how = outcomes[0]
    assert how == "end" and size == BIG
    assert during_pause < BIG // 2  # paused: the replica's bytes stayed in the kernel
    assert outcomes[1] == 1


def test_a_host_that_stops_acknowledging_is_unreachable_not_a_closed_connection(
        two: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept-alive connection whose replica's host vanished (its node stopped: no reset, no
    acknowledgement) fails with the kernel's ETIMEDOUT once the request stayed unacknowledged
    (``bound_unacknowledged``, TCP_USER_TIMEOUT set on every upstream socket): the next replica
    gets the request at once, not the same one again on a new connection (as after a close)
    nor after LB_UPSTREAM_TIMEOUT. The kernel's part is played here by the test."""
    router, first, second = two
    bounds: list[int] = []
    original = ReplicaProtocol.exchange

    def exchange(self: ReplicaProtocol, *args: Any, **kw: Any) -> None:
        sock = self.transport.get_extra_info("socket")
        bounds.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        original(self, *args, **kw)
        if first.mode == "silent" and sock.getpeername()[1] == int(first.address.split(":")[-1]):
            self.connection_lost(TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)))
            self.transport.abort()

    monkeypatch.setattr(ReplicaProtocol, "exchange", exchange)

    def silence(forwarder: AsyncForwarder) -> Any:
        first.mode = "silent"
        return asyncio.sleep(0)

    began = time.monotonic()
    outcomes = run(router, get, silence, get, get)
    served_by(outcomes[0], first)
    served_by(outcomes[2], second)  # the first is a suspect now: the next goes on as well
    served_by(outcomes[3], second)
    assert time.monotonic() - began < router.settings.upstream_timeout
    assert first.connections == 1 and first.requests == 2  # sent once more on no new connection
    assert bounds and set(bounds) == {500}, bounds  # LB_CONNECT_TIMEOUT's 0.5 s
