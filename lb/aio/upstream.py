"""The event-driven path's way to the replicas: pooled keep-alive connections, httptools parsing.

One ``ReplicaConnection`` carries one exchange at a time (a GET with no body, its complete
answer); ``ReplicaPool`` keeps the idle ones per replica address, newest first, so a worker
reuses warm connections and lets the rest expire at the replica. ``AsyncForwarder`` is the
threads path's ``lb.router.Forwarder`` on the event loop: the usual request (a first try on a
warm connection) in callbacks alone, anything else in a task; the rules come from
``lb.routing``.

A replica answers the same few heads over and over (they differ in ``Date`` once a second), so
what a head means (status, framing, the header lines passed back) is worked out once per
distinct head, from httptools' parse, and kept by the pool (``Head``). An answer whose first
read holds a whole head seen before is taken without the parser: its body is the next
``Content-Length`` bytes, in that read or the ones after (gunicorn writes a head and its body
apart, and a quarter of the answers at half load come in two reads): the same bytes the parser
already read once, the same outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from lb.errors import ApiError
from lb.events import RouterEvents
from lb.registry import Replica
from lb.routing import (
    STARTING_POLL_SECONDS,
    Attempts,
    Router,
    UpstreamError,
    replica_error,
    reply_headers,
)
from lb.settings import Settings

TIMER_RESOLUTION = 0.001  # libuv's timers count milliseconds
IDLE_PER_REPLICA = 64  # kept-alive connections a worker keeps per replica; more are closed
HEADS_KEPT = 256  # distinct answer heads a worker remembers (Date makes a new one each second)


@dataclass(frozen=True, slots=True)
class Head:
    """What the head of a replica's answer means to the balancer (see ``read_head``)."""

    status: int
    keep_alive: bool
    content_type: str | None
    framed: bool  # Content-Length, chunked or a status without a body: ends without a close
    length: int | None  # the body's size when one Content-Length alone frames it
    passed_back: bytes  # the header lines the client gets (reply_headers), each ending CRLF


def read_head(status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> Head:
    """A head as httptools parsed it: ``headers`` undecoded, in order."""
    content_type: str | None = None
    lengths: list[bytes] = []
    chunked = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif lower == b"content-type":
            content_type = value.decode("latin-1")
    bodiless = status < 200 or status in (204, 304)
    length = int(lengths[0]) if len(lengths) == 1 and not chunked and not bodiless else None
    passed_back = b"".join([b"%s: %s\r\n" % pair for pair in reply_headers(headers)])
    return Head(status, keep_alive, content_type, bodiless or chunked or bool(lengths), length,
                passed_back)


@dataclass(slots=True)
class Reply:
    """A replica's complete answer."""

    status: int  # the head's
    head: Head
    body: bytes


Done = Callable[[Reply | None, UpstreamError | None], None]


class Deadlines:
    """When each exchange in flight must be answered by, kept by one timer per event loop.

    Not a timer per exchange: arming and cancelling one cost about as much as the rest of
    an exchange's bookkeeping. The timer is armed for the earliest deadline; when it fires,
    every exchange past its deadline times out and it is armed for the next.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: dict[ReplicaConnection, tuple[float, float]] = {}  # deadline, timeout
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def add(self, conn: ReplicaConnection, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        self._due[conn] = (deadline, timeout)
        if self._timer is None or deadline < self._armed_for:
            self._arm(deadline)

    def discard(self, conn: ReplicaConnection) -> None:
        self._due.pop(conn, None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_for = self.loop.call_at(when, self._expire), when

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time() + TIMER_RESOLUTION  # a timer may fire that much early
        late = [(conn, timeout) for conn, (deadline, timeout) in self._due.items()
                if deadline <= now]
        for conn, _ in late:
            del self._due[conn]
        for conn, timeout in late:  # may start other exchanges: after the dict is settled
            conn.timed_out(timeout)
        if self._due:
            first = min(deadline for deadline, _ in self._due.values())
            if self._timer is None or first < self._armed_for:
                self._arm(first)


class ReplicaConnection(asyncio.Protocol):
    """One kept-alive connection to a replica, one exchange at a time.

    The outcome of an exchange goes to its ``done`` callback once the parser has returned
    (never from inside it): the callback may hand the connection to the next request, whose
    answer must not be parsed from bytes of this one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines,
                 heads: dict[bytes, Head] | None = None) -> None:
        self.loop = loop
        self.deadlines = deadlines
        self.heads = {} if heads is None else heads  # the pool's: heads read, by their bytes
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self._done: Done | None = None  # the exchange in progress
        self._outcome: tuple[Reply | None, UpstreamError | None] | None = None
        # One parser for the connection's whole life: llhttp starts the next message by itself.
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: Head | None = None
        self._body: list[bytes] = []
        self._got_bytes = False
        self._unread = True  # nothing of the current answer has come yet
        self._known: Head | None = None  # a head seen before, its body still coming
        self._missing = 0  # ... that many bytes of it

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._done is None or self._outcome is not None:
            self.close()  # bytes nobody asked for: the connection is not reusable
            return
        if self._known is not None:  # the rest of a known head's body
            self._body.append(data)
            self._missing -= len(data)
            if self._missing <= 0:
                self._take_known()
            return
        raw = None
        if self._unread:  # the answer starts with these bytes
            self._unread = False
            end = data.find(b"\r\n\r\n") + 4
            if end > 4:
                raw = data[:end]
                head = self.heads.get(raw)
                if head is not None and head.length is not None:
                    # Its head read before: the parser's outcome is known once the body is in.
                    body = data[end:]
                    if len(body) == head.length:  # all of it in this read: the usual answer
                        self.keep_alive = head.keep_alive
                        self._outcome = (Reply(head.status, head, body), None)
                        self._deliver()
                        return
                    if len(body) < head.length:  # the rest comes in the next reads
                        self._known, self._missing = head, head.length - len(body)
                        if body:
                            self._body.append(body)
                        return
                    # More than the body: the parser reads the rest as an unsolicited answer.
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed reply: {exc}"))
            self.close()
        outcome = self._outcome
        if outcome is None:
            return
        reply = outcome[0]
        if (raw is not None and reply is not None and reply.head.length is not None
                and len(raw) + reply.head.length == len(data) == len(raw) + len(reply.body)):
            # The whole answer was these bytes, the head exactly ``raw``: remember it.
            heads = self.heads
            if len(heads) >= HEADS_KEPT:
                heads.clear()
            heads[raw] = reply.head
        self._deliver()

    def _take_known(self) -> None:
        """A known head's body is in: the answer, as the parser would give it. Bytes after
        its end would be a second answer nobody asked for: the connection is not reused."""
        head, self._known = self._known, None
        assert head is not None and head.length is not None
        body = b"".join(self._body)
        self.keep_alive = head.keep_alive and self._missing == 0
        self._outcome = (Reply(head.status, head, body[:head.length]), None)
        if self._missing < 0:
            self.close()
        self._deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and self._outcome is None:
            if self._head is not None and not self._head.framed:  # delimited by the close
                self.keep_alive = False
                self._finish()
            else:
                self._fail(UpstreamError("the replica closed the connection",
                                         before_reply=not self._got_bytes))
        self._deliver()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._outcome is not None:  # a second answer to one request: stop, never reuse
            raise UpstreamError("unsolicited reply")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._head = read_head(parser.get_status_code(), self._headers,
                               parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    # -- the exchange ----------------------------------------------------------------------------
    def exchange(self, request: bytes, timeout: float, done: Done) -> None:
        """Send ``request`` (a complete GET); ``done`` gets the complete answer, or the
        error, within ``timeout`` seconds."""
        assert self.transport is not None and self._done is None
        self._headers, self._body, self._head = [], [], None
        self._got_bytes, self._unread, self._known = False, True, None
        self._done, self._outcome = done, None
        if self.closed:
            # Lost before the request went out: a new connection the replica hung up on
            # while the task that opened it waited for its turn (uvloop raises RuntimeError
            # on a write to a closed transport; asyncio would wait out the deadline).
            self._fail(UpstreamError("the replica closed the connection", before_reply=True))
            self._deliver()
            return
        self.deadlines.add(self, timeout)
        self.transport.write(request)

    def timed_out(self, seconds: float) -> None:
        self._fail(UpstreamError(f"no complete answer within {seconds:g}s"))
        self.close()
        self._deliver()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        if self._done is not None and self._outcome is None and self._head is not None:
            self._outcome = (Reply(self._head.status, self._head, b"".join(self._body)), None)

    def _fail(self, error: UpstreamError) -> None:
        self.keep_alive = False  # the parser's state is unknown: never reused
        if self._done is not None and self._outcome is None:
            self._outcome = (None, error)

    def _deliver(self) -> None:
        done, outcome = self._done, self._outcome
        if done is None or outcome is None:
            return
        self._done = self._outcome = None
        self.deadlines.discard(self)
        done(*outcome)


class ReplicaPool:
    """Idle kept-alive connections per replica address, for one worker's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connect_timeout: float,
                 read_timeout: float) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[str, list[ReplicaConnection]] = {}
        self.deadlines = Deadlines(loop)
        self.heads: dict[bytes, Head] = {}  # answer heads read, shared by every connection
        self._hosts: dict[str, tuple[str, int, bytes]] = {}  # address -> host, port, Host

    def host_header(self, address: str) -> bytes:
        known = self._hosts.get(address)
        return (known or self._host(address))[2]

    def take(self, address: str) -> ReplicaConnection | None:
        """A warm idle connection to ``address``, if there is one (newest first)."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, address: str, conn: ReplicaConnection) -> None:
        """``conn`` after an exchange: kept for the next request when it can be, else closed."""
        if conn.keep_alive and not conn.closed:
            idle = self._idle.setdefault(address, [])
            if len(idle) < IDLE_PER_REPLICA:
                idle.append(conn)
                return
        conn.close()

    async def fetch(self, address: str, request: bytes) -> Reply:
        """``request`` sent to the replica at ``address`` and its complete answer."""
        conn = self.take(address)
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

    async def _connect(self, address: str) -> ReplicaConnection:
        host, port, _ = self._host(address)
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: ReplicaConnection(self.loop, self.deadlines, self.heads),
                    host, port),
                self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to {address}: {exc!r}") from exc
        return conn

    async def _exchange(self, address: str, conn: ReplicaConnection,
                        request: bytes) -> Reply:
        answer: asyncio.Future[Reply] = self.loop.create_future()

        def done(reply: Reply | None, error: UpstreamError | None) -> None:
            if not answer.done():
                if reply is not None:
                    answer.set_result(reply)
                else:
                    answer.set_exception(error or UpstreamError("no reply"))

        conn.exchange(request, self.read_timeout, done)
        try:
            reply = await answer
        except BaseException:
            conn.close()
            raise
        self.release(address, conn)
        return reply


Answered = Callable[[Replica | None, Reply | None, BaseException | None], None]


def hold(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    """Keep ``task`` in ``tasks`` until it is done: the loop keeps only weak references."""
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class AsyncForwarder:
    """Sends a routed GET to the first candidate replica that answers (event-driven path)."""

    def __init__(self, settings: Settings, router: Router, pool: ReplicaPool,
                 events: RouterEvents | None = None) -> None:
        self.settings = settings
        self.router = router
        self.pool = pool
        self.events = events or router.events  # the loop's own counts (LoopCounts)
        self._tasks: set[asyncio.Task[None]] = set()  # see hold()

    def start(self, target: bytes, fields: bytes, key: int, path: str,
              answered: Answered) -> None:
        """``forward``, with its outcome given to ``answered(replica, reply, error)``.

        The usual request, a first try on a warm pooled connection, runs in callbacks alone:
        no task, no future. Anything else (a new connection, a retry, a wait for a starting
        replica) goes on as a task running ``forward``'s own loop from where it stands.
        """
        try:
            attempts = self.router.attempts(key, self.events)
            if attempts.empty:  # nothing routable: wait for a starting replica, or say why
                self._go_on(self.forward(target, fields, key, path), answered)
                return
            replica = attempts.first()
            conn = None if replica is None else self.pool.take(replica.address or "")
        except Exception as exc:  # noqa: BLE001 - answered reports it (a bug with its trace)
            answered(None, None, exc)
            return
        if replica is None or conn is None:
            self._go_on(self._walk(attempts, replica, target, fields, path), answered)
            return
        chosen, warm, address = replica, conn, replica.address or ""

        def done(reply: Reply | None, error: UpstreamError | None) -> None:
            if reply is not None:
                self.pool.release(address, warm)
                attempts.answered(chosen, reply.status)
                try:
                    passed = self._passed_back(chosen, reply, path)
                except ApiError as exc:  # the replica's error, as the contract words it
                    answered(None, None, exc)
                else:
                    answered(*passed, None)
                return
            warm.close()
            assert error is not None
            if error.before_reply:  # a kept-alive connection the replica had closed: not
                # its failure; once more through the pool (a new connection if need be)
                self._go_on(self._walk(attempts, chosen, target, fields, path), answered)
                return
            attempts.failed(chosen, error)
            self._go_on(self._walk(attempts, None, target, fields, path), answered)

        conn.exchange(self._request(address, target, fields), self.pool.read_timeout, done)

    async def forward(self, target: bytes, fields: bytes, key: int,
                      path: str) -> tuple[Replica, Reply]:
        """Like ``lb.router.Forwarder.forward``: ``target`` as received, ``fields`` the
        forwarded header lines (``header_lines``), ``path`` (decoded) names the request in
        errors. The replica that answered and its answer."""
        attempts = self.router.attempts(key, self.events)
        if attempts.empty and self.router.waiting_for_replicas():
            deadline = self.loop_time() + self.settings.upstream_timeout
            while self.router.waiting_for_replicas() and self.loop_time() < deadline:
                await asyncio.sleep(STARTING_POLL_SECONDS)
            attempts = self.router.attempts(key, self.events)
        return await self._walk(attempts, None, target, fields, path)

    async def _walk(self, attempts: Attempts, first: Replica | None, target: bytes,
                    fields: bytes, path: str) -> tuple[Replica, Reply]:
        """The way round the ring from where it stands: ``first`` (when given), then the
        rest of ``attempts``, each through the pool (a new connection when none is idle)."""
        replicas = iter(attempts)
        replica = first if first is not None else next(replicas, None)
        while replica is not None:
            address = replica.address or ""  # routable: it has one
            try:
                reply = await self.pool.fetch(address, self._request(address, target, fields))
            except UpstreamError as exc:
                attempts.failed(replica, exc)
                replica = next(replicas, None)
                continue
            attempts.answered(replica, reply.status)
            return self._passed_back(replica, reply, path)
        raise attempts.exhausted()

    def loop_time(self) -> float:
        return self.pool.loop.time()

    def _request(self, address: str, target: bytes, fields: bytes) -> bytes:
        return b"".join((b"GET ", target, b" HTTP/1.1\r\nHost: ",
                         self.pool.host_header(address), b"\r\n", fields, b"\r\n"))

    def _go_on(self, walk: Awaitable[tuple[Replica, Reply]], answered: Answered) -> None:
        async def run() -> None:
            try:
                replica, reply = await walk
            except Exception as exc:  # noqa: BLE001 - as in start: answered reports it
                answered(None, None, exc)
            else:
                answered(replica, reply, None)

        hold(self._tasks, self.pool.loop.create_task(run()))

    @staticmethod
    def _passed_back(replica: Replica, reply: Reply, path: str) -> tuple[Replica, Reply]:
        head = reply.head
        if head.status >= 400:  # replica_error has nothing to say of anything else
            error = replica_error(head.status, head.content_type, replica.hostname, path)
            if error is not None:
                raise error
        return replica, reply


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    """Header fields as lines, ready to follow a request line and Host."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")
