"""The event-driven path's way to the replicas: pooled keep-alive connections, httptools parsing.

One ``ReplicaProtocol`` carries one exchange at a time (a GET with no body, its complete
answer); ``ReplicaPool`` keeps the idle ones per replica address, newest first, so a worker
reuses warm connections and lets the rest expire at the replica. ``AsyncForwarder`` is the
threads path's ``lb.threads.forward.Forwarder`` on the event loop: the usual request (a first
try on a warm connection) in callbacks alone, anything else in a task; the rules come from
``lb.routing``.

A replica answers the same few heads over and over (they differ in ``Date`` once a second), so
what a head means (``lb.aio.messages.AnswerHead``: status, framing, the header lines passed
back) is worked out once per distinct head and kept by the pool. An answer whose first read
begins with a head seen before is taken without the parser (``lb.aio.shortcuts.AnswerHeads``,
where the argument that nothing changes is): its body is the next ``Content-Length`` bytes, in
that read or the ones after (gunicorn writes a head and its body apart, and a quarter of the
answers at half load come in two reads).
"""

from __future__ import annotations

import asyncio
import fcntl
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from lb.aio.messages import AnswerHead, read_answer_head
from lb.aio.shortcuts import AnswerHeads
from lb.errors import ApiError
from lb.events import RouterEvents
from lb.registry import Replica
from lb.routing import (
    ANSWERED,
    GIVE_UP,
    REPLY_HEAD_MAX_BYTES,
    REPLY_HEAD_MAX_FIELDS,
    RESEND,
    STARTING_POLL_SECONDS,
    TRY,
    WAIT,
    Outcome,
    RingWalk,
    Router,
    Step,
    UpstreamError,
    bound_unacknowledged,
    host_gone,
    replica_error,
)
from lb.settings import Settings

TIMER_RESOLUTION = 0.001  # libuv's timers count milliseconds
IDLE_PER_REPLICA = 64  # kept-alive connections a worker keeps per replica; more are closed
HEADS_KEPT = 256  # distinct answer heads a worker remembers (Date makes a new one each second)
# An answer whose body is still coming past this many bytes is streamed to the client (with
# backpressure) instead of held whole: what one exchange can cost in memory.
STREAM_AFTER = 64 * 1024
NOTHING_PENDING = b"\0\0\0\0"  # FIONREAD's count of zero bytes


@dataclass(slots=True)
class Reply:
    """A replica's answer: complete, or its head and the body so far (``stream``)."""

    status: int  # the head's
    head: AnswerHead
    body: bytes
    stream: ReplicaProtocol | None = None  # the rest of the body follows (follow, pause)


class Sink(Protocol):
    """Where a streamed answer's body goes (the client's connection)."""

    def body(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def broken(self, error: UpstreamError) -> None: ...


Done = Callable[[Reply | None, UpstreamError | None], None]


class Expiring(Protocol):
    """An exchange ``Deadlines`` keeps."""

    def timed_out(self, seconds: float) -> None: ...


Due = Callable[[], None]  # a hedge's deadline: called when it passes


class Deadlines:
    """When each exchange in flight must be answered by, kept by one timer per event loop.

    Not a timer per exchange: arming and cancelling one cost about as much as the rest of
    an exchange's bookkeeping. The timer is armed for the earliest deadline; when it fires,
    every exchange past its deadline times out and it is armed for the next. A hedge's
    deadline (``Due``, a function) is kept the same way: called when it passes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: dict[Expiring | Due, tuple[float, float]] = {}  # deadline, timeout
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def add(self, conn: Expiring | Due, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        self._due[conn] = (deadline, timeout)
        if self._timer is None or deadline < self._armed_for:
            self._arm(deadline)

    def discard(self, conn: Expiring | Due) -> None:
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
            if hasattr(conn, "timed_out"):
                conn.timed_out(timeout)
            else:
                conn()
        if self._due:
            first = min(deadline for deadline, _ in self._due.values())
            if self._timer is None or first < self._armed_for:
                self._arm(first)


class ReplicaProtocol(asyncio.Protocol):
    """One kept-alive connection to a replica, one exchange at a time.

    An exchange ends in one of three ways, given to its ``done`` callback once the parser has
    returned (never from inside it: the callback may hand the connection to the next request,
    whose answer must not be parsed from bytes of this one):

    - a complete answer (``Reply.stream`` None): the usual case, one read or a few;
    - an answer whose body is still coming after ``STREAM_AFTER`` bytes (``Reply.stream`` is
      this connection): the rest goes to the ``Sink`` given to ``follow``, which may
      ``pause`` and ``resume`` it (a client slower than the replica), so an answer of any size
      costs a bounded amount of memory;
    - an ``UpstreamError``: how far the answer came decides a retry (``lb.routing.Outcome.of``).

    Interim answers (1xx but 101) are skipped: the final answer is the one delivered. A
    connection is reused only after an answer read completely by its framing, with nothing
    after it (bytes beyond the answer, or arriving while idle, close it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines,
                 heads: AnswerHeads | None = None, read_timeout: float = 5.0,
                 max_reply: int = 0, connect_timeout: float | None = None) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout  # bounds unacknowledged bytes, when given
        self.deadlines = deadlines
        self.heads = AnswerHeads() if heads is None else heads  # the pool's memo
        self.read_timeout = read_timeout  # between two reads of an answer that has begun
        self.max_reply = max_reply  # largest body passed on (0: any)
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.closed = False
        self.keep_alive = False
        self.on_free: Callable[[ReplicaProtocol], None] | None = None  # a stream's end
        self.on_lost: Callable[[ReplicaProtocol], None] | None = None  # the pool's count
        self._done: Done | None = None  # the exchange in progress
        self._outcome: tuple[Reply | None, UpstreamError | None] | None = None
        # One parser for the connection's whole life: llhttp starts the next message by itself.
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: AnswerHead | None = None
        self._body: list[bytes] = []
        self._size = 0  # body bytes of the current answer
        self._head_size = 0  # bytes read before its (final) head was complete
        self._field_bytes = 0  # the bytes of its header fields (and interim answers')
        self._got_bytes = False
        self._unread = True  # nothing of the current answer has come yet
        self._known: AnswerHead | None = None  # a head seen before, its body still coming
        self._missing = 0  # ... that many bytes of it
        self._bodiless = False  # the answer to a HEAD request: no body, whatever its fields say
        self._sink: Sink | None = None  # where a streamed body goes (follow)
        self._streaming = False  # the answer was delivered before its body was all in
        self._ended = False  # ... and its end was read
        self._paused = False  # the sink asked for no more for now
        self._read_on = True  # the transport is reading

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        if sock is not None and self.connect_timeout is not None:  # (open: just made)
            bound_unacknowledged(sock, self.connect_timeout)

    @property
    def began(self) -> bool:
        """A byte of the current exchange's answer has come (no hedge for it then)."""
        return self._got_bytes

    def pending(self) -> bool:
        """Bytes the replica sent that the loop has not read yet (FIONREAD): on an idle
        connection, an answer nobody asked for."""
        if self.fd < 0:
            return False
        try:  # the count comes back in the 4 bytes given: any but zero is pending bytes
            return fcntl.ioctl(self.fd, termios.FIONREAD, NOTHING_PENDING) != NOTHING_PENDING
        except OSError:
            return True  # the descriptor is gone: not reusable either

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._streaming:
            self._feed(data)
            if self._ended:
                if self._sink is not None:
                    self._end_stream()  # else follow() ends it when the sink comes
            elif not self.closed and self._read_on:  # (not while the sink holds it back)
                self.deadlines.add(self, self.read_timeout)
            return
        if self._done is None or self._outcome is not None:
            self.close()  # bytes nobody asked for: the connection is not reusable
            return
        if self._known is not None:  # the rest of a known head's body
            self._body.append(data)
            self._missing -= len(data)
            if self._missing <= 0:
                self._take_known()
            else:
                self.deadlines.add(self, self.read_timeout)
            return
        first = self._unread and not self._bodiless  # the answer starts with these bytes
        self._unread = False
        if first:
            known = self.heads.recall(data)
            if known is not None:  # its head read before (lb.aio.shortcuts)
                head, body = known
                assert head.length is not None
                if len(body) == head.length:  # all of it in this read: the usual answer
                    self.keep_alive = head.keep_alive
                    self._outcome = (Reply(head.status, head, body), None)
                    self._deliver()
                    return
                self._known, self._missing = head, head.length - len(body)  # more to come
                if body:
                    self._body.append(body)
                self.deadlines.add(self, self.read_timeout)
                return
        in_head = self._head is None
        if in_head:
            self._head_size += len(data)
        self._feed(data)
        if in_head and self._head is None and self._head_size > REPLY_HEAD_MAX_BYTES:
            # No end of the head in sight (on_header counts a head that ends in one read).
            self._broke(UpstreamError(f"answer head over {REPLY_HEAD_MAX_BYTES} bytes",
                                      began=True))
        outcome = self._outcome
        if outcome is None:
            if self._head is not None and self._size > STREAM_AFTER and not self.closed:
                self._start_stream()  # a large answer: the rest goes through follow's sink
            elif not self.closed:
                self.deadlines.add(self, self.read_timeout)  # the next read's deadline
            return
        reply = outcome[0]
        if first and reply is not None:
            self.heads.learn(data, reply.head, reply.body)
        self._deliver()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                self.close()  # the body announced for a GET never comes: not reusable
            else:
                self._broke(cause if isinstance(cause, UpstreamError) else
                            UpstreamError(f"malformed answer: {exc}", began=True))
        except httptools.HttpParserUpgrade:
            self._broke(UpstreamError("the replica switched protocols (101): the balancer "
                                      "does not tunnel", began=True))
        except httptools.HttpParserError as exc:
            self._broke(UpstreamError(f"malformed answer: {exc}", began=True))

    def _broke(self, error: UpstreamError) -> None:
        """The answer broke the protocol (or a bound): nothing more is read from here."""
        if self._streaming and self._sink is not None and not self._ended:
            sink, self._sink = self._sink, None
            self.close()
            sink.broken(error)
            return
        self._fail(error)
        self.close()

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
        if self.on_lost is not None:
            self.on_lost(self)
            self.on_lost = None
        if self._streaming:
            if not self._ended and self._head is not None and not self._head.framed:
                self._ended = True  # delimited by the close
            if self._ended:
                if self._sink is not None:
                    self._end_stream()
            elif self._sink is not None:
                self.deadlines.discard(self)
                sink, self._sink = self._sink, None
                sink.broken(UpstreamError("the replica closed the connection mid-answer",
                                          began=True))
            return
        if self._done is not None and self._outcome is None:
            if self._head is not None and not self._head.framed:  # delimited by the close
                self.keep_alive = False
                self._finish()
            else:
                # Cut by the close (a replica that crashed): nothing of it went to the client,
                # so the next replica may have the request (a GET: RFC 9110 section 9.2.2).
                self._fail(UpstreamError("the replica's host stopped acknowledging"
                                         if host_gone(exc) else "the replica closed the connection",
                                         before_reply=not self._got_bytes and not host_gone(exc)))
        self._deliver()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._outcome is not None or self._ended:
            raise UpstreamError("unsolicited answer", began=True)  # never reused

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= REPLY_HEAD_MAX_FIELDS:
            raise UpstreamError(f"answer head over {REPLY_HEAD_MAX_FIELDS} fields", began=True)
        self._field_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        if self._field_bytes > REPLY_HEAD_MAX_BYTES:
            raise UpstreamError(f"answer head over {REPLY_HEAD_MAX_BYTES} bytes", began=True)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status == 101:
            raise UpstreamError("the replica switched protocols (101): the balancer does not "
                                "tunnel", began=True)
        if status < 200:
            self._headers = []  # interim (100, 103, ...): the final answer follows
            return
        head = self._head = read_answer_head(status, self._headers, parser.should_keep_alive())
        if self._bodiless:
            self.keep_alive = False
            self._outcome = (Reply(status, head, b""), None)
            raise _HeadDone()
        if self.max_reply and head.length is not None and head.length > self.max_reply:
            raise UpstreamError(f"answer of {head.length} bytes, over LB_MAX_REPLY", began=True)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self.max_reply and self._size > self.max_reply:
            raise UpstreamError("answer over LB_MAX_REPLY", began=True)
        if self._sink is not None:
            self._sink.body(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # an interim answer's end
        self.keep_alive = self._parser.should_keep_alive()
        if self._streaming:
            self._ended = True
        else:
            self._finish()

    # -- the exchange ----------------------------------------------------------------------------
    def exchange(self, request: bytes, timeout: float, done: Done,
                 bodiless: bool = False) -> None:
        """Send ``request`` (a complete GET or HEAD); ``done`` gets the answer, or the error.
        Its first byte must come within ``timeout`` seconds, each later read within the
        pool's ``read_timeout``."""
        assert self.transport is not None and self._done is None
        self._headers, self._body, self._head = [], [], None
        self._size = self._head_size = self._field_bytes = 0
        self._got_bytes, self._unread, self._known = False, True, None
        self._done, self._outcome, self._bodiless = done, None, bodiless
        self._streaming = self._ended = False
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
        error = UpstreamError(f"no answer within {seconds:g}s" if not self._got_bytes else
                              f"the answer stopped for {seconds:g}s", timed_out=True,
                              began=self._got_bytes)
        if self._streaming:
            self._broke(error)
            return
        self._fail(error)
        self.close()
        self._deliver()

    def close(self) -> None:
        self.closed = True
        self.keep_alive = False
        self.deadlines.discard(self)
        if self.transport is not None:
            self.transport.close()

    # -- a streamed answer -----------------------------------------------------------------------
    def follow(self, sink: Sink) -> None:
        """The rest of a streamed answer's body goes to ``sink`` (``body``, then ``end`` or
        ``broken``)."""
        self._sink = sink
        waiting, self._body = self._body, []  # what came before the sink did
        for piece in waiting:
            sink.body(piece)
        self._reading()
        if self._ended or (self.closed and self._head is not None and not self._head.framed):
            self._ended = True
            self._end_stream()
        elif self.closed:
            self._sink = None
            sink.broken(UpstreamError("the replica closed the connection mid-answer",
                                      began=True))

    def pause(self) -> None:
        """The sink has enough for now: read no more (its deadline stops meanwhile)."""
        self._paused = True
        self._reading()

    def resume(self) -> None:
        self._paused = False
        self._reading()

    def _reading(self) -> None:
        """Read a streamed answer only while a sink takes it and has not asked for a pause:
        what waits is the replica's, in its socket buffers, not this worker's memory."""
        want = not self._streaming or (self._sink is not None and not self._paused)
        if self.closed or self.transport is None or want == self._read_on:
            return
        self._read_on = want
        if want:
            self.transport.resume_reading()
            self.deadlines.add(self, self.read_timeout)
        else:
            self.transport.pause_reading()
            self.deadlines.discard(self)

    def abandon(self) -> None:
        """The client went away mid-answer: the rest is never read, the connection closed."""
        self._sink = None
        self._streaming = False
        self.close()

    def _start_stream(self) -> None:
        assert self._head is not None
        self._streaming = True
        self._paused = False
        self._reading()  # no sink yet: nothing more is read until follow() gives one
        body, self._body = b"".join(self._body), []
        self._outcome = (Reply(self._head.status, self._head, body, self), None)
        self._deliver()

    def _end_stream(self) -> None:
        self.deadlines.discard(self)
        sink, self._sink = self._sink, None
        self._streaming = self._ended = self._paused = False
        self._reading()  # back to reading: an idle connection must see stray bytes
        assert sink is not None
        if self.on_free is not None and not self.closed:
            self.on_free(self)
        elif not self.closed:
            self.close()
        sink.end()

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
        if not self._streaming:
            self.deadlines.discard(self)
        done(*outcome)


class _HeadDone(Exception):
    """The answer to a HEAD is its head: the parser stops there (llhttp would wait for the
    body its fields announce)."""


class ReplicaPool:
    """Idle kept-alive connections per replica address, for one worker's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connect_timeout: float,
                 first_byte_timeout: float, read_timeout: float | None = None,
                 max_reply: int = 0, connection_limit: int = 1 << 30) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.read_timeout = first_byte_timeout  # the first byte of an answer
        self.between_reads = first_byte_timeout if read_timeout is None else read_timeout
        self.max_reply = max_reply
        # Replica connections open at once, idle or not (lb.aio.accept.client_cap: as many as
        # the clients a worker may hold, each of which uses one at a time).
        self.connection_limit = connection_limit
        self.open = 0
        self._idle: dict[str, list[ReplicaProtocol]] = {}
        self.deadlines = Deadlines(loop)
        # Answer heads read, shared by every connection (lb.aio.shortcuts).
        self.heads = AnswerHeads(HEADS_KEPT, STREAM_AFTER)
        self._hosts: dict[str, tuple[str, int, bytes]] = {}  # address -> host, port, Host

    def host_header(self, address: str) -> bytes:
        known = self._hosts.get(address)
        return (known or self._host(address))[2]

    def take(self, address: str) -> ReplicaProtocol | None:
        """A warm idle connection to ``address``, if there is one (newest first); one with
        bytes waiting (an answer nobody asked for) is closed, never handed out."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.pending():
                conn.close()
                continue
            return conn
        return None

    def release(self, address: str, conn: ReplicaProtocol) -> None:
        """``conn`` after an exchange: kept for the next request when it can be, else closed."""
        if conn.keep_alive and not conn.closed and self.open <= self.connection_limit:
            idle = self._idle.setdefault(address, [])
            if len(idle) < IDLE_PER_REPLICA:
                idle.append(conn)
                return
        conn.close()

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

    def _make_room(self) -> None:
        """At the limit, an idle connection (the longest idle, to the replica with most) is
        closed for the new one: descriptors stay within the worker's budget."""
        idle = max(self._idle.values(), key=len, default=None)
        if idle:
            conn = idle.pop(0)
            conn.close()

    def _lost(self, conn: ReplicaProtocol) -> None:
        self.open -= 1

    async def connect(self, address: str) -> ReplicaProtocol:
        """A new connection to ``address`` (``UpstreamError`` when there is none)."""
        host, port, _ = self._host(address)
        if self.open >= self.connection_limit:
            self._make_room()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: ReplicaProtocol(self.loop, self.deadlines, self.heads,
                                              self.between_reads, self.max_reply,
                                              self.connect_timeout),
                    host, port),
                self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to {address}: {exc!r}") from exc
        conn.on_free = lambda c: self.release(address, c)
        conn.on_lost = self._lost
        self.open += 1
        return conn

    async def exchange(self, address: str, conn: ReplicaProtocol,
                       request: bytes, bodiless: bool = False) -> Reply:
        """``request`` sent on ``conn`` and its answer; ``conn`` goes back to the pool after a
        complete answer, is closed after a failure."""
        answer: asyncio.Future[Reply] = self.loop.create_future()

        def done(reply: Reply | None, error: UpstreamError | None) -> None:
            if not answer.done():
                if reply is not None:
                    answer.set_result(reply)
                else:
                    answer.set_exception(error or UpstreamError("no reply"))
            elif reply is not None and reply.stream is not None:
                reply.stream.abandon()  # nobody waits for it any more

        conn.exchange(request, self.read_timeout, done, bodiless)
        try:
            reply = await answer
        except BaseException:
            conn.close()
            raise
        if reply.stream is None:
            self.release(address, conn)
        return reply


Answered = Callable[[Replica | None, Reply | None, BaseException | None], None]


@dataclass(slots=True)
class Tried:
    """How one try of a hedged request ended: its answer, or its failure."""

    reply: Reply | None
    error: UpstreamError | None
    reused: bool  # on a pooled kept-alive connection


def hold(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    """Keep ``task`` in ``tasks`` until it is done: the loop keeps only weak references."""
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class AsyncForwarder:
    """Sends a routed GET or HEAD to the first candidate replica that answers (event-driven
    path)."""

    def __init__(self, settings: Settings, router: Router, pool: ReplicaPool,
                 events: RouterEvents | None = None) -> None:
        self.settings = settings
        self.router = router
        self.pool = pool
        self.events = events or router.events  # the loop's own counts (LoopCounts)
        self._tasks: set[asyncio.Task[None]] = set()  # see hold()

    def start(self, target: bytes, fields: bytes, key: int, path: str,
              answered: Answered, method: bytes = b"GET") -> None:
        """``forward``, with its outcome given to ``answered(replica, reply, error)``.

        The usual request, a first try on a warm pooled connection, runs in callbacks alone:
        no task, no future. Anything else (a new connection, a retry, a wait for a starting
        replica) goes on as a task driving the same walk from where it stands.
        """
        walk = None
        try:
            walk = self.router.walk(key, self.events)
            if walk.empty:  # nothing routable: wait for a starting replica, or say why
                self._go_on(self.forward(target, fields, key, path, method), answered)
                return
            replica = walk.first()
            if replica is None:  # the key's own replica is a suspect, or loads are bounded
                step, conn = walk.start(), None
            elif walk.slotted:  # under the replica's limit: the usual case
                step, conn = TRY, self.pool.take(replica.address or "")
            else:  # at it: the task waits for a slot
                step, conn = TRY, None
        except Exception as exc:  # noqa: BLE001 - answered reports it (a bug with its trace)
            if walk is not None:
                walk.abandon()  # a slot it took goes back
            answered(None, None, exc)
            return
        if replica is None or conn is None:
            self._go_on(self._walk(walk, step, target, fields, path, method), answered)
            return
        chosen, warm, address = replica, conn, replica.address or ""
        race: list[asyncio.Future[Tried]] = []  # the first try's, once a hedge went out
        due: Due | None = None

        def done(reply: Reply | None, error: UpstreamError | None) -> None:
            if due is not None:
                self.pool.deadlines.discard(due)
            if race:  # a hedge went out: the race (``_race``) decides
                self._handed_over(race[0], address, warm, reply, error)
                return
            if reply is not None:
                if reply.stream is None:
                    self.pool.release(address, warm)
                walk.told(ANSWERED, status=reply.status)
                try:
                    passed = self._passed_back(chosen, reply, path)
                except ApiError as exc:  # the replica's error, as the contract words it
                    answered(None, None, exc)
                else:
                    answered(*passed, None)
                return
            warm.close()
            assert error is not None
            step = walk.told(Outcome.of(error, reused=True), error)  # a pooled connection
            if step is GIVE_UP:
                answered(None, None, walk.error)
                return
            self._go_on(self._walk(walk, step, target, fields, path, method), answered)

        conn.exchange(self._request(method, address, target, fields), self.pool.read_timeout,
                      done, method == b"HEAD")
        after = self.router.hedging.after if self.settings.retries else 0.0  # hedge_after()
        if after:
            def hedge() -> None:
                """No answer within the hedge deadline: the next candidate gets it too."""
                if warm.began or walk.replica is not chosen or walk.pending is not None:
                    return  # answered meanwhile, or the walk went on without it
                if walk.hedge() is None:
                    if walk.hedge_after() and due is not None:  # refused: ask again later
                        self.pool.deadlines.add(due, after)
                    return
                first: asyncio.Future[Tried] = self.pool.loop.create_future()
                first.add_done_callback(lambda f: warm.close() if f.cancelled() else None)
                race.append(first)
                self._go_on(self._race(walk, TRY, target, fields, path, method,
                                       {first: chosen}), answered)

            due = hedge
            self.pool.deadlines.add(hedge, after)

    def _handed_over(self, first: asyncio.Future[Tried], address: str, conn: ReplicaProtocol,
                     reply: Reply | None, error: UpstreamError | None) -> None:
        """The fast path's first try ended after a hedge went out: its outcome to the race."""
        if reply is None:
            conn.close()
        elif reply.stream is None:
            self.pool.release(address, conn)
        if not first.done():
            first.set_result(Tried(reply, error, True))
        elif reply is not None and reply.stream is not None:
            reply.stream.abandon()  # the race is over: nobody takes it

    async def forward(self, target: bytes, fields: bytes, key: int,
                      path: str, method: bytes = b"GET") -> tuple[Replica, Reply]:
        """Like ``lb.threads.forward.Forwarder.forward``: ``target`` as received, ``fields`` the
        forwarded header lines (``header_lines``), ``path`` (decoded) names the request in
        errors. The replica that answered and its answer."""
        walk = self.router.walk(key, self.events)
        if walk.empty and self.router.waiting_for_replicas():
            deadline = self.loop_time() + self.settings.upstream_timeout
            while self.router.waiting_for_replicas() and self.loop_time() < deadline:
                await asyncio.sleep(STARTING_POLL_SECONDS)
            walk = self.router.walk(key, self.events)
        return await self._walk(walk, walk.start(), target, fields, path, method)

    async def _walk(self, walk: RingWalk, step: Step, target: bytes, fields: bytes, path: str,
                    method: bytes = b"GET") -> tuple[Replica, Reply]:
        """The way round the ring from ``step``: each try through the pool (a warm
        connection if one is idle, else a new one; a RESEND always on a new one)."""
        try:
            if self.router.hedging.share:
                return await self._race(walk, step, target, fields, path, method, {})
            return await self._tries(walk, step, target, fields, path, method)
        finally:
            walk.abandon()  # (cancelled, or a bug): its slots given back; no-op once ended

    async def _tries(self, walk: RingWalk, step: Step, target: bytes, fields: bytes, path: str,
                     method: bytes) -> tuple[Replica, Reply]:
        pool = self.pool
        while step is TRY or step is RESEND:
            if not walk.slotted:
                step = await self._slot(walk)
                continue
            replica = walk.replica
            assert replica is not None
            address = replica.address or ""  # routable: it has one
            conn = None if step is RESEND else pool.take(address)
            reused = conn is not None
            try:
                if conn is None:
                    conn = await pool.connect(address)
                reply = await pool.exchange(
                    address, conn, self._request(method, address, target, fields),
                    method == b"HEAD")
            except UpstreamError as exc:
                step = walk.told(Outcome.of(exc, reused), exc)
                continue
            walk.told(ANSWERED, status=reply.status)
            return self._passed_back(replica, reply, path)
        assert walk.error is not None
        raise walk.error

    async def _slot(self, walk: RingWalk) -> Step:
        """Wait in ``walk.replica``'s queue for a slot (``lb.limits``): TRY or GIVE_UP."""
        slot: asyncio.Future[None] = self.pool.loop.create_future()

        def wake() -> None:
            if not slot.done():  # (cancelled by wait_for at the deadline)
                slot.set_result(None)

        waiter = walk.queue(wake)
        if waiter is None:
            return GIVE_UP  # the queue is full
        try:
            await asyncio.wait_for(slot, self.router.limits.left(waiter))
        except TimeoutError:
            pass  # waited() tells which came first
        return walk.waited()

    async def _race(self, walk: RingWalk, step: Step, target: bytes, fields: bytes, path: str,
                    method: bytes, flight: dict[asyncio.Future[Tried], Replica]
                    ) -> tuple[Replica, Reply]:
        """``_walk`` with hedging: each try a task; a try with no answer within the walk's
        hedge deadline is sent to the next candidate too (``RingWalk.hedge``: only when it has
        a free slot), the first answer wins and the other try is cancelled (its connection
        closed; the walk gave its slot back). A try at a replica at its limit waits for a slot
        first (``_slot``), with no other try in flight: its hedge deadline counts from its
        send."""
        conns: dict[asyncio.Future[Tried], list[ReplicaProtocol]] = {}  # each try's, once made
        try:
            while step is TRY or step is RESEND or step is WAIT:
                if step is not WAIT and not walk.slotted:  # at its limit: wait for a slot
                    assert not flight  # (a queue wait comes before any try is in flight)
                    step = await self._slot(walk)
                    continue
                if step is not WAIT:
                    replica = walk.replica
                    assert replica is not None
                    made: list[ReplicaProtocol] = []
                    attempt = self._try(replica, step is RESEND, method, target, fields, made)
                    flight[attempt], conns[attempt] = replica, made
                after = walk.hedge_after() if len(flight) == 1 else 0.0
                done, _ = await asyncio.wait(flight, timeout=after or None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:  # no answer within the hedge deadline: the next one too
                    began = any(c.began for made in conns.values() for c in made)
                    step = TRY if not began and walk.hedge() is not None else WAIT
                    continue
                ended = next((f for f in done if f.result().reply is not None), next(iter(done)))
                replica = flight.pop(ended)
                conns.pop(ended, None)
                tried = ended.result()
                if tried.reply is not None:
                    walk.told(ANSWERED, status=tried.reply.status, replica=replica)
                    return self._passed_back(replica, tried.reply, path)
                assert tried.error is not None
                step = walk.told(Outcome.of(tried.error, tried.reused), tried.error,
                                 replica=replica)
        finally:
            for loser in flight:
                if not loser.done():
                    loser.cancel()  # its connection is closed, never pooled
                elif (not loser.cancelled() and (lost := loser.result().reply) is not None
                      and lost.stream is not None):
                    lost.stream.abandon()  # answered too, but late: its body is not read
            walk.abandon()  # (cancelled, or a bug): both tries' slots; no-op once ended
        assert walk.error is not None
        raise walk.error

    def _try(self, replica: Replica, fresh: bool, method: bytes, target: bytes,
             fields: bytes, made: list[ReplicaProtocol]) -> asyncio.Future[Tried]:
        """One try at ``replica`` as a task (a pooled connection unless ``fresh``); its
        connection goes into ``made`` once there is one."""
        pool = self.pool
        address = replica.address or ""  # routable: it has one
        request = self._request(method, address, target, fields)

        async def run() -> Tried:
            conn = None if fresh else pool.take(address)
            reused = conn is not None
            try:
                if conn is None:
                    conn = await pool.connect(address)
                made.append(conn)
                return Tried(await pool.exchange(address, conn, request, method == b"HEAD"),
                             None, reused)
            except UpstreamError as exc:
                return Tried(None, exc, reused)

        return pool.loop.create_task(run())

    def loop_time(self) -> float:
        return self.pool.loop.time()

    def _request(self, method: bytes, address: str, target: bytes, fields: bytes) -> bytes:
        return b"".join((method, b" ", target, b" HTTP/1.1\r\nHost: ",
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
                if reply.stream is not None:
                    reply.stream.abandon()  # its body is not passed on
                raise error
        return replica, reply
