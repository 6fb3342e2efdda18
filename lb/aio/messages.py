"""The HTTP messages as the event-driven path models them, with no I/O: ``lb.aio.server`` and
``lb.aio.upstream`` fill them from their parsers.

- A client's request: the grammar llhttp leaves to the server (``check_request_line``), the
  limits (``Limits``), what a set of header fields means (``RequestFields``, worked out once per
  distinct set on a connection), the request as it is read (``Request``) and where it goes
  (``aim``).
- A replica's answer: what its head means to the balancer (``AnswerHead``, worked out once per
  distinct head by ``lb.aio.shortcuts.AnswerHeads``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lb.errors import ApiError
from lb.routing import (
    bodiless,
    decode_path,
    forwarded_fields,
    forwarded_host,
    is_routed,
    origin_target,
    reply_headers,
    transfer_coding_error,
)


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
class RequestFields:
    """What a request's header fields mean (``read_request_fields``)."""

    pairs: list[tuple[str, str]]  # as received but names with "_" (dropped, as gunicorn)
    lookup: dict[str, str]  # lower-case name -> value (repeated ones joined, as in WSGI)
    refusal: ApiError | None  # a coding refused once the body is in (501)
    forwarded: bytes  # the header lines for a replica but X-Request-ID (forwarded_fields)
    expects_body: bool  # chunked, or a Content-Length over 0
    announced: int | None  # the Content-Length
    continue_expected: bool  # Expect: 100-continue


NO_FIELDS = RequestFields([], {}, None, b"", False, None, False)


def read_request_fields(headers: list[tuple[bytes, bytes]], client: str,
                      local: tuple[str, int] | None, scheme: str = "http") -> RequestFields:
    """``headers`` as parsed (undecoded, in order), on a connection from ``client`` to
    ``local`` speaking ``scheme`` (http, or https on the TLS listener). Raises ``Refused`` for a body that cannot be framed."""
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
    return RequestFields(fields, lookup, refusal,
                         header_lines(forwarded_fields(fields, client, host, scheme)),
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
    fields = NO_FIELDS  # what the header fields mean, once they are all in
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
    rid = ""  # the request id a routed GET went out with

    def __init__(self, began: float = 0.0) -> None:
        self.began = began  # perf_counter at the first byte
        self.headers: list[tuple[bytes, bytes]] = []  # as parsed


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


def aim(request: Request) -> None:
    """Where ``request`` goes, from its URL, method and whether a body comes: the target to
    forward, the path the app matches, and whether the replicas answer it."""
    request.target = target = origin_target(request.url.decode("latin-1"))
    if target is not None:
        request.path = decode_path(target.partition("?")[0])
        request.routed = is_routed(request.method, request.path)  # a GET body is not forwarded


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    """Header fields as lines, ready to follow a request line and Host."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")


@dataclass(frozen=True, slots=True)
class AnswerHead:
    """What the head of a replica's answer means to the balancer (see ``read_answer_head``)."""

    status: int
    keep_alive: bool
    content_type: str | None
    framed: bool  # Content-Length, chunked or a status without a body: ends without a close
    length: int | None  # the body's size when one Content-Length alone frames it
    passed_back: bytes  # the header lines the client gets (reply_headers), each ending CRLF


def read_answer_head(status: int, headers: list[tuple[bytes, bytes]],
                     keep_alive: bool) -> AnswerHead:
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
    no_body = bodiless(status)
    length = int(lengths[0]) if len(lengths) == 1 and not chunked and not no_body else None
    passed_back = b"".join([b"%s: %s\r\n" % pair for pair in reply_headers(headers)])
    return AnswerHead(status, keep_alive, content_type, no_body or chunked or bool(lengths),
                      length, passed_back)
