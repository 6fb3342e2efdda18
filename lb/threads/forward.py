"""The threads path's forwarding: blocking keep-alive connections per thread (``http.client``).

The reference implementation of the data path (``LB_WORKER=threads``): the Flask view hands
over the request's parts, this module does the I/O, and every rule comes from ``lb.routing``.
``http.client`` directly, not urllib3: urllib3 re-encodes the target (``%2e`` became ``%2E``,
``/%zz`` became ``/%25zz``) where the replica must get it exactly as the client sent it.

What ``http.client`` leaves to its caller, and this module does:

- **the answer's head** (``ReplicaResponse.begin``): interim answers (1xx but 101) skipped, a
  101 refused (the balancer does not tunnel), the whole head bounded (``REPLY_HEAD_MAX_BYTES``
  over every line, ``REPLY_HEAD_MAX_FIELDS`` per head), the framing worked out strictly (RFC
  9112 section 6.3: a Content-Length that is not one number, or a transfer coding other than
  chunked, is a broken answer, 502; never a guess);
- **a connection used again only when it is clean**: its answer was read to the end by its own
  framing, no byte came after it (checked before ``http.client`` drops its read buffer, and
  again just before the next request goes out), the replica did not ask to close, and the
  request went out whole. Anything else and the connection is closed, so that no request can
  ever read the rest of another's answer;
- **deadlines** (``Forwarder._send``, ``_first_answer``, ``_answer``): the connect within
  ``connect_timeout``, the answer's first byte within ``upstream_timeout``, each further read
  within ``read_timeout``; the request acknowledged by the replica's host within
  ``connect_timeout`` (the kernel's, as on the event-driven path:
  ``lb.routing.bound_unacknowledged``);
- **hedging** (``lb.hedging``): while the first byte is awaited, a try with none within the
  walk's hedge deadline is sent to the next candidate too (only when it has a free slot:
  ``lb.limits``); both sockets are polled, the first to answer wins and the other's
  connection is closed;
- **bounded memory**: an answer over ``STREAM_ABOVE`` bytes, or of unknown length, is handed to
  the client a piece at a time (``Upstream.stream``); the client's own pace is the backpressure.
"""

from __future__ import annotations

import email.parser
import http.client
import logging
import math
import re
import select
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
    bodiless,
    bound_unacknowledged,
    connection_options,
    header_value,
    host_gone,
    replica_error,
    reply_headers,
)
from lb.settings import Settings

log = logging.getLogger(__name__)

# An answer whose body is larger than this, or of unknown length, goes to the client in pieces
# of at most STREAM_PIECE bytes instead of being held whole.
STREAM_ABOVE = 64 * 1024
STREAM_PIECE = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.(\d) (\d\d\d)(?: ([^\r\n]*))?\r?\n")
_FIELD_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
_LAST_LINE = (b"\r\n", b"\n")


class BrokenAnswer(http.client.HTTPException):
    """The replica's answer broke HTTP/1.1, or a limit the balancer sets on answers."""


class ReplyCut(Exception):
    """A streamed answer failed after its head went to the client: the client's connection is
    cut (a second status cannot be sent). Not an ``OSError``, so that gunicorn takes it for
    the application's failure after the head and closes the connection."""


def clean_and_idle(sock: socket.socket) -> bool:
    """Nothing has come on ``sock`` and the replica has not closed it, without waiting."""
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0.0)
        sock.recv(1, socket.MSG_PEEK)  # a byte nobody asked for, or b"": closed
        return False
    except BlockingIOError:
        return True  # nothing to read: idle and open
    except OSError:
        return False
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


class ReplicaResponse(http.client.HTTPResponse):
    """``http.client``'s answer, with the head and the chunked framing read strictly and
    bounded, and ``reusable`` telling whether the connection may carry another request."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(sock, debuglevel, method, url)
        self._sock = sock
        self.request_method = method
        self.reusable = False  # the body ended by its framing and nothing came after it
        self.irregular = False  # the framing was odd enough that the connection must close
        self.declared_length: int | None = None  # the head's Content-Length (HEAD answers)
        self._room = REPLY_HEAD_MAX_BYTES
        self._abandoned = False  # closed before the body was read to its end

    # -- the head ---------------------------------------------------------------------------
    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            line = self._head_line("status line")
            match = _STATUS_LINE.fullmatch(line)
            if match is None:
                raise BrokenAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
            status = int(match.group(2))
            if status < 100:
                raise BrokenAnswer(f"status {status}")
            fields = self._fields()
            if status == 101:
                raise BrokenAnswer("101 Switching Protocols (the balancer does not tunnel)")
            if status >= 200:
                break
            # An interim answer (103 Early Hints, 100 Continue): the final one follows.
        self.code = self.status = status
        self.reason = (match.group(3) or b"").decode("latin-1").strip()
        self.version = 10 if match.group(1) == b"0" else 11
        text = b"".join(fields).decode("iso-8859-1")
        self.headers = self.msg = email.parser.Parser(
            _class=http.client.HTTPMessage).parsestr(text)
        self._framing(status)

    def _head_line(self, what: str) -> bytes:
        line: bytes = self.fp.readline(self._room + 1)
        if not line.endswith(b"\n"):
            if len(line) > self._room:
                raise BrokenAnswer(f"answer head over {REPLY_HEAD_MAX_BYTES} bytes")
            raise http.client.IncompleteRead(line)  # closed in the answer's head: cut short
        self._room -= len(line)
        return line

    def _fields(self) -> list[bytes]:
        fields: list[bytes] = []
        while True:
            line = self._head_line("head")
            if line in _LAST_LINE:
                return fields
            if _FIELD_LINE.fullmatch(line) is None:
                raise BrokenAnswer(f"not a header field: {line[:80]!r}")
            fields.append(line)
            if len(fields) > REPLY_HEAD_MAX_FIELDS:
                raise BrokenAnswer(f"more than {REPLY_HEAD_MAX_FIELDS} header fields")

    def _framing(self, status: int) -> None:
        """RFC 9112 section 6.3, the way a proxy must read it: what ends the body."""
        headers = self.headers
        closing = [v for v in headers.get_all("connection") or []
                   if "close" in connection_options(v)]
        keep_alive = [v for v in headers.get_all("connection") or []
                      if "keep-alive" in connection_options(v)]
        self.will_close = bool(closing) or (self.version == 10 and not keep_alive)
        codings = [c.strip(" \t").lower() for v in headers.get_all("transfer-encoding") or []
                   for c in v.split(",")]
        lengths = {v.strip(" \t") for f in headers.get_all("content-length") or []
                   for v in f.split(",")}
        if lengths:
            if len(lengths) > 1 or not all(v.isdigit() and v.isascii() for v in lengths):
                raise BrokenAnswer(f"Content-Length {sorted(lengths)!r} is not one length")
            self.declared_length = int(lengths.pop())
        self.chunked = False
        self.chunk_left = None
        self.length = self.declared_length
        if bodiless(status) or self.request_method == "HEAD":
            self.length = 0  # whatever the fields say (RFC 9110 section 6.4.1)
        elif codings:
            if codings != ["chunked"]:
                raise BrokenAnswer(f"transfer coding {codings!r} (only chunked is read)")
            self.chunked, self.length = True, None
            if self.declared_length is not None:
                self.irregular = True  # both: chunked wins, and the connection goes
        elif self.length is None:
            self.will_close = True  # the body ends when the replica closes

    # -- chunked framing, strictly --------------------------------------------------------
    def _read_next_chunk_size(self) -> int:
        line = self.fp.readline(1025)
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise BrokenAnswer(f"not a chunk size line: {line[:80]!r}")
        return int(match.group(1), 16)

    def _get_chunk_left(self) -> int | None:
        chunk_left = self.chunk_left
        if not chunk_left:
            if chunk_left is not None and self.fp.read(2) != b"\r\n":
                raise BrokenAnswer("a chunk does not end with CRLF")
            chunk_left = self._read_next_chunk_size()
            if chunk_left == 0:
                self._read_and_discard_trailer()
                self._close_conn()
                chunk_left = None
            self.chunk_left = chunk_left
        return chunk_left

    def _read_and_discard_trailer(self) -> None:
        self._room = REPLY_HEAD_MAX_BYTES
        self._fields()

    # -- the end of the body --------------------------------------------------------------
    def _close_conn(self) -> None:
        """The body is complete (or abandoned): before ``http.client`` closes its buffered
        reader, and loses what it read ahead, see whether anything came after the answer."""
        fp = self.fp
        if fp is not None and not (self.will_close or self.irregular or self._abandoned):
            self.reusable = not self._pending(fp)
        http.client.HTTPResponse._close_conn(self)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._abandoned = self.fp is not None  # closed before its body was read to the end
        super().close()

    def _pending(self, fp: Any) -> bool:
        """Bytes after the answer, read ahead already or on the socket, or the replica has
        closed: looked at without waiting (a connection in doubt is not used again)."""
        sock = self._sock
        try:
            timeout = sock.gettimeout()
            sock.settimeout(0.0)
            buffered = bool(fp.peek(1))
            sock.settimeout(timeout)
        except OSError:
            return True
        return buffered or not clean_and_idle(sock)

    def piece(self, most: int) -> bytes:
        """Up to ``most`` bytes of the body, from at most one read; ``b""`` at its end."""
        if self.fp is None:
            return b""
        if self.chunked:
            data: bytes = self.read1(most)
            return data
        want = most if self.length is None else min(most, self.length)
        if want == 0:
            self._close_conn()
            return b""
        data = self.fp.read1(want)
        if not data:
            self._close_conn()
            if self.length is not None:
                raise http.client.IncompleteRead(b"", self.length)
            return b""
        if self.length is not None:
            self.length -= len(data)
            if self.length == 0:
                self._close_conn()
        return data


class ReplicaHTTPConnection(http.client.HTTPConnection):
    """One thread's keep-alive connection to one replica: connects within the connect
    timeout; the request line goes out byte for byte (``http.client`` would insist on ASCII)."""

    response_class = ReplicaResponse

    def __init__(self, host: str, port: int | None, connect_timeout: float,
                 send_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.reusable = False  # set once an answer ended cleanly on it

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.send_timeout)
        bound_unacknowledged(self.sock, self.connect_timeout)

    def _encode_request(self, request: str) -> bytes:
        return request.encode("latin-1")  # the target as received (gunicorn decodes latin-1)

    def ready(self) -> bool:
        """Whether the next request may go out on this connection as it is."""
        return self.sock is None or (self.reusable and clean_and_idle(self.sock))

    def send_request(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        self.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        self.putheader("Host", f"{self.host}:{self.port}")
        for name, value in headers:
            self.putheader(name, value)
        self.endheaders()

    def answer_began(self) -> bool:
        """Once the socket is readable: the answer's first byte is there (False: the replica
        closed the connection before any; an ``OSError`` when the connection failed)."""
        return bool(self.sock.recv(1, socket.MSG_PEEK))


@dataclass(slots=True)
class Try:
    """A request sent to a replica, its answer awaited."""

    replica: Replica
    reused: bool  # on a connection kept alive from an earlier request
    sent: float  # time.monotonic()


@dataclass
class Upstream:
    """A replica's answer, ready to be passed back: its body whole in ``body``, or, when it
    is large or of unknown length, in ``stream`` (to be iterated or closed once)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: Replica
    length: int | None = None  # the Content-Length the client gets, when not len(body)
    stream: BodyStream | None = None

    def close(self) -> None:
        """Drop the answer unread (its connection goes)."""
        if self.stream is not None:
            self.stream.close()


class Forwarder:
    """Sends a routed GET or HEAD to the first candidate replica that answers (threads path)."""

    def __init__(self, settings: Settings, router: Router) -> None:
        self.settings = settings
        self.router = router
        self._local = threading.local()

    def forward(self, target: str, headers: Iterable[tuple[str, str]], key: int, path: str,
                method: str = "GET") -> Upstream:
        """GET (or HEAD) ``target`` (path and query as received) with ``headers`` (already
        the forwarded set) from the first replica that answers; ``path`` (decoded) names it
        in errors."""
        fields = list(headers)
        walk = self.router.walk(key)
        if walk.empty and self.router.waiting_for_replicas():
            deadline = time.monotonic() + self.settings.upstream_timeout
            while self.router.waiting_for_replicas() and time.monotonic() < deadline:
                time.sleep(STARTING_POLL_SECONDS)
            walk = self.router.walk(key)
        flight: dict[ReplicaHTTPConnection, Try] = {}  # two at once when hedged
        try:
            return self._tries(walk, walk.start(), method, target, fields, path, flight)
        finally:
            for conn in flight:  # a hedge's loser, or a try left by an exception: closed
                conn.close()
            walk.abandon()  # (a bug, an exit): its slots given back; no-op once ended

    def _tries(self, walk: RingWalk, step: Step, method: str, target: str,
               fields: list[tuple[str, str]], path: str,
               flight: dict[ReplicaHTTPConnection, Try]) -> Upstream:
        while step is TRY or step is RESEND or step is WAIT:
            if step is not WAIT and not walk.slotted:  # at its limit: wait for a slot
                assert not flight  # (a queue wait comes before any try is in flight)
                woken = threading.Event()
                waiter = walk.queue(woken.set)
                if waiter is None:
                    step = GIVE_UP  # the queue is full
                else:
                    woken.wait(self.router.limits.left(waiter))
                    step = walk.waited()
                continue
            replica = walk.replica
            assert replica is not None
            if step is not WAIT:
                conn = self._connection(replica.address or "", fresh=step is RESEND)
                reused = conn.sock is not None  # kept alive from an earlier request
                try:
                    self._send(conn, method, target, fields)
                except UpstreamError as exc:
                    step = self._failed(walk, replica, exc, reused)
                    continue
                flight[conn] = Try(replica, reused, time.monotonic())
            first = self._first_answer(walk, flight)
            if first is None:  # no answer within the hedge deadline: the next one too
                step = TRY if walk.hedge() is not None else WAIT
                continue
            if isinstance(first, Step):  # a try failed: the walk said what next
                step = first
                continue
            tried = flight.pop(first)
            try:
                upstream = self._answer(first, tried.replica)
            except UpstreamError as exc:
                step = self._failed(walk, tried.replica, exc, tried.reused)
                continue
            walk.told(ANSWERED, status=upstream.status, replica=tried.replica)
            error = replica_error(upstream.status,
                                  header_value(upstream.headers, "Content-Type"),
                                  tried.replica.hostname, path)
            if error is not None:
                upstream.close()
                raise error
            return upstream
        assert walk.error is not None
        raise walk.error

    @staticmethod
    def _failed(walk: RingWalk, replica: Replica, exc: UpstreamError, reused: bool) -> Step:
        step = walk.told(Outcome.of(exc, reused), exc, replica=replica)
        if step is not RESEND:  # a kept-alive connection closed: not worth a word
            log.warning("replica %s: %s", replica.hostname, exc)
        return step

    def _first_answer(self, walk: RingWalk, flight: dict[ReplicaHTTPConnection, Try]
                      ) -> ReplicaHTTPConnection | Step | None:
        """Waits on the tries in ``flight`` (one, or two when hedged) for the first byte of an
        answer: that connection; or None when the one try in flight had none within the
        walk's hedge deadline; or, when a try got no answer (``LB_UPSTREAM_TIMEOUT``, a close
        before any byte: told to the walk and dropped), the walk's next step."""
        timeout = self.settings.upstream_timeout
        while True:
            after = walk.hedge_after() if len(flight) == 1 else 0.0
            due = min(t.sent + timeout for t in flight.values())
            hedge_at = next(iter(flight.values())).sent + after if after else math.inf
            poller = select.poll()
            by_fd = {}
            for conn in flight:
                poller.register(conn.sock, select.POLLIN)
                by_fd[conn.sock.fileno()] = conn
            wait = max(0.0, min(due, hedge_at) - time.monotonic())
            ready = [by_fd[fd] for fd, _ in poller.poll(math.ceil(wait * 1000))]
            now = time.monotonic()
            for conn, tried in flight.items():
                error = None
                if conn in ready:
                    try:
                        if conn.answer_began():
                            return conn
                        error = UpstreamError("the connection closed before an answer",
                                              before_reply=True)
                    except OSError as exc:
                        if host_gone(exc):  # unreachable: no resend on a new connection
                            error = UpstreamError("the replica's host stopped acknowledging: "
                                                  f"{exc!r}")
                        else:
                            error = UpstreamError("the connection closed before an answer: "
                                                  f"{exc!r}", before_reply=True)
                elif tried.sent + timeout <= now:
                    error = UpstreamError(f"no answer within {timeout:g}s "
                                          "(LB_UPSTREAM_TIMEOUT)", timed_out=True)
                if error is not None:
                    del flight[conn]
                    conn.close()
                    step = self._failed(walk, tried.replica, error, tried.reused)
                    if step is not WAIT:
                        return step
                    break  # the other goes on: wait for it
            else:
                if after and now >= hedge_at:
                    return None

    def _connection(self, address: str, fresh: bool) -> ReplicaHTTPConnection:
        """This thread's keep-alive connection to ``address``: a new one when ``fresh`` (the
        walk's RESEND) or when the one it has may not carry another request."""
        conns: dict[str, ReplicaHTTPConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(address)
        if conn is not None and (fresh or not conn.ready()):
            conn.close()
            conn = None
        if conn is None:
            parts = urlsplit(address)
            conn = conns[address] = ReplicaHTTPConnection(
                parts.hostname or "", parts.port, self.settings.connect_timeout,
                self.settings.upstream_timeout)
        return conn

    def _send(self, conn: ReplicaHTTPConnection, method: str, target: str,
              headers: list[tuple[str, str]]) -> None:
        """The request out on ``conn`` (connected first if it is not); every failure an
        ``UpstreamError`` and the connection closed."""
        conn.reusable = False
        try:
            if conn.sock is None:
                conn.connect()
        except OSError as exc:
            conn.close()
            raise UpstreamError(f"cannot connect: {exc}") from exc
        try:
            conn.send_request(method, target, headers)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if host_gone(exc):  # before the TimeoutError of our own wait: it is one too
                raise UpstreamError(f"the replica's host stopped acknowledging: {exc!r}") from exc
            if isinstance(exc, TimeoutError):  # the send itself stalled (send_timeout)
                raise UpstreamError(f"no answer within {self.settings.upstream_timeout:g}s "
                                    "(LB_UPSTREAM_TIMEOUT)", timed_out=True) from exc
            raise UpstreamError(f"the connection closed before an answer: {exc!r}",
                                before_reply=True) from exc

    def _answer(self, conn: ReplicaHTTPConnection, replica: Replica) -> Upstream:
        """The answer on ``conn``, whose first byte is there; every failure an
        ``UpstreamError`` that says how far the answer had come, and the connection closed."""
        settings = self.settings
        name = replica.hostname
        conn.sock.settimeout(settings.read_timeout)
        reply: ReplicaResponse | None = None
        try:
            reply = conn.getresponse()  # type: ignore[assignment]
            assert isinstance(reply, ReplicaResponse)
            return self._take(conn, reply, replica)
        except TimeoutError as exc:
            drop(conn, reply)
            raise UpstreamError(f"the answer stalled for {settings.read_timeout:g}s "
                                "(LB_READ_TIMEOUT)", began=True, timed_out=True) from exc
        except BrokenAnswer as exc:  # the protocol broken, or a bound: not sent again
            drop(conn, reply)
            raise UpstreamError(f"broken answer from {name}: {exc!r}", began=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            # Cut by a close or a reset (a replica that crashed): nothing of it went to the
            # client, so the next replica may have the request (a GET: RFC 9110 9.2.2).
            drop(conn, reply)
            raise UpstreamError(f"answer from {name} cut short: {exc!r}") from exc

    def _take(self, conn: ReplicaHTTPConnection, reply: ReplicaResponse,
              replica: Replica) -> Upstream:
        """The answer whose head is in: its body whole when small, else a stream."""
        status = reply.status
        headers = reply_headers(reply.getheaders())
        limit = self.settings.max_reply
        if reply.length == 0:  # bodiless, or an answer to HEAD
            reply.read()
            settle(conn, reply)
            length = None if bodiless(status) else reply.declared_length
            return Upstream(status, headers, b"", replica, length=length)
        if limit and reply.length is not None and reply.length > limit:
            raise BrokenAnswer(f"an answer of {reply.length} bytes (LB_MAX_REPLY={limit})")
        if reply.length is not None and reply.length <= STREAM_ABOVE:
            body = reply.read()
            settle(conn, reply)
            return Upstream(status, headers, body, replica)
        parts: list[bytes] = []
        size = 0
        while size <= STREAM_ABOVE:
            data = reply.piece(STREAM_PIECE)
            if not data:
                break
            parts.append(data)
            size += len(data)
            if limit and size > limit:
                raise BrokenAnswer(f"an answer over LB_MAX_REPLY={limit} bytes")
        if reply.isclosed():
            settle(conn, reply)
            return Upstream(status, headers, b"".join(parts), replica)
        length = None if reply.chunked else reply.declared_length  # chunked: it wins
        return Upstream(status, headers, b"", replica, length=length,
                        stream=BodyStream(conn, reply, parts, replica.hostname, self.settings))


def settle(conn: ReplicaHTTPConnection, reply: ReplicaResponse) -> None:
    """``reply`` is read to its end: its connection stays only if it is clean."""
    if reply.reusable and conn.sock is not None:
        conn.reusable = True
    else:
        conn.close()


def drop(conn: ReplicaHTTPConnection, reply: ReplicaResponse | None) -> None:
    """An answer not read to its end: its connection goes."""
    if reply is not None:
        reply.close()
    conn.close()


class BodyStream:
    """A large answer's body, a piece at a time as the client takes it (a WSGI iterable).

    A failure once the head went out cuts the client's connection (``ReplyCut``); closed
    before its end (the client left, or nobody iterated it), it closes the replica's
    connection; read to its end, the connection is kept if it is clean.
    """

    def __init__(self, conn: ReplicaHTTPConnection, reply: ReplicaResponse, parts: list[bytes],
                 name: str, settings: Settings) -> None:
        self.conn = conn
        self.reply = reply
        self.parts = parts  # read already (the part that told it is large), in order
        self.name = name
        self.limit = settings.max_reply
        self.read_timeout = settings.read_timeout
        self.size = sum(len(p) for p in parts)
        self.done = False

    def __iter__(self) -> BodyStream:
        return self

    def __next__(self) -> bytes:
        if self.parts:
            return self.parts.pop(0)
        if self.done:
            raise StopIteration
        try:
            data = self.reply.piece(STREAM_PIECE)
        except TimeoutError as exc:
            self.close()
            raise ReplyCut(f"replica {self.name} stalled mid-answer for {self.read_timeout:g}s "
                           "(LB_READ_TIMEOUT)") from exc
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ReplyCut(f"replica {self.name} broke off its answer: {exc!r}") from exc
        if not data:
            self.done = True
            settle(self.conn, self.reply)
            raise StopIteration
        self.size += len(data)
        if self.limit and self.size > self.limit:
            self.close()
            raise ReplyCut(f"replica {self.name}'s answer went over LB_MAX_REPLY={self.limit}")
        return data

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.parts.clear()
            drop(self.conn, self.reply)
