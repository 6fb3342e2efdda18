"""In-process fakes for driving the event-driven path without sockets, as uvicorn's tests do:
an in-memory ``Transport``, and ``Harness``, the real ``lb.aio`` server, forwarder, pool, router
and metrics (batched, as in a worker) on a uvloop loop, one client connection and one warm
pooled connection per replica. The protocol tests use it, and so does the benchmark of the
path's own work per request (``bench/hotpath.py``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import uvloop

from lb.aio.server import ClientConnection, Limits, Server
from lb.aio.upstream import AsyncForwarder, ReplicaPool, ReplicaProtocol
from lb.bootstrap import initial_state
from lb.ops.metrics import BalancerMetrics
from lb.registry import READY, Registry, RegistryView
from lb.routing import Router
from lb.settings import Settings
from lb.watch import RegistryWatch

BODY = b'{"message":"Hello from Server: 1","status":"successful"}\n'
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Fri, 04 Dec 2026 02:00:00 GMT\r\n"
          b"Connection: keep-alive\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class Transport:
    """Enough of an asyncio transport for the server and the pool: writes are kept."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False  # closed without sending what was buffered
        self.paused = False  # reading paused

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 5000)}.get(name, default)


class Harness:
    """One client connection, one warm pooled connection per replica."""

    def __init__(self, folder: str) -> None:
        settings = Settings.from_env({}, registry=os.path.join(folder, "registry.json"), n=3,
                                     strategy="maglev", hash_key="query:id")
        state = initial_state(settings)
        for r in state.replicas:
            r.state, r.address = READY, f"http://127.0.0.1:{40000 + r.server_id}"
        registry = Registry(settings.registry_path)
        registry.create(state, replace=True)
        time.sleep(RegistryView.RACY_SECONDS * 2)  # past the racy-stamp window, as in a worker
        self.loop = uvloop.new_event_loop()
        metrics = BalancerMetrics()
        self.counts = metrics.batched()
        router = Router(settings, registry, metrics)
        self.watch = RegistryWatch.attach(router.view, self.loop)  # as in a worker
        self.pool = ReplicaPool(self.loop, settings.connect_timeout, settings.upstream_timeout)
        self.replicas: dict[str, tuple[ReplicaProtocol, Transport]] = {}
        for r in state.replicas:
            assert r.address is not None
            self.connect(r.address)
        server = Server(settings, Limits(4094, 100, 8190, settings.max_body),
                        AsyncForwarder(settings, router, self.pool, self.counts),
                        app=None, counts=self.counts,  # type: ignore[arg-type]
                        keepalive=5, server_header="gunicorn")
        self.client = ClientConnection(server, self.loop)
        self.client_transport = Transport(("127.0.0.1", 40001))
        self.client.connection_made(self.client_transport)  # type: ignore[arg-type]

    def connect(self, address: str) -> None:
        """A warm pooled connection to the replica at ``address``, as after a first request."""
        conn = ReplicaProtocol(self.loop, self.pool.deadlines, self.pool.heads)
        transport = Transport(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.keep_alive = True
        self.pool.release(address, conn)
        self.replicas[address] = (conn, transport)

    def reconnect(self, conn: ReplicaProtocol) -> None:
        """A fresh connection in place of ``conn`` (closed)."""
        address = next(a for a, (c, _) in self.replicas.items() if c is conn)
        self.connect(address)

    def send(self, raw: bytes) -> tuple[ReplicaProtocol, bytes]:
        """``raw`` from the client; the connection it went out on and what was sent."""
        self.client.data_received(raw)
        for conn, transport in self.replicas.values():
            if transport.written:
                sent = b"".join(transport.written)
                transport.written.clear()
                return conn, sent
        raise AssertionError(f"no replica was asked: {self.client_transport.written[-1:]!r}")

    def request(self, raw: bytes, answer: bytes = ANSWER) -> None:
        conn, _ = self.send(raw)
        conn.data_received(answer)

    def replies(self) -> bytes:
        """What the client got since the last call."""
        reply = b"".join(self.client_transport.written)
        self.client_transport.written.clear()
        return reply

    def check(self) -> None:
        reply = self.replies()
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(BODY), reply[:300]

    def close(self) -> None:
        """The registry watch (an inotify descriptor), tasks never run (a request for the app:
        the harness has none), and the loop."""
        if self.watch is not None:
            self.watch.close()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.wait(tasks))
        self.loop.close()
