"""The threads worker (``LB_WORKER=threads``): gthread, with what gthread lacks.

**The contract's envelope on gunicorn's own errors.** A request gunicorn cannot parse, or one
over its limits (request line, header count or size, a bad chunk), never reaches Flask:
``Worker.handle_error`` picks the status and logs it, then writes an HTML page through
``gunicorn.util.write_error``. That function is the one seam for the page's shape
(``handle_error`` is its only caller), so this worker swaps it for one that writes the same
status line as JSON; status codes, logging and the access log stay gunicorn's.

**Limits on slow clients** (``LB_CLIENT_TIMEOUT``). gthread waits a few seconds for a new
connection's first bytes, but once a request has begun it reads the rest of the headers and the
body, and writes the reply, on a blocking socket with no time limit: a client that sends one
byte now and then holds one of the worker's threads for as long as it likes, and a handful of
them stall the balancer (slowloris). Two bounds, both ``LB_CLIENT_TIMEOUT`` seconds:

- the request's headers must be complete that long after a thread took the connection: the
  worker's main loop, which already expires idle keep-alive connections once a second, shuts
  down the socket of a request still in its headers (its thread then sees the end of the stream);
- no single read or write of the connection (body, reply) may wait longer: the kernel's
  ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` hold whatever gunicorn does with the socket's blocking mode.

**Stopping promptly.** The interpreter waits for every pool thread before it exits, and gunicorn
SIGKILLs a worker still there after its graceful timeout (Ctrl-C took 15 s). So no pool thread
may stay blocked on a slow client once the worker stops:

- SIGINT or SIGQUIT (quick: the worker exits at once): every connection a pool thread holds is
  shut (its headers or its body still coming, or its reply being written), and a connection
  queued for a thread before the signal is closed unread when a thread takes it;
- SIGTERM (graceful: requests in flight are finished): the connections whose headers are still
  coming are shut; the others are shut for reading, so a body still coming ends (the app
  answers 400) while replies go out; a request whose thread began reading it after the
  signal gets ``STOP_HEADERS_GRACE`` seconds for its headers, not ``LB_CLIENT_TIMEOUT``. A reply
  the client is slow to take may go on for most of gunicorn's graceful timeout
  (``lb.settings.graceful_drain``); then its connection is shut too, so that the worker exits
  by itself before the arbiter would SIGKILL it (a thread blocked on the write would keep the
  interpreter from exiting).

**``close`` anywhere in ``Connection``** ends the connection after the reply, as on the async
worker (RFC 9112 section 9.6); gunicorn looks only at a first header that is exactly ``close``.

**One request grammar for both workers.** What gunicorn lets through or answers otherwise:
``HTTP/1.x`` with x > 1 is served as HTTP/1.1 and answered ``HTTP/1.1`` (RFC 9110 section 6.2;
gunicorn echoed ``HTTP/1.2``); any other major version is a 505, not gunicorn's 400; a method
outside ``lb.routing.KNOWN_METHODS`` is a 501 (RFC 9110 section 9.1), not the app's 405; a
fragment in the target is a 400 (a client never sends one, RFC 9112 section 3.2); a transfer
coding gunicorn refuses is answered by ``lb.routing.transfer_coding_error`` (``xchunked``: 400,
chunked not being the final coding). ``request_refusal`` and ``refusal_of`` hold these rules.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

from gunicorn import util
from gunicorn.http.body import ChunkedReader
from gunicorn.http.errors import InvalidChunkSize, InvalidHTTPVersion, UnsupportedTransferCoding
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import TConn, ThreadWorker

from lb.routing import (
    KNOWN_METHODS,
    connection_options,
    error_body,
    reason_phrase,
    transfer_coding_error,
)
from lb.settings import Settings, graceful_drain
from lb.threads.forward import ReplyCut
from lb.tls import PEEK_BYTES, is_tls_listener, opens_plain_http, refuse_plain_http, server_context

STOP_HEADERS_GRACE = 2.0  # seconds for a request's headers once a graceful stop has begun


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    reason = reason_phrase(status_int)  # gunicorn sends 501 as "Bad Request"
    body = error_body(f"{reason}: {mesg}" if mesg else reason)
    head = (f"HTTP/1.1 {status_int} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


_read_into = ChunkedReader.read_into


def strict_read_into(self: ChunkedReader, unreader: Any, buf: bytearray) -> None:
    """gunicorn's chunked reader waits for a CRLF to end a chunk-size line, and would wait out
    the client's timeout on ``2\\n{}\\n0\\n\\n``: a bare LF before the first CRLF of what it
    reads (a size line, a trailer line) is refused at once, as llhttp refuses it (RFC 9112
    section 7.1: chunk lines end in CRLF)."""
    _read_into(self, unreader, buf)
    end = buf.find(b"\r\n")
    if b"\n" in (buf if end < 0 else buf[:end]):
        raise InvalidChunkSize(b"bare LF as line terminator")


def asks_to_close(headers: list[tuple[str, str]]) -> bool:
    """``close`` among the options of any ``Connection`` header (RFC 9112 section 9.6), as
    llhttp reads them for the async worker; gunicorn honours only a first ``Connection``
    header that is exactly ``close``."""
    return any(name == "CONNECTION" and "close" in connection_options(value)
               for name, value in headers)


def shut_all(conns: Iterable[Any], how: int = socket.SHUT_RDWR) -> None:
    """Shut the sockets of ``conns`` (gthread connections) for reading and writing, or as
    ``how`` says: a thread blocked on one returns at once. Called from signal handlers, so
    without the lock the main loop may hold: the collection is copied, again if it changed
    size meanwhile."""
    for _ in range(3):
        try:
            pending = list(conns)
            break
        except RuntimeError:  # changed size while copied
            continue
    else:
        return
    for conn in pending:
        try:
            conn.sock.shutdown(how)
        except OSError:
            continue  # already gone


def limit_blocking_io(sock: socket.socket, seconds: float) -> None:
    """Every blocking recv/send on ``sock`` fails (EAGAIN) after ``seconds`` without progress."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class RequestRefused(Exception):
    """A request gunicorn parsed that the balancer does not take: answered with ``status``
    before the app sees it, and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def request_refusal(req: Any) -> RequestRefused | None:
    """What a parsed request is refused with, if anything; an ``HTTP/1.x`` (x > 1) request
    becomes an HTTP/1.1 one (its answer says ``HTTP/1.1``), RFC 9110 section 6.2."""
    major, minor = req.version
    if major == 1 and minor > 1:
        req.version = (1, 1)
    if req.method not in KNOWN_METHODS:
        return RequestRefused(501, f"Method {req.method} is not implemented")
    if "#" in req.uri:
        return RequestRefused(400, "A request target has no fragment ('#' is for the client)")
    return None


def refusal_of(exc: BaseException) -> tuple[int, str] | None:
    """The status and message the balancer answers ``exc`` with where they are not
    gunicorn's: None leaves the answer to gunicorn."""
    if isinstance(exc, RequestRefused):
        return exc.status, exc.message
    if isinstance(exc, InvalidHTTPVersion) and isinstance(exc.version, tuple):
        # A well-formed version gunicorn does not serve; a malformed one stays a 400.
        major, minor = exc.version
        return 505, f"HTTP/{major}.{minor} is not supported (HTTP/1.x only)"
    if isinstance(exc, UnsupportedTransferCoding):
        error = transfer_coding_error(str(exc.hdr))
        if error is not None:
            return error.status, error.message
    return None


class CutReplyLog(logging.Filter):
    """gunicorn logs an answer that failed after its head went out ("Error handling
    request") with a traceback; a replica that broke off a streamed answer is one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ReplyCut):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "%s; the client's connection was cut", (exc,), None, None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class SlowClientLog(logging.Filter):
    """gthread logs an expired ``SO_RCVTIMEO`` as "Socket error processing request." with a
    traceback; one warning line says what happened without filling the log under a slowloris."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BlockingIOError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "slow client: no progress for %gs (LB_CLIENT_TIMEOUT), connection dropped",
                (self.seconds,), None, None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class PlainHttpRefused(Exception):
    """A plain HTTP request came to the HTTPS listener: answered already (lb.tls)."""


class TlsConnection(TConn):
    """A connection of the HTTPS listener (gunicorn's own TLS settings would make every
    listener TLS): plain HTTP is refused (lb.tls), anything else goes through the TLS
    handshake, then gthread serves the connection as any other."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any,
                 context: ssl.SSLContext) -> None:
        super().__init__(cfg, sock, client, server)
        self.sock: socket.socket = sock
        self.context = context

    def init(self) -> None:  # a pool thread, the first bytes in (gthread waited for them)
        if not self.initialized:
            if opens_plain_http(self.sock.recv(PEEK_BYTES, socket.MSG_PEEK)):
                refuse_plain_http(self.sock)
                raise PlainHttpRefused()
            self.sock = self.context.wrap_socket(self.sock, server_side=True)
        super().init()


class EnvelopeThreadWorker(ThreadWorker):
    """``gthread`` whose own error replies are ``{"message": "<Error> ...", "status": "failure"}``
    and whose clients get ``LB_CLIENT_TIMEOUT`` seconds for their headers and for each read or
    write after them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections whose thread is still reading the request's headers -> when it began.
        self.in_headers: dict[Any, float] = {}
        self.in_threads: set[Any] = set()  # every connection a pool thread holds
        self.in_headers_lock = threading.Lock()  # guards both
        self.quitting = False  # a quick stop has begun: see handle_quit
        self.stopping_at: float | None = None  # when a graceful stop began (monotonic)
        self.drained = False  # ... and graceful_drain's time is over: busy ones are shut

    def init_process(self) -> None:
        # In the worker only (after the fork): the arbiter's own copy of gunicorn stays as is.
        util.write_error = write_json_error
        ChunkedReader.read_into = strict_read_into  # type: ignore[method-assign]
        settings = Settings.from_env()
        self.client_timeout = settings.client_timeout
        self.tls = server_context(settings)  # for the HTTPS listener, if there is one
        self.tls_listeners = {id(listener) for listener in self.sockets
                              if is_tls_listener(settings, listener.getsockname())}
        self.log.error_log.addFilter(SlowClientLog(self.client_timeout))
        self.log.error_log.addFilter(CutReplyLog())
        super().init_process()

    def handle(self, conn: Any) -> Any:  # a pool thread
        with self.in_headers_lock:
            self.in_headers[conn] = time.monotonic()
            self.in_threads.add(conn)
        try:
            if self.quitting:  # queued before the signal, taken after handle_quit's sweep
                return False  # gthread closes it
            return super().handle(conn)
        finally:
            with self.in_headers_lock:
                self.in_headers.pop(conn, None)
                self.in_threads.discard(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:  # the headers are in
        with self.in_headers_lock:
            self.in_headers.pop(conn, None)
        refused = request_refusal(req)
        if refused is not None:
            raise refused  # handle() passes it to handle_error
        if asks_to_close(req.headers):
            req.must_close = True  # what gunicorn's Request.should_close() consults first
        return super().handle_request(req, conn)

    def accept(self, listener: Any) -> None:  # gthread's, with TLS for the HTTPS listener
        if self.tls is None or id(listener) not in self.tls_listeners:
            super().accept(listener)
            return
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        client_sock.setblocking(True)
        self.enqueue_req(TlsConnection(self.cfg, client_sock, client_addr,
                                       listener.getsockname(), self.tls))

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, PlainHttpRefused):
            return  # answered and closed
        if isinstance(exc, ssl.SSLError):  # a failed handshake: nothing to answer it with
            self.log.info("TLS connection not set up: %s", exc)
            return
        refusal = refusal_of(exc)
        if refusal is None:
            super().handle_error(req, client, addr, exc)
            return
        status, message = refusal
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], message)
        try:
            write_json_error(client, status, reason_phrase(status), message)
        except OSError:
            self.log.debug("Failed to send error message.")

    def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM: graceful
        if self.stopping_at is None:
            self.stopping_at = time.monotonic()
        super().handle_exit(sig, frame)
        shut_all(self.in_headers)  # nothing was asked of those requests yet
        # The others are answered but read no further: a body still coming ends here (the app
        # answers 400) instead of holding its thread for LB_CLIENT_TIMEOUT. What has arrived
        # is still read; replies go out on the write side.
        shut_all(self.in_threads, socket.SHUT_RD)

    def handle_quit(self, sig: int, frame: Any) -> None:  # SIGINT, SIGQUIT: quick
        if self.quitting:
            # Ctrl-C reaches the worker twice: SIGINT from the terminal, SIGQUIT from the
            # arbiter. The second may land inside the first handler, which goes on to exit.
            return
        # The flag first: a thread that takes a connection after the sweep below sees it.
        self.quitting = True
        shut_all(self.in_threads)
        # Not gthread's handle_quit: its tpool.shutdown() takes the pool's lock, which the
        # interrupted main thread may hold (in submit, or in a first handler's shutdown), and
        # the worker deadlocks until gunicorn's SIGKILL. At exit the interpreter stops the
        # pool's threads anyway, once each has dropped what it held (quitting, above).
        Worker.handle_quit(self, sig, frame)

    def murder_pending(self) -> None:  # the main loop, about once a second
        super().murder_pending()
        drain = graceful_drain(self.cfg.graceful_timeout)
        if self.stopping_at is not None and time.monotonic() - self.stopping_at >= drain:
            with self.in_headers_lock:
                busy = list(self.in_threads)
            if busy and not self.drained:
                self.log.warning("stopping: %d connection(s) still busy after %gs, closed",
                                 len(busy), drain)
            self.drained = True
            shut_all(busy)  # again on later rounds: a thread may take a queued one late
        allowed = self.client_timeout if self.alive else min(self.client_timeout,
                                                             STOP_HEADERS_GRACE)
        deadline = time.monotonic() - allowed
        with self.in_headers_lock:
            late = [conn for conn, began in self.in_headers.items() if began < deadline]
            for conn in late:
                del self.in_headers[conn]
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    continue  # already gone
                self.log.warning("slow client %s: request headers not complete within %gs "
                                 "(%s), connection dropped",
                                 conn.client[0] if conn.client else "?", allowed,
                                 "LB_CLIENT_TIMEOUT" if self.alive else "the worker is stopping")

    def enqueue_req(self, conn: Any) -> None:
        # Each connection once, when it first reaches a thread (keep-alive ones come back here).
        if not getattr(conn, "io_limited", False):
            limit_blocking_io(conn.sock, self.client_timeout)
            conn.io_limited = True
        super().enqueue_req(conn)
