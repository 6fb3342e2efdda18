"""The event-driven path's HTTP/1.1 server: one ``ClientConnection`` per client connection.

Requests are parsed by httptools (llhttp, strict) as the bytes arrive, so a client that sends
slowly costs a parser and a few objects, never a thread. Each complete request goes one of two
ways:

- **a routed GET** (``lb.routing.is_routed``, no body): straight to ``AsyncForwarder`` and back,
  without Flask; the reply's metrics, access log line and envelope come from the same code the
  Flask app uses;
- **everything else** (``/rep``, ``/add``, ``/rm``, ``/_lb/...``, other methods, a GET with a
  body): the Flask app, through a2wsgi in a thread pool, once its body is in.

What a request's header fields mean (the lookup by name, the coding, the header lines for the
replica) is worked out once per distinct set on a connection (``RequestHead``): a keep-alive
client sends the same fields with every request. A ``GET`` that arrives whole in one read, with
a plain request line and the very header bytes of one the parser read before on the connection,
is taken without the parser (``KnownHead``): the parser would find what it found then.

Limits are gunicorn's own settings (request line, header count and size, as on the threads
path) plus ``LB_MAX_BODY`` for bodies; each is answered in the contract's envelope. Deadlines
are kept by one sweep per worker (``Server.sweep``), not a timer per request: a connection may
sit idle between requests for the keep-alive time, and a request must be complete, headers and
body together, within ``LB_CLIENT_TIMEOUT`` of its first byte; a reply the client does not take
within ``LB_CLIENT_TIMEOUT`` ends the connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import httptools
from werkzeug.exceptions import RequestTimeout

from lb.aio.upstream import AsyncForwarder, ReplicaProtocol, Reply, header_lines, hold
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
    forwarded_fields,
    forwarded_host,
    is_routed,
    origin_target,
    query_value,
    reason_phrase,
    registry_trouble,
    request_key,
    transfer_coding_error,
)
from lb.settings import Settings

log = logging.getLogger("lb.aio")

ASGIApp = Callable[..., Awaitable[None]]  # (scope, receive, send): a2wsgi's WSGIMiddleware

IDLE, HEAD, BODY = "idle", "head", "body"  # where the parser is: between requests, or in one
PIPELINE_DEPTH = 8  # parsed requests waiting on one connection before it stops reading
WRITE_HIGH_WATER = 256 * 1024  # reply bytes buffered for a slow reader before the clock runs
SLOW_HEADERS = ("slow client %s: request headers not complete within %gs (LB_CLIENT_TIMEOUT), "
                "connection dropped")
# Header names as the Flask app writes them (a2wsgi hands them over lower-cased).
CANONICAL = {n.lower(): n for n in (
    "Content-Type", "Content-Length", "X-Request-ID", "X-Served-By", "Allow",
    "WWW-Authenticate", "Cache-Control", "Location", "ETag", "Last-Modified", "Vary",
    "Content-Disposition", "Content-Encoding", "Accept-Ranges")}


class _Stop(Exception):
    """The connection takes no further request (it ends after the current reply)."""


class Refused(Exception):
    """A request the server answers itself, before any app: a limit, a malformed message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    request_line: int  # gunicorn's limit_request_line
    fields: int  # limit_request_fields
    field_size: int  # limit_request_field_size
    body: int  # LB_MAX_BODY

    @property
    def head(self) -> int:
        """The most bytes a request's head may take before its headers are complete."""
        return self.request_line + self.fields * (self.field_size + 2) + 4


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What a request's header fields mean (``read_request_head``)."""

    fields: list[tuple[str, str]]  # as received but names with "_" (dropped, as gunicorn)
    lookup: dict[str, str]  # lower-case name -> value (repeated ones joined, as in WSGI)
    refusal: ApiError | None  # a coding refused once the body is in (501)
    forwarded: bytes  # the header lines for a replica but X-Request-ID (forwarded_fields)
    expects_body: bool  # chunked, or a Content-Length over 0
    announced: int | None  # the Content-Length
    continue_expected: bool  # Expect: 100-continue


NO_HEAD = RequestHead([], {}, None, b"", False, None, False)

# A request line the parser would take as it is: GET, an origin-form target of characters
# llhttp accepts in any mode (RFC 3986's unreserved, sub-delims, ":@/?%"), HTTP/1.1.
PLAIN_GET = re.compile(rb"GET (/[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*) HTTP/1\.1")


@dataclass(frozen=True, slots=True)
class KnownHead:
    """The header bytes of a whole ``GET`` the parser read on a connection, and what they
    meant: a keep-alive request with no body (``ClientConnection._learn``)."""

    fields: bytes  # everything after the request line, the blank line included
    head: RequestHead


def read_request_head(headers: list[tuple[bytes, bytes]], client: str,
                      local: tuple[str, int] | None) -> RequestHead:
    """``headers`` as parsed (undecoded, in order), on a connection from ``client`` to
    ``local``. Raises ``Refused`` for a body that cannot be framed."""
    fields: list[tuple[str, str]] = []
    lookup: dict[str, str] = {}
    refusal: ApiError | None = None
    for name, value in headers:
        if b"_" in name:  # as gunicorn: dropped, so X_Forwarded_For never poses as a dash
            continue
        key, text = name.decode("latin-1"), value.decode("latin-1")
        lower = key.lower()
        if lower == "transfer-encoding":
            refusal = transfer_coding_error(text)
            if refusal is not None and refusal.status == 400:  # the body cannot be framed
                raise Refused(400, f"Bad Request: {refusal.message}")
        if lower == "host" and "host" in lookup:
            raise Refused(400, "Bad Request: more than one Host field (RFC 9112 section 3.2)")
        fields.append((key, text))
        known = lookup.get(lower)
        lookup[lower] = text if known is None else f"{known},{text}"
    length = lookup.get("content-length")
    announced = None if length is None else int(length)  # llhttp let only digits through
    host = forwarded_host(lookup.get("host"), local)
    return RequestHead(fields, lookup, refusal,
                       header_lines(forwarded_fields(fields, client, host)),
                       "transfer-encoding" in lookup or bool(announced), announced,
                       lookup.get("expect", "").lower() == "100-continue")


class Request:
    """One request as parsed, with the body as far as it is kept.

    The class holds each field's value until the request has its own: a request sets few of
    them, and every one set costs on the path every routed request takes.
    """

    url = b""
    method = ""
    version = "1.1"
    head = NO_HEAD  # what the header fields mean, once they are all in
    keep_alive = True
    expects_body = False
    body: bytes | bytearray = b""  # a bytearray of its own once some of the body came
    body_too_large = False  # more than LB_MAX_BODY came (or was announced)
    body_error: Exception | None = None  # the app is told this when it reads the body
    target: str | None = None  # origin form, as received (None: not routable)
    refusal: ApiError | None = None  # answered in its turn, the connection kept (501)
    refused: tuple[int, str] | None = None  # a refusal in its turn: then the connection ends
    path = ""  # decoded, as the Flask app matches it
    routed = False  # a GET for the replicas: served without Flask

    def __init__(self, began: float = 0.0) -> None:
        self.began = began  # perf_counter at the first byte
        self.headers: list[tuple[bytes, bytes]] = []  # as parsed


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


def check_request_line(request: Request, version: str, seen: bytes) -> None:
    """Refuse what llhttp lets through but RFC 9112 does not: a request line that is not
    ``method SP target SP HTTP/x.y`` with single spaces (``seen``: the bytes read of the head),
    a version other than 1.x, a fragment in the target, a method RFC 9110 does not define."""
    url = request.url
    method = request.method.encode("latin-1")
    if version == "0.9":  # llhttp's word for "no version" and for "HTTP/0.9"
        if b"%s %s HTTP/0.9\r\n" % (method, url) in seen:
            raise Refused(505, "HTTP Version Not Supported: HTTP/0.9")
        raise Refused(400, "Bad Request: Invalid Request Line: no HTTP version")
    if b"%s %s HTTP/%s\r\n" % (method, url, version.encode()) not in seen:
        raise Refused(400, "Bad Request: Invalid Request Line: not 'method target version' "
                           "with single spaces")
    if not version.startswith("1."):
        raise Refused(505, f"HTTP Version Not Supported: HTTP/{version}")
    if b"#" in url:
        raise Refused(400, "Bad Request: Invalid Request Line: a fragment in the target")


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = new_parser(self)
        self.client = ""
        self.client_port = 0
        self.local: tuple[str, int] | None = None
        self.phase = IDLE
        self.request_deadline = 0.0  # the request being received must be complete by then
        self.idle_deadline = 0.0  # with nothing to do, the connection ends then
        self.write_deadline: float | None = None  # set while the client does not read
        self.request = Request()
        self.head_bytes = 0
        self.queue: deque[Request] = deque()
        self.handling = False
        self.accepting = True  # False once a request says it is the last one
        self.closed = False
        self.reading = True
        self.routing: tuple[Request, str] | None = None  # the routed GET in flight, its id
        # The last distinct header fields and what they mean (the next request likely repeats
        # them): read_request_head depends on nothing else but the connection's two ends.
        self.seen: tuple[list[tuple[bytes, bytes]] | None, RequestHead] = (None, NO_HEAD)
        self.known: KnownHead | None = None  # a plain GET's header bytes, as last parsed
        self.head_data = b""  # the reads holding the request line being parsed
        self.line_end = 0  # the line is within that many bytes of head_data (or is too long)
        self.refusing = False  # a refusal is answered in its turn: nothing more is read
        self.eof = False  # the client shut its side after a whole request: answer, then end
        self.relay: Relay | None = None  # a streamed answer on its way to the client

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
        self.server.connections.add(self)
        self.idle_deadline = self.loop.time() + self.server.keepalive

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.lost()
        if self.relay is not None:  # gone mid-answer: the rest is never read
            relay, self.relay = self.relay, None
            relay.stream.abandon()

    def eof_received(self) -> bool | None:
        """The client shut its side. Requests it sent whole are still answered (RFC 9112
        section 9.6: a half-close is no cancellation), then the connection ends; half a
        request is dropped with it."""
        if self.phase == IDLE and (self.handling or self.queue):
            self.eof = True
            self.accepting = False
            return True  # keep the way back open
        return None

    def data_received(self, data: bytes) -> None:
        if self.closed or self.refusing:
            return
        between = self.phase == IDLE  # the parser is between two requests
        if self.phase != HEAD:
            self.head_data = data  # a request line that begins in this read is in it
        elif len(self.head_data) < self.line_end:  # the line began in an earlier read
            self.head_data += data
        if between and self.known is not None and self._take_known(data, self.known):
            return
        if self.phase != BODY:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # "Connection: upgrade": the request itself is complete and served; nothing is
            # upgraded (Upgrade is hop-by-hop), so the connection ends after the reply.
            self.request.keep_alive = False
            self._last()
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
            if self.phase == HEAD and self.head_bytes > self.server.limits.head:
                self.refuse(431, "Request Header Fields Too Large: request head too large")
            elif between and self.phase == IDLE and not self.closed:
                self._learn(data)

    # -- the known GET: a request the parser read before, again ---------------------------------
    def _learn(self, data: bytes) -> None:
        """``data`` was one whole request, just parsed: if it is a plain keep-alive ``GET``
        with no body, its header bytes are what the next ones likely repeat."""
        request = self.request
        end = data.find(b"\r\n")
        if (request.method != "GET" or request.version != "1.1" or not request.keep_alive
                or request.expects_body or data.find(b"\r\n\r\n") != len(data) - 4):
            return  # not one whole GET alone (pipelined, or a body follows)
        line = PLAIN_GET.fullmatch(data, 0, end)
        if line is not None and line.group(1) == request.url:
            self.known = KnownHead(data[end + 2:], request.head)

    def _take_known(self, data: bytes, known: KnownHead) -> bool:
        """Serve ``data`` as the parser would, if it is a whole plain ``GET`` whose header
        bytes are ``known``'s; False (nothing done) for anything else."""
        end = data.find(b"\r\n")
        if end < 0 or data[end + 2:] != known.fields or not self.accepting:
            return False
        line = PLAIN_GET.fullmatch(data, 0, end)
        if line is None or end > self.server.limits.request_line:
            return False  # the parser says what is wrong (or what it makes of the line)
        request = self.request = Request(began=time.perf_counter())
        request.url, request.method, request.head = line.group(1), "GET", known.head
        _aim(request)
        self.phase = BODY
        self._complete()
        return True

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
        elif not self.handling and not self.closed:
            self._go_on()

    # -- httptools callbacks (request parsing) ---------------------------------------------------
    def on_message_begin(self) -> None:
        if not self.accepting:
            raise _Stop()
        self.request = Request(began=time.perf_counter())
        self.phase = HEAD
        # Kept for check_request_line: no more than the longest line past this read (a slow
        # client's head is not copied over and over).
        self.line_end = len(self.head_data) + self.server.limits.request_line + 4
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
        check_request_line(request, version, self.head_data)
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
        seen, head = self.seen
        if request.headers != seen:
            head = read_request_head(request.headers, self.client, self.local)
            self.seen = (list(request.headers), head)  # a copy: trailers append to it
        request.head = head
        request.expects_body = head.expects_body
        _aim(request)
        if not request.keep_alive:
            self.accepting = False
        self.phase = BODY
        if request.expects_body:
            if head.announced is not None and head.announced > self.server.limits.body:
                # Announced too large: the app answers 413 without reading it, and the
                # connection ends (what is left of the body would be read as a request).
                request.body_too_large = True
                request.keep_alive = False
                self._last()
                self._complete()
            elif head.continue_expected:
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
            self._last()
            self._complete()

    # -- requests in order -----------------------------------------------------------------------
    def _complete(self) -> None:
        if self.phase != BODY:
            return  # already handed over (a body cut at the limit)
        self.phase = IDLE
        self.head_bytes = 0
        if not self.handling and not self.queue and self.write_deadline is None:
            self._start(self.request)  # the usual case: nothing waits before it
            return
        self.queue.append(self.request)
        if len(self.queue) >= PIPELINE_DEPTH:
            self._pause()
        if not self.handling and self.write_deadline is None:
            self._next()

    on_message_complete = _complete

    def _next(self) -> None:
        if self.queue:
            self._start(self.queue.popleft())

    def _start(self, request: Request) -> None:
        self.handling = True
        if request.refused is not None:
            self._send_refusal(*request.refused)
        elif request.routed and request.head.refusal is None and request.refusal is None:
            self._route(request)  # callbacks, no task: the hot path
        else:
            hold(self.server.tasks, self.loop.create_task(self._handle(request)))

    async def _handle(self, request: Request) -> None:
        try:
            refusal = request.refusal or request.head.refusal
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
        self.handling = False
        if self.closed:
            return
        if not request.keep_alive or self.server.closing or (self.eof and not self.queue):
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
        if not self.reading and self.accepting:
            self._resume()

    # -- the routed GET --------------------------------------------------------------------------
    def _route(self, request: Request) -> None:
        """Send ``request`` on its way to a replica; ``_routed`` writes the outcome."""
        target = request.target
        assert target is not None  # routed requests have one
        try:
            head = request.head
            lookup = head.lookup
            rid = new_request_id(lookup.get("x-request-id"))
            key = request_key(self.server.settings.hash_key, lambda n: lookup.get(n.lower()),
                              lambda n: query_value(target.partition("?")[2], n), self.client)
        except Exception:  # noqa: BLE001 - a bug: _failed logs it with its traceback
            self._failed(request)
            return
        self.routing = (request, rid)
        self.server.forwarder.start(target.encode("latin-1"),
                                    b"%sX-Request-ID: %s\r\n" % (head.forwarded, rid.encode()),
                                    key, request.path, self._routed,
                                    b"GET" if request.method == "GET" else b"HEAD")

    def _routed(self, replica: Replica | None, reply: Reply | None,
                error: BaseException | None) -> None:
        """The outcome of ``_route``: the replica's answer passed back, or the envelope."""
        assert self.routing is not None
        request, rid = self.routing
        target = request.target or ""
        try:
            if replica is None or reply is None:
                if isinstance(error, ApiError):
                    self._write_error(request, error.status, error.message, "route", rid,
                                      target)
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
        if relay is None or self.closed or not data:
            return
        assert self.transport is not None
        self.transport.write(_chunk(data) if relay.chunked else data)

    def end(self) -> None:
        relay, self.relay = self.relay, None
        if relay is None:
            return
        if relay.chunked and not self.closed:
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
        self.handling = False
        if self.transport is not None and not self.closed:
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
                   for name, value in request.head.fields
                   if name.lower() not in ("content-length", "transfer-encoding")]
        if request.expects_body:
            # The body is all here (or cut one byte past LB_MAX_BODY): the app reads exactly
            # that. An announced size over the limit is passed on for the app's 413.
            announced = request.head.lookup.get("content-length")
            size = str(len(request.body))
            if (request.body_too_large or request.body_error) and announced:
                size = announced
            elif request.body_error:
                size = "1"  # chunked and cut short: the app must try to read to find out
            headers.append((b"content-length", size.encode()))
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.version, "method": request.method, "scheme": "http",
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
        if self.closed:
            return
        assert self.transport is not None
        server = self.server
        close = not request.keep_alive or server.closing or (self.eof and not self.queue)
        self.transport.write(b"".join((
            server.reply_start(request.version, status),
            b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n",
            head, b"" if request.method == "HEAD" else body)))

    def _write_error(self, request: Request, status: int, message: str, endpoint: str,
                     rid: str | None, target: str | None, extra: str = "") -> None:
        rid = rid or new_request_id(request.head.lookup.get("x-request-id"))
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
        self.refusing = True  # nothing more is read: the parser's state is unknown
        self.accepting = False
        self._pause()
        if self.handling or self.queue:
            refusal = Request()
            refusal.refused = (status, message)
            self.queue.append(refusal)
            return
        self._send_refusal(status, message)

    def _send_refusal(self, status: int, message: str) -> None:
        if self.transport is not None and not self.closed:
            body = error_body(message)
            self.transport.write(
                f"HTTP/1.1 {status} {reason_phrase(status)}\r\nConnection: close\r\n"
                f"Content-Type: {JSON_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode("latin-1") + body)
            self.transport.close()
        self.closed = True

    # -- deadlines and flow --------------------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        if self.closed or self.transport is None:
            return
        if self.write_deadline is not None and now > self.write_deadline:
            log.warning("slow client %s: reply not taken within %gs (LB_CLIENT_TIMEOUT), "
                        "connection dropped", self.client, self.server.settings.client_timeout)
            self.transport.abort()
            return
        if self.phase == IDLE:
            if not self.handling and not self.queue and now > self.idle_deadline:
                self.transport.close()  # the keep-alive time is over
        elif now <= self.request_deadline:
            return
        elif self.phase == HEAD:
            log.warning(SLOW_HEADERS, self.client or "?", self.server.settings.client_timeout)
            self.transport.abort()
        elif self.phase == BODY:
            # The headers came, the body did not: the app answers 408 as it would for a
            # blocking read that timed out, and the connection ends.
            request = self.request
            request.body_error = RequestTimeout(
                "The request body did not arrive within LB_CLIENT_TIMEOUT")
            request.keep_alive = False
            self._last()
            self._complete()

    def shut(self, graceful: bool) -> None:
        if self.closed or self.transport is None:
            return
        if not graceful:
            self.transport.abort()
        elif not self.handling and not self.queue:
            self.transport.close()

    def _last(self) -> None:
        """The current request is the connection's last: read no further."""
        self.accepting = False
        self._pause()

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self.reading = False

    def _resume(self) -> None:
        if not self.reading and self.transport is not None and not self.closed:
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


def _aim(request: Request) -> None:
    """Where ``request`` goes, from its URL, method and whether a body comes: the target to
    forward, the path the app matches, and whether the replicas answer it."""
    request.target = target = origin_target(request.url.decode("latin-1"))
    if target is not None:
        request.path = decode_path(target.partition("?")[0])
        request.routed = is_routed(request.method, request.path)  # a GET body is not forwarded


def _log_path(target: str) -> str:
    """The path as the access log writes it (werkzeug's ``full_path``: decoded path, query)."""
    path, sep, query = target.partition("?")
    return decode_path(path) + (f"?{query}" if sep and query else "")


def _nothing() -> None:
    pass
