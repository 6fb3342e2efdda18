"""The event-driven path's HTTP/1.1 server: one ``ClientConnection`` per client connection.

Requests are parsed by httptools (llhttp, strict) as the bytes arrive, so a client that sends
slowly costs a parser and a few objects, never a thread. Each complete request goes one of two
ways:

- **a routed GET or HEAD** (``lb.routing.is_routed``; a body, if one came, is not forwarded):
  straight to ``AsyncForwarder`` and back, without Flask; the reply's metrics, access log line
  and envelope come from the same code the Flask app uses;
- **everything else** (``/rep``, ``/add``, ``/rm``, ``/_lb/...``, other methods): the Flask
  app, through a2wsgi in a thread pool, once its body is in.

What a request's header fields mean (the lookup by name, the coding, the header lines for the
replica) is worked out once per distinct set on a connection (``lb.aio.messages.RequestFields``):
a keep-alive client sends the same fields with every request. A ``GET`` that arrives whole in
one read with the very header bytes of one the parser read before on the connection is taken
without the parser (``lb.aio.shortcuts.KnownRequest``).

The connection's states are in ``ClientConnection``'s docstring; its reading side is a
``Phase``, whose every change is one of ``NEXT``.

Limits are gunicorn's own settings (request line, header count and size, as on the threads
path) plus ``LB_MAX_BODY`` for bodies; each is answered in the contract's envelope. Deadlines
are kept by one sweep per worker (``Server.sweep``), not a timer per request: a connection may
sit idle between requests for the keep-alive time, and a request must be complete, headers and
body together, within ``LB_CLIENT_TIMEOUT`` of its first byte; a reply the client does not take
within ``LB_CLIENT_TIMEOUT`` ends the connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import httptools
from werkzeug.exceptions import RequestTimeout

from lb.aio.messages import (
    NO_FIELDS,
    Limits,
    Refused,
    Request,
    RequestFields,
    aim,
    check_request_line,
    read_request_fields,
)
from lb.aio.shortcuts import KnownRequest
from lb.aio.upstream import AsyncForwarder, ReplicaProtocol, Reply, hold
from lb.errors import ApiError
from lb.logs import access_logged, log_access, new_request_id
from lb.ops.metrics import LoopCounts
from lb.registry import RegistryError, Replica
from lb.routing import (
    JSON_TYPE,
    KNOWN_METHODS,
    bodiless,
    decode_path,
    error_body,
    query_value,
    reason_phrase,
    registry_trouble,
    request_key,
)
from lb.settings import Settings

log = logging.getLogger("lb.aio")

ASGIApp = Callable[..., Awaitable[None]]  # (scope, receive, send): a2wsgi's WSGIMiddleware

PIPELINE_DEPTH = 8  # parsed requests waiting on one connection before it stops reading
WRITE_HIGH_WATER = 256 * 1024  # reply bytes buffered for a slow reader before the clock runs
SLOW_HEADERS = ("slow client %s: request headers not complete within %gs (LB_CLIENT_TIMEOUT), "
                "connection dropped")
# Header names as the Flask app writes them (a2wsgi hands them over lower-cased).
CANONICAL = {n.lower(): n for n in (
    "Content-Type", "Content-Length", "X-Request-ID", "X-Served-By", "Allow",
    "WWW-Authenticate", "Cache-Control", "Location", "ETag", "Last-Modified", "Vary",
    "Content-Disposition", "Content-Encoding", "Accept-Ranges", "Retry-After")}


class Phase(enum.Enum):
    """Where a client connection stands in reading requests (``ClientConnection.phase``)."""

    BETWEEN = "between requests"  # the next byte begins a request
    HEADERS = "in a head"  # a request line and header fields are coming
    BODY = "in a body"  # the head is in; a body may be coming
    LAST = "reading no more"  # the last request is in: what came whole is answered, then end
    CLOSED = "closed"

    __hash__ = object.__hash__  # by identity, in C: NEXT is looked up on every change


BETWEEN, HEADERS, BODY, LAST, CLOSED = Phase
READING = (BETWEEN, HEADERS, BODY)  # the connection takes further requests
# Every change of phase there is, and why (ClientConnection._to refuses any other):
NEXT: dict[Phase, tuple[Phase, ...]] = {
    BETWEEN: (HEADERS,  # a request's first byte
              LAST,  # the client shut its side, or asked for an upgrade; a refusal
              CLOSED),
    HEADERS: (BODY,  # the head is in (a request without a body too: it passes through)
              LAST,  # refused: malformed, over a limit
              CLOSED),
    BODY: (BETWEEN,  # the request is in; the connection is kept alive
           LAST,  # ... and it was the last (close, HTTP/1.0, over the body limit, too slow)
           CLOSED),
    LAST: (CLOSED,),
    CLOSED: (CLOSED,),  # closed again (a refusal closes, then the transport says so)
}


class _Stop(Exception):
    """The connection takes no further request (it ends after the current reply)."""


class Server:
    """What every connection of one worker shares."""

    def __init__(self, settings: Settings, limits: Limits, forwarder: AsyncForwarder,
                 app: ASGIApp, counts: LoopCounts, keepalive: float,
                 server_header: str) -> None:
        self.settings = settings
        self.limits = limits
        self.forwarder = forwarder
        self.app = app
        self.counts = counts  # the loop's: written ten times a second (LoopCounts.flush)
        self.keepalive = keepalive
        self.server_header = f"Server: {server_header}\r\n".encode("latin-1")
        self.connections: set[ClientConnection] = set()
        self.lost: Callable[[], None] = _nothing  # a connection ended (lb.aio.accept.Share)
        self.tasks: set[asyncio.Task[None]] = set()  # requests handled in a task of their own
        self.closing = False
        self.app_calls = 0  # calls of the Flask app in flight
        # Whether a reply of this server's endpoints gets an access line: the level is set
        # when the worker starts (LB_LOG_LEVEL), and asking costs three calls per request.
        self.access_lines = {endpoint: access_logged(endpoint) for endpoint in ("route", "none")}
        self._second = 0
        self._starts: dict[tuple[str, int], bytes] = {}

    def reply_start(self, version: str, status: int) -> bytes:
        """``HTTP/1.1 200 OK`` with the ``Server`` and ``Date`` headers, as bytes: a few
        distinct ones each second."""
        now = int(time.time())
        if now != self._second:
            self._second, self._starts = now, {}
        start = self._starts.get((version, status))
        if start is None:
            start = self._starts[(version, status)] = b"".join((
                f"HTTP/{version} {status} {reason_phrase(status)}\r\n".encode("latin-1"),
                self.server_header,
                f"Date: {formatdate(now, usegmt=True)}\r\n".encode("latin-1")))
        return start

    def sweep(self, now: float) -> None:
        """Drop connections past their deadline (about once a second, from the worker)."""
        for conn in list(self.connections):
            conn.check_deadline(now)

    def shut(self, graceful: bool) -> None:
        """Close what is idle; busy connections close after their reply (or at once)."""
        self.closing = True
        for conn in list(self.connections):
            conn.shut(graceful)


def new_parser(protocol: Any) -> httptools.HttpRequestParser:
    """llhttp as the server needs it: any version gets through to ``check_version`` (which
    answers 1.x as 1.1 and refuses the rest with the right status), and bytes after a last
    request reach ``on_message_begin``, which ignores them (instead of a 400 that would take
    the place of the last request's answer)."""
    parser = httptools.HttpRequestParser(protocol)
    parser.set_dangerous_leniencies(lenient_version=True, lenient_data_after_close=True)
    return parser


class ClientConnection(asyncio.Protocol):
    """One client's connection: requests read in order, answered in order, one at a time.

    Two sides, each in plain sight:

    - **reading** (``phase``, a ``Phase``; every change goes through ``_to``, checked against
      ``NEXT``): between requests, in a head, in a body, then ``LAST`` once no further request
      will be read (the last one said so, the client shut its side, a request was refused or
      over a limit), and ``CLOSED``;
    - **answering** (``answering``): the request being answered, or None. Requests read while
      one is answered wait in ``queue`` (at most ``PIPELINE_DEPTH``, then reading pauses), and
      so does a refusal, which goes out in its turn and ends the connection.

    Besides: ``reading`` mirrors the transport's own pause (a full pipeline, a refusal, the
    last request), ``write_deadline`` runs while the client does not take what it was sent,
    ``relay`` is an answer still streaming from its replica.
    """

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = new_parser(self)
        self.client = ""
        self.client_port = 0
        self.local: tuple[str, int] | None = None
        self.scheme = "http"  # https on the TLS listener: what X-Forwarded-Proto says
        self.phase = BETWEEN
        self.request_deadline = 0.0  # the request being received must be complete by then
        self.idle_deadline = 0.0  # with nothing to do, the connection ends then
        self.write_deadline: float | None = None  # set while the client does not read
        self.request = Request()  # the one being read
        self.head_bytes = 0
        self.queue: deque[Request] = deque()  # read, waiting for their turn
        self.answering: Request | None = None
        self.reading = True
        # The last distinct header fields and what they mean (the next request likely repeats
        # them): read_request_fields depends on nothing else but the connection's two ends.
        self.seen: tuple[list[tuple[bytes, bytes]] | None, RequestFields] = (None, NO_FIELDS)
        self.known: KnownRequest | None = None  # a plain GET's header bytes, as last parsed
        self.line_reads = b""  # the reads holding the request line being parsed
        self.line_end = 0  # the line is within that many bytes of line_reads (or is too long)
        self.relay: Relay | None = None  # a streamed answer on its way to the client

    def _to(self, phase: Phase) -> None:
        if phase not in NEXT[self.phase]:
            raise AssertionError(f"client connection: no way from {self.phase.name} to "
                                 f"{phase.name}")
        self.phase = phase

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client, self.client_port = str(peer[0]), int(peer[1])
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            self.local = (str(sock[0]), int(sock[1]))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.connections.add(self)
        self.idle_deadline = self.loop.time() + self.server.keepalive

    def connection_lost(self, exc: Exception | None) -> None:
        self._to(CLOSED)
        self.server.connections.discard(self)
        self.server.lost()
        if self.relay is not None:  # gone mid-answer: the rest is never read
            relay, self.relay = self.relay, None
            relay.stream.abandon()

    def eof_received(self) -> bool | None:
        """The client shut its side. Requests it sent whole are still answered (RFC 9112
        section 9.6: a half-close is no cancellation), then the connection ends; half a
        request is dropped with it."""
        if self.phase in (BETWEEN, LAST) and (self.answering or self.queue):
            if self.phase is BETWEEN:
                self._to(LAST)
            return True  # keep the way back open
        return None

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is HEADERS:
            if len(self.line_reads) < self.line_end:  # the line began in an earlier read
                self.line_reads += data
        elif phase is BETWEEN or phase is BODY:
            self.line_reads = data  # a request line that begins in this read is in it
            known = self.known
            if phase is BETWEEN and known is not None:
                request = known.again(data, self.server.limits.request_line)
                if request is not None:  # the known GET again (lb.aio.shortcuts)
                    self._hand_over(request)
                    return
        else:
            return  # LAST, CLOSED: nothing more is read
        if phase is not BODY:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # "Connection: upgrade": the request itself is complete and served; nothing is
            # upgraded (Upgrade is hop-by-hop), so the connection ends after the reply.
            self.request.keep_alive = False
            self._read_no_more()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                pass
            elif isinstance(cause, Refused):
                self.refuse(cause.status, cause.message)
            else:
                log.exception("error parsing a request", exc_info=cause)
                self.refuse(500, "Internal error while reading the request")
        except httptools.HttpParserInvalidMethodError:
            self.refuse(501, "Not Implemented: a method RFC 9110 does not define")
        except httptools.HttpParserError as exc:
            self.refuse(400, f"Bad Request: {exc}")
        else:
            if self.phase is HEADERS and self.head_bytes > self.server.limits.head:
                self.refuse(431, "Request Header Fields Too Large: request head too large")
            elif phase is BETWEEN and self.phase is BETWEEN:  # one whole request, or a few
                self.known = KnownRequest.learn(data, self.request) or self.known

    def pause_writing(self) -> None:
        """The client has a high-water mark's worth to read: a streamed answer waits, and so
        do pipelined requests (what one connection holds stays bounded)."""
        self.write_deadline = self.loop.time() + self.server.settings.client_timeout
        if self.relay is not None:
            self.relay.stream.pause()

    def resume_writing(self) -> None:
        self.write_deadline = None
        if self.relay is not None:
            self.relay.stream.resume()
        elif self.answering is None and self.phase is not CLOSED:
            self._go_on()

    # -- httptools callbacks (request parsing) ---------------------------------------------------
    def on_message_begin(self) -> None:
        if self.phase is not BETWEEN:
            raise _Stop()  # bytes after the last request: ignored
        self._to(HEADERS)
        self.request = Request(began=time.perf_counter())
        # Kept for check_request_line: no more than the longest line past this read (a slow
        # client's head is not copied over and over).
        self.line_end = len(self.line_reads) + self.server.limits.request_line + 4
        self.request_deadline = self.loop.time() + self.server.settings.client_timeout

    def on_url(self, url: bytes) -> None:
        request = self.request
        request.url += url
        if len(request.url) > self.server.limits.request_line:
            raise Refused(414, f"URI Too Long: Request Line is too large "
                               f"({len(request.url)} > {self.server.limits.request_line})")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.request.headers
        limits = self.server.limits
        if len(headers) >= limits.fields:
            raise Refused(431, "Request Header Fields Too Large: Error parsing headers: "
                               "'limit request headers fields'")
        if len(name) + len(value) + 4 > limits.field_size:  # "name: value\r\n", as gunicorn
            raise Refused(431, "Request Header Fields Too Large: Error parsing headers: "
                               "'limit request headers fields size'")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        parser = self.parser
        request.method = parser.get_method().decode("latin-1")
        version = parser.get_http_version()
        check_request_line(request, version, self.line_reads)
        request.version = "1.1" if version != "1.0" else version  # 1.x as 1.1 (RFC 9110 2.5)
        request.keep_alive = parser.should_keep_alive()
        if request.method not in KNOWN_METHODS:
            request.refusal = ApiError(501, f"Not Implemented: {request.method}")
        line = len(request.method) + len(request.url) + 10  # "M URL HTTP/1.1"
        if line > self.server.limits.request_line:
            raise Refused(414, f"URI Too Long: Request Line is too large "
                               f"({line} > {self.server.limits.request_line})")
        if not request.url.isascii():
            raise Refused(400, "Bad Request: Invalid Request Line: non-ASCII request target")
        seen, fields = self.seen
        if request.headers != seen:
            fields = read_request_fields(request.headers, self.client, self.local, self.scheme)
            self.seen = (list(request.headers), fields)  # a copy: trailers append to it
        request.fields = fields
        request.expects_body = fields.expects_body
        aim(request)
        self._to(BODY)
        if request.expects_body:
            if fields.announced is not None and fields.announced > self.server.limits.body:
                # Announced too large: the app answers 413 without reading it, and the
                # connection ends (what is left of the body would be read as a request).
                request.body_too_large = True
                request.keep_alive = False
                self._pause()
                self._complete()
            elif fields.continue_expected:
                assert self.transport is not None
                self.transport.write(f"HTTP/{request.version} 100 Continue\r\n\r\n".encode())

    def on_body(self, body: bytes) -> None:
        request = self.request
        if request.body_too_large:
            return
        kept = request.body
        if not isinstance(kept, bytearray):
            kept = request.body = bytearray()
        kept += body
        if len(kept) > self.server.limits.body:
            del kept[self.server.limits.body + 1:]  # one byte more tells the app
            request.body_too_large = True
            request.keep_alive = False
            self._pause()
            self._complete()

    # -- requests in order -----------------------------------------------------------------------
    def _complete(self) -> None:
        """The request being read is all in (or as much of it as will be read)."""
        if self.phase is not BODY:
            return  # already handed over (a body cut at the limit)
        request = self.request
        self.head_bytes = 0
        self._to(BETWEEN if request.keep_alive else LAST)
        self._hand_over(request)

    on_message_complete = _complete

    def _hand_over(self, request: Request) -> None:
        """A complete request: answered now if nothing is before it, else in its turn."""
        if self.answering is None and not self.queue and self.write_deadline is None:
            self._start(request)  # the usual case: nothing waits before it
            return
        self.queue.append(request)
        if len(self.queue) >= PIPELINE_DEPTH:
            self._pause()
        if self.answering is None and self.write_deadline is None:
            self._next()

    def _next(self) -> None:
        if self.queue:
            self._start(self.queue.popleft())

    def _start(self, request: Request) -> None:
        self.answering = request
        if request.refused is not None:
            self._send_refusal(*request.refused)
        elif request.routed and request.fields.refusal is None and request.refusal is None:
            self._route(request)  # callbacks, no task: the hot path
        else:
            hold(self.server.tasks, self.loop.create_task(self._handle(request)))

    async def _handle(self, request: Request) -> None:
        try:
            refusal = request.refusal or request.fields.refusal
            if refusal is not None:
                self._write_error(request, refusal.status, refusal.message, "none", None, None)
            else:
                await self._call_app(request)
        except Exception:
            log.exception("error handling %s %r", request.method, request.url[:200])
            self._write_error(request, 500, "Internal error", "none", None, None)
        finally:
            self._done(request)

    def _done(self, request: Request) -> None:
        self.answering = None
        if self.phase is CLOSED:
            return
        if self._ends_after(request):
            assert self.transport is not None
            self.transport.close()  # after what is buffered has gone out
            return
        if self.write_deadline is None:  # else the client has enough to read: resume_writing
            self._go_on()

    def _go_on(self) -> None:
        """The next request in line, or wait for one."""
        if self.queue:
            self._next()
            return
        self.idle_deadline = self.loop.time() + self.server.keepalive
        if not self.reading and self.phase in READING:
            self._resume()

    # -- the routed GET --------------------------------------------------------------------------
    # -- the routed GET --------------------------------------------------------------------------
    def _route(self, request: Request) -> None:
        """Send ``request`` on its way to a replica; ``_routed`` writes the outcome."""
        target = request.target
        assert target is not None  # routed requests have one
        try:
            fields = request.fields
            lookup = fields.lookup
            rid = request.rid = new_request_id(lookup.get("x-request-id"))
            key = request_key(self.server.settings.hash_key, lambda n: lookup.get(n.lower()),
                              lambda n: query_value(target.partition("?")[2], n), self.client)
        except Exception:  # noqa: BLE001 - a bug: _failed logs it with its traceback
            self._failed(request)
            return
        self.server.forwarder.start(target.encode("latin-1"),
                                    b"%sX-Request-ID: %s\r\n" % (fields.forwarded, rid.encode()),
                                    key, request.path, self._routed,
                                    b"GET" if request.method == "GET" else b"HEAD")

    def _routed(self, replica: Replica | None, reply: Reply | None,
                error: BaseException | None) -> None:
        """The outcome of ``_route``: the replica's answer passed back, or the envelope."""
        request = self.answering
        assert request is not None
        rid = request.rid
        target = request.target or ""
        try:
            if replica is None or reply is None:
                if isinstance(error, ApiError):
                    self._write_error(request, error.status, error.message, "route", rid,
                                      target, "".join(f"{n}: {v}\r\n" for n, v in error.headers))
                elif isinstance(error, RegistryError):  # no good state yet: as the app says
                    self._write_error(request, 503, registry_trouble(error), "route", rid,
                                      target)
                else:
                    raise error or AssertionError("no reply and no error")
            elif self._pass_back(request, replica, reply, rid, target):
                return  # streamed: end() or broken() finishes it
        except Exception as exc:  # noqa: BLE001 - a bug: _failed logs it with its traceback
            self._failed(request, exc)
            return
        self._done(request)

    def _pass_back(self, request: Request, replica: Replica, reply: Reply, rid: str,
                   target: str) -> bool:
        """The replica's answer on its way to the client: True when its body is streamed
        (the rest comes through ``body``, then ``end`` or ``broken``)."""
        head, status, body, stream = reply.head, reply.status, reply.body, reply.stream
        chunked = False
        if request.method == "HEAD":  # the length of the body a GET would get, if it says
            length = "" if head.length is None else f"Content-Length: {head.length}\r\n"
        elif bodiless(status):  # 1xx, 204, 304: no body and no length, whatever came
            length, body = "", b""
        elif stream is None:
            length = f"Content-Length: {len(body)}\r\n"
        elif head.length is not None:
            length = f"Content-Length: {head.length}\r\n"
        elif request.version == "1.1":
            length, chunked = "Transfer-Encoding: chunked\r\n", True
            body = _chunk(body)
        else:  # an HTTP/1.0 client: the end of the body is the end of the connection
            length = ""
            request.keep_alive = False
        tail = (f"{length}X-Served-By: {replica.hostname}\r\nX-Request-ID: {rid}\r\n\r\n"
                .encode("latin-1"))
        self._write(request, status, head.passed_back + tail, body)
        if stream is None or request.method == "HEAD":
            self._count(request, "route", status, rid, target, replica.hostname)
            return False
        self.relay = Relay(request, stream, chunked, status, rid, target, replica.hostname)
        if self.write_deadline is not None:
            stream.pause()  # the client has enough to read already
        stream.follow(self)
        return True

    # -- a streamed answer (lb.aio.upstream.Sink) ------------------------------------------------
    def body(self, data: bytes) -> None:
        relay = self.relay
        if relay is None or self.phase is CLOSED or not data:
            return
        assert self.transport is not None
        self.transport.write(_chunk(data) if relay.chunked else data)

    def end(self) -> None:
        relay, self.relay = self.relay, None
        if relay is None:
            return
        if relay.chunked and self.phase is not CLOSED:
            assert self.transport is not None
            self.transport.write(b"0\r\n\r\n")
        self._count(relay.request, "route", relay.status, relay.rid, relay.target,
                    relay.replica)
        self._done(relay.request)

    def broken(self, error: BaseException) -> None:
        relay, self.relay = self.relay, None
        if relay is None:
            return
        # The status line went out already: cutting the connection is the only way left to
        # tell the client the answer is not whole.
        log.warning("replica %s broke off its answer to %s %s (%s): the client's connection "
                    "is cut", relay.replica, relay.request.method, relay.target[:200], error)
        self._count(relay.request, "route", relay.status, relay.rid, relay.target,
                    relay.replica)
        self.answering = None
        if self.transport is not None and self.phase is not CLOSED:
            self.transport.abort()

    def _failed(self, request: Request, exc: BaseException | None = None) -> None:
        """A bug met while serving ``request``: logged with its traceback, answered 500."""
        log.error("error handling %s %r", request.method, request.url[:200],
                  exc_info=exc or True)
        self._write_error(request, 500, "Internal error", "none", None, None)
        self._done(request)

    # -- everything else: the Flask app ----------------------------------------------------------
    async def _call_app(self, request: Request) -> None:
        target = request.target
        if target is None:
            if request.method in ("OPTIONS", "CONNECT"):  # OPTIONS *, CONNECT host:port
                self._write_error(request, 405, f"Method Not Allowed: {request.method} "
                                  f"{request.url.decode('latin-1')[:200]}", "none", None, None,
                                  "Allow: GET, HEAD\r\n")
                return
            self._write_error(request, 400, "Not a request target the balancer routes "
                              "(use a path)", "none", None, None)
            return
        raw_path, _, query = target.partition("?")
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                   for name, value in request.fields.pairs
                   if name.lower() not in ("content-length", "transfer-encoding")]
        if request.expects_body:
            # The body is all here (or cut one byte past LB_MAX_BODY): the app reads exactly
            # that. An announced size over the limit is passed on for the app's 413.
            announced = request.fields.lookup.get("content-length")
            size = str(len(request.body))
            if (request.body_too_large or request.body_error) and announced:
                size = announced
            elif request.body_error:
                size = "1"  # chunked and cut short: the app must try to read to find out
            headers.append((b"content-length", size.encode()))
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.version, "method": request.method, "scheme": self.scheme,
            "path": decode_path(raw_path), "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"), "root_path": "", "headers": headers,
            "client": (self.client, self.client_port), "server": self.local,
        }
        body = bytes(request.body)
        reply: dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def receive() -> dict[str, Any]:
            if request.body_error is not None:
                raise request.body_error
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                reply["status"], reply["headers"] = message["status"], message["headers"]
            elif message["type"] == "http.response.body":
                reply["body"].append(message.get("body", b""))

        self.server.app_calls += 1
        try:
            await self.server.app(scope, receive, send)
        finally:
            self.server.app_calls -= 1
        content = b"".join(reply["body"])
        has_length = False
        head = []
        for name, value in reply["headers"]:
            lower = name.decode("latin-1")
            has_length = has_length or lower == "content-length"
            head.append(f"{CANONICAL.get(lower) or lower.title()}: "
                        f"{value.decode('latin-1')}\r\n")
        if not has_length and request.method != "HEAD":
            head.append(f"Content-Length: {len(content)}\r\n")
        head.append("\r\n")
        self._write(request, reply["status"], "".join(head).encode("latin-1"),
                    b"" if request.method == "HEAD" else content)

    # -- writing ---------------------------------------------------------------------------------
    def _write(self, request: Request, status: int, head: bytes, body: bytes) -> None:
        if self.phase is CLOSED:
            return
        assert self.transport is not None
        server = self.server
        close = self._ends_after(request)
        self.transport.write(b"".join((
            server.reply_start(request.version, status),
            b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n",
            head, b"" if request.method == "HEAD" else body)))

    def _write_error(self, request: Request, status: int, message: str, endpoint: str,
                     rid: str | None, target: str | None, extra: str = "") -> None:
        rid = rid or new_request_id(request.fields.lookup.get("x-request-id"))
        body = error_body(message)
        head = (f"Content-Type: {JSON_TYPE}\r\nContent-Length: {len(body)}\r\n{extra}"
                f"X-Request-ID: {rid}\r\n\r\n").encode("latin-1")
        self._write(request, status, head, body)
        self._count(request, endpoint, status, rid, target, None)

    def _count(self, request: Request, endpoint: str, status: int, rid: str,
               target: str | None, replica: str | None) -> None:
        """Metrics and the access line; ``target`` is a routed request's (the line writes it
        as werkzeug's ``full_path``), None for the raw URL."""
        self.server.counts.response(endpoint, status)
        if self.server.access_lines[endpoint]:  # the path is built only for a written line
            path = _log_path(target) if target else request.url.decode("latin-1")
            log_access(request.method, path, status, replica,
                       (time.perf_counter() - request.began) * 1000, rid, endpoint, self.client)

    def refuse(self, status: int, message: str) -> None:
        """Answer a request no app sees (malformed, over a limit) and end the connection:
        after the requests before it are answered, in their turn."""
        log.warning("Invalid request from ip=%s: %s", self.client, message)
        self._read_no_more()  # the parser's state is unknown
        if self.answering is not None or self.queue:
            refusal = Request()
            refusal.refused = (status, message)
            self.queue.append(refusal)
            return
        self._send_refusal(status, message)

    def _send_refusal(self, status: int, message: str) -> None:
        if self.transport is not None and self.phase is not CLOSED:
            body = error_body(message)
            self.transport.write(
                f"HTTP/1.1 {status} {reason_phrase(status)}\r\nConnection: close\r\n"
                f"Content-Type: {JSON_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode("latin-1") + body)
            self.transport.close()
        self._to(CLOSED)

    # -- deadlines and flow --------------------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        if self.phase is CLOSED or self.transport is None:
            return
        if self.write_deadline is not None and now > self.write_deadline:
            log.warning("slow client %s: reply not taken within %gs (LB_CLIENT_TIMEOUT), "
                        "connection dropped", self.client, self.server.settings.client_timeout)
            self.transport.abort()
            return
        if self.phase is BETWEEN or self.phase is LAST:
            if self.answering is None and not self.queue and now > self.idle_deadline:
                self.transport.close()  # the keep-alive time is over
        elif now <= self.request_deadline:
            return
        elif self.phase is HEADERS:
            log.warning(SLOW_HEADERS, self.client or "?", self.server.settings.client_timeout)
            self.transport.abort()
        elif self.phase is BODY:
            # The headers came, the body did not: the app answers 408 as it would for a
            # blocking read that timed out, and the connection ends.
            request = self.request
            request.body_error = RequestTimeout(
                "The request body did not arrive within LB_CLIENT_TIMEOUT")
            request.keep_alive = False
            self._pause()
            self._complete()

    def shut(self, graceful: bool) -> None:
        if self.phase is CLOSED or self.transport is None:
            return
        if not graceful:
            self.transport.abort()
        elif self.answering is None and not self.queue:
            self.transport.close()

    def _ends_after(self, request: Request) -> bool:
        """Whether the connection ends once ``request`` is answered."""
        return (not request.keep_alive or self.server.closing
                or (self.phase is LAST and not self.queue))

    def _read_no_more(self) -> None:
        """No further request is read (what came whole is still answered)."""
        if self.phase is not LAST:
            self._to(LAST)
        self._pause()

    def _pause(self) -> None:
        if self.reading and self.transport is not None and self.phase is not CLOSED:
            self.transport.pause_reading()
            self.reading = False

    def _resume(self) -> None:
        if not self.reading and self.transport is not None and self.phase is not CLOSED:
            self.transport.resume_reading()
            self.reading = True


@dataclass(slots=True)
class Relay:
    """A streamed answer on its way: what its end (or break) needs to finish the request."""

    request: Request
    stream: ReplicaProtocol
    chunked: bool  # re-framed for the client as chunked (the replica's framing was its own)
    status: int
    rid: str
    target: str
    replica: str


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def _log_path(target: str) -> str:
    """The path as the access log writes it (werkzeug's ``full_path``: decoded path, query)."""
    path, sep, query = target.partition("?")
    return decode_path(path) + (f"?{query}" if sep and query else "")


def _nothing() -> None:
    pass
