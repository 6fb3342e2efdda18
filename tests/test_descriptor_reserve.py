"""A worker's client connections are capped (``lb.aio.accept.client_cap``) so that replica
connections and the registry always find a file descriptor: the rule, an acceptor at its cap,
and a real stack under ``RLIMIT_NOFILE`` 256 flooded with 600 idle connections, whose clients
already connected must still be served (they got 502s, and /rep 503s, before the cap)."""

from __future__ import annotations

import asyncio
import http.client
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import uvloop

from lb.aio.accept import (
    RESERVED_DESCRIPTORS,
    UNLIMITED_DESCRIPTORS,
    Acceptor,
    Share,
    client_cap,
)
from lb.settings import Settings
from tests.conftest import RunningStack

NOFILE = 256  # the balancer's descriptor limit in the stack test
SLOW = 600  # idle connections flooding it: more than the limit
NORMAL = 20  # clients connected before the flood
ROUNDS = 5  # requests each sends after it, all at once
CLIENT_TIMEOUT = 5.0  # LB_CLIENT_TIMEOUT: how long an idle connection with half a head lives


@pytest.mark.parametrize(("max_clients", "nofile", "cap"), [
    (0, 256, (256 - RESERVED_DESCRIPTORS) // 2),  # 96
    (0, 1024, 480),
    (0, 65536, 32736),
    (0, 70, 3),
    (0, 10, 1),  # less than the reserve: one connection at a time, never none
    (0, resource.RLIM_INFINITY, (UNLIMITED_DESCRIPTORS - RESERVED_DESCRIPTORS) // 2),
    (50, 256, 50),  # LB_MAX_CLIENTS as set, whatever the limit
])
def test_the_cap_keeps_half_of_what_the_reserve_leaves(max_clients: int, nofile: int,
                                                       cap: int) -> None:
    assert client_cap(Settings.from_env({}, max_clients=max_clients), nofile) == cap


class Loopback:
    """A listening socket, an ``Acceptor`` on it capped at ``cap``, clients to connect: the
    worker's side (connections made, held, lost) as ``lb.aio.worker`` wires it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.loop = loop
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.made: list[asyncio.Transport] = []  # held now
        self.accepted = 0  # ever
        self.clients: list[socket.socket] = []
        self.share = Share(None, None, lambda: len(self.made) + len(self.acceptor.opening), cap)
        outer = self

        class Held(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                outer.made.append(transport)  # type: ignore[arg-type]
                outer.accepted += 1

            def connection_lost(self, exc: Exception | None) -> None:
                outer.made[:] = [t for t in outer.made if not t.is_closing()]
                outer.share.publish()  # as Server.lost

        self.acceptor = Acceptor(loop, self.listener, Held, self.share)

    def connect(self, n: int) -> None:
        for _ in range(n):
            self.clients.append(socket.create_connection(self.listener.getsockname()))

    async def settle(self, until: Callable[[], bool], seconds: float = 2.0) -> None:
        """Until ``until()`` holds, ``seconds`` at most; then a little more, for anything
        that should not happen to show."""
        deadline = self.loop.time() + seconds
        while not until() and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)

    def close(self) -> None:
        self.acceptor.close()
        for transport in self.made:
            transport.close()
        for client in self.clients:
            client.close()
        self.listener.close()


@pytest.fixture
def loopback() -> Iterator[Callable[[int], Loopback]]:
    loop = uvloop.new_event_loop()
    made: list[Loopback] = []

    def make(cap: int) -> Loopback:
        made.append(Loopback(loop, cap))
        return made[-1]

    yield make
    for one in made:
        one.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()


def test_at_its_cap_a_worker_stops_accepting_and_resumes_when_one_ends(
        loopback: Callable[[int], Loopback]) -> None:
    side = loopback(3)

    async def scenario() -> None:
        side.acceptor.start()
        side.connect(5)
        await side.settle(lambda: side.accepted >= 3)
        assert side.accepted == 3 and not side.acceptor._listening  # two wait in the backlog
        side.made[0].close()  # a connection ends: room for one more, and one only
        await side.settle(lambda: side.accepted >= 4)
        assert side.accepted == 4 and not side.acceptor._listening
        for transport in list(side.made):
            transport.close()
        await side.settle(lambda: side.accepted >= 5)
        assert side.accepted == 5 and len(side.made) == 1
        assert side.acceptor._listening  # under the cap again, nobody waiting

    side.loop.run_until_complete(scenario())


def test_a_worker_stopped_at_its_cap_does_not_start_again_when_room_is_made(
        loopback: Callable[[int], Loopback]) -> None:
    side = loopback(1)

    async def scenario() -> None:
        side.acceptor.start()
        side.connect(2)
        await side.settle(lambda: len(side.made) >= 1)
        side.acceptor.close()  # the worker is stopping
        side.made[0].close()
        await side.settle(lambda: side.accepted >= 2, seconds=0.3)
        assert side.accepted == 1 and not side.acceptor._listening

    side.loop.run_until_complete(scenario())


# -- a real stack under a low descriptor limit ------------------------------------------------
@contextmanager
def descriptor_limit(soft: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered while a stack starts: lb-run, the balancer's
    gunicorn and its workers inherit it (the replicas and the supervisor too)."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


def connected(stack: RunningStack, timeout: float = 30.0) -> http.client.HTTPConnection:
    """A kept-alive client that has had one request served."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.settings.port, timeout=timeout)
    assert ask(conn, "/home") == 200
    return conn


def ask(conn: http.client.HTTPConnection, path: str) -> int | str:
    """The status of ``GET path`` on ``conn``, or what went wrong."""
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return type(exc).__name__


def ask_on_kept_alive(conn: http.client.HTTPConnection, path: str) -> int | str:
    """``ask`` on a connection that may have sat idle past the server's keep-alive time (a
    client whose requests ended early waits for the others): closed before it read the
    request, it is asked again on a new connection, as HTTP clients do. A reset or a 502 is
    still an answer."""
    status = ask(conn, path)
    return ask(conn, path) if status == "RemoteDisconnected" else status


HALF_A_HEAD = b"GET /home HTTP/1.1\r\nHost: x\r\n"


def flood(stack: RunningStack, n: int, sends: bytes) -> list[socket.socket]:
    """``n`` connections that send ``sends`` and nothing more."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.settimeout(5)
        socks.append(sock)
        sock.connect(("127.0.0.1", stack.settings.port))  # the listen backlog takes it
        if sends:
            sock.sendall(sends)
    return socks


@pytest.mark.parametrize("sends", [b"", HALF_A_HEAD], ids=["nothing", "half-a-head"])
def test_clients_connected_before_a_flood_of_idle_connections_are_still_served(
        make_stack: Callable[..., RunningStack], lb_worker: str, sends: bytes) -> None:
    # gthread gives each new connection a thread until its first bytes come (5 s at most,
    # then it waits in the poller) or, once it began, until its head does: threads run out
    # before descriptors do, a test of threads (tests/test_slow_clients.py), not of these.
    if sends and lb_worker == "threads":
        pytest.skip("gthread: a thread per half-sent head until LB_CLIENT_TIMEOUT; threads "
                    "run out before descriptors (tests/test_slow_clients.py)")
    # 64 threads: fewer than the cap (96), so that kept-alive clients stay so (gthread keeps
    # at most worker_connections - threads alive), and the first 5 s of the flood's
    # connections hold them only for a while.
    threads = 64 if lb_worker == "threads" else 8
    with descriptor_limit(NOFILE):
        stack = make_stack(n=3, workers=2, threads=threads, client_timeout=CLIENT_TIMEOUT)
    clients = [connected(stack) for _ in range(NORMAL)]
    idle: list[socket.socket] = []
    try:
        idle = flood(stack, SLOW, sends)
        time.sleep(1.0)  # the workers accept what they will of it
        statuses: Counter[int | str] = Counter()
        lock = threading.Lock()

        def client(conn: http.client.HTTPConnection) -> None:
            for _ in range(ROUNDS):
                status = ask(conn, "/home")
                with lock:
                    statuses[status] += 1

        # At once: they need more replica connections than the pool keeps idle.
        threads = [threading.Thread(target=client, args=(conn,)) for conn in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        rep = [ask_on_kept_alive(conn, "/rep") for conn in clients[:3]]
        print(f"\n[descriptor-reserve] {lb_worker}, flood sending {sends!r}: {statuses[200]}/"
              f"{NORMAL * ROUNDS} requests of clients connected before it answered 200 "
              f"({dict(statuses)}), /rep: {rep}")
        assert statuses == Counter({200: NORMAL * ROUNDS})
        assert rep == [200] * 3  # the registry readable
        assert "Too many open files" not in stack.log()
        # A client arriving now waits in the listen backlog for room, then is served.
        late = http.client.HTTPConnection("127.0.0.1", stack.settings.port, timeout=60)
        assert ask(late, "/home") == 200
        late.close()
    finally:
        for sock in idle:
            sock.close()
        for conn in clients:
            conn.close()
