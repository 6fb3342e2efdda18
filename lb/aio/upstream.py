"""The event-driven path's way to the replicas: pooled keep-alive connections, httptools parsing.

One ``ReplicaConnection`` carries one exchange at a time (a GET with no body, its complete
answer); ``ReplicaPool`` keeps the idle ones per replica address, newest first, so a worker
reuses warm connections and lets the rest expire at the replica. ``AsyncForwarder`` is the
threads path's ``lb.router.Forwarder`` with awaits: the rules come from ``lb.routing``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from lb.registry import Replica
from lb.router import Upstream
from lb.routing import (
    STARTING_POLL_SECONDS,
    Router,
    replica_error,
    reply_headers,
)
from lb.settings import Settings

IDLE_PER_REPLICA = 64  # kept-alive connections a worker keeps per replica; more are closed


class UpstreamError(ConnectionError):
    """A replica could not be reached, or gave no complete answer."""

    def __init__(self, message: str, *, before_reply: bool = False) -> None:
        super().__init__(message)
        self.before_reply = before_reply  # nothing of an answer came: safe to send again


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    content_type: str | None


class ReplicaConnection(asyncio.Protocol):
    """One kept-alive connection to a replica, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self._waiter: asyncio.Future[Reply] | None = None
        # One parser for the connection's whole life: llhttp starts the next message by itself.
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._status = 0
        self._content_type: str | None = None
        self._got_bytes = False
        self._headers_done = False
        self._framed = False  # Content-Length or chunked: the answer ends without a close

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._waiter is None:  # bytes nobody asked for: the connection is not reusable
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed reply: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and not self._framed:  # an answer delimited by the close
                self.keep_alive = False
                self._finish()
            else:
                self._fail(UpstreamError("the replica closed the connection",
                                         before_reply=not self._got_bytes))

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer to one request: stop parsing, never reuse
            raise UpstreamError("unsolicited reply")

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        text = value.decode("latin-1")
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value):
            self._framed = True
        elif lower == b"content-type":
            self._content_type = text
        self._headers.append((name.decode("latin-1"), text))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        if self._status < 200 or self._status in (204, 304):
            self._framed = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    # -- the exchange ----------------------------------------------------------------------------
    def exchange(self, request: bytes) -> asyncio.Future[Reply]:
        """Send ``request`` (a complete GET); the future holds the complete answer."""
        assert self.transport is not None and self._waiter is None
        self._headers, self._body, self._status, self._content_type = [], [], 0, None
        self._got_bytes = self._headers_done = self._framed = False
        self._waiter = self.loop.create_future()
        self.transport.write(request)
        return self._waiter

    def timed_out(self, seconds: float) -> None:
        self._fail(UpstreamError(f"no complete answer within {seconds:g}s"))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self._status, self._headers, b"".join(self._body),
                                    self._content_type))

    def _fail(self, error: UpstreamError) -> None:
        self.keep_alive = False  # the parser's state is unknown: never reused
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


class ReplicaPool:
    """Idle kept-alive connections per replica address, for one worker's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connect_timeout: float,
                 read_timeout: float) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[str, list[ReplicaConnection]] = {}
        self._hosts: dict[str, tuple[str, int, bytes]] = {}  # address -> host, port, Host

    def host_header(self, address: str) -> bytes:
        return self._host(address)[2]

    async def fetch(self, address: str, request: bytes) -> Reply:
        """``request`` sent to the replica at ``address`` and its complete answer."""
        conn = self._take(address)
        if conn is not None:
            try:
                return await self._exchange(address, conn, request)
            except UpstreamError as exc:
                if not exc.before_reply:
                    raise
                # The replica closed a kept-alive connection between two requests (its
                # keep-alive timeout): not its failure. Once more on a new connection.
        return await self._exchange(address, await self._connect(address), request)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _host(self, address: str) -> tuple[str, int, bytes]:
        known = self._hosts.get(address)
        if known is None:
            parts = urlsplit(address)
            known = self._hosts[address] = (parts.hostname or "", parts.port or 80,
                                            parts.netloc.encode("latin-1"))
        return known

    def _take(self, address: str) -> ReplicaConnection | None:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()  # newest first: the warmest connection
            if not conn.closed:
                return conn
        return None

    async def _connect(self, address: str) -> ReplicaConnection:
        host, port, _ = self._host(address)
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: ReplicaConnection(self.loop), host, port),
                self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to {address}: {exc!r}") from exc
        return conn

    async def _exchange(self, address: str, conn: ReplicaConnection,
                        request: bytes) -> Reply:
        timer = self.loop.call_later(self.read_timeout, conn.timed_out, self.read_timeout)
        try:
            reply = await conn.exchange(request)
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
        if conn.keep_alive and not conn.closed:
            idle = self._idle.setdefault(address, [])
            if len(idle) < IDLE_PER_REPLICA:
                idle.append(conn)
                return reply
        conn.close()
        return reply


class AsyncForwarder:
    """Sends a routed GET to the first candidate replica that answers (event-driven path)."""

    def __init__(self, settings: Settings, router: Router, pool: ReplicaPool) -> None:
        self.settings = settings
        self.router = router
        self.pool = pool

    async def forward(self, target: bytes, headers: Iterable[tuple[str, str]], key: int,
                      path: str) -> Upstream:
        """Like ``lb.router.Forwarder.forward``: ``target`` as received, ``headers`` the
        forwarded set, ``path`` (decoded) names the request in errors."""
        attempts = self.router.attempts(key)
        if attempts.empty and self.router.waiting_for_replicas():
            deadline = self.loop_time() + self.settings.upstream_timeout
            while self.router.waiting_for_replicas() and self.loop_time() < deadline:
                await asyncio.sleep(STARTING_POLL_SECONDS)
            attempts = self.router.attempts(key)
        tail = "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")
        for replica in attempts:
            address = replica.address or ""  # routable: it has one
            request = b"".join((b"GET ", target, b" HTTP/1.1\r\nHost: ",
                                self.pool.host_header(address), b"\r\n", tail, b"\r\n"))
            try:
                reply = await self.pool.fetch(address, request)
            except UpstreamError as exc:
                attempts.failed(replica, exc)
                continue
            attempts.answered(replica, reply.status)
            return self._passed_back(replica, reply, path)
        raise attempts.exhausted()

    def loop_time(self) -> float:
        return self.pool.loop.time()

    @staticmethod
    def _passed_back(replica: Replica, reply: Reply, path: str) -> Upstream:
        error = replica_error(reply.status, reply.content_type, replica.hostname, path)
        if error is not None:
            raise error
        return Upstream(reply.status, reply_headers(reply.headers), reply.body, replica)
