"""The event-driven path's way to the replicas, one rule at a time, against replicas that
misbehave on purpose.

``AsyncForwarder.start`` serves the usual request (a first try on a warm pooled connection) in
callbacks alone and hands anything else to a task running ``forward``'s loop; both must keep the
rules of ``lb.routing.Attempts``: a kept-alive connection the replica had closed is not the
replica's failure (once more on a new connection, same replica), a broken or missing answer is
(the next replica clockwise, and the first one becomes a suspect), and a connection that carried
anything but one clean answer is never reused. Real sockets on loopback, a real ``Router`` over a
real registry, uvloop as in the worker; only the replicas are scripted, at the byte level.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from lb.aio.upstream import AsyncForwarder, ReplicaPool, Reply, UpstreamError
from lb.errors import ApiError
from lb.registry import Replica
from tests.helpers_echo import inprocess_balancer

KEY = 123456
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
          b"Connection: keep-alive\r\n\r\n{}")


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
    router = app.extensions["lb"]["router"]
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
            conns[name] = await pool._connect(address)
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
    assert names == ["answered", "quick: no complete answer within 0.2s",
                     "slow: no complete answer within 0.6s"]
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
        conn = await pool._connect(first.address)
        for _ in range(200):
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed, "the replica did not hang up"
        began = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamError) as caught:
            await pool._exchange(first.address, conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
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
