"""TLS termination on the balancer: the one place that knows certificates.

``LB_TLS_CERT`` (and ``LB_TLS_KEY``, else the key is in the certificate's file) turn it on;
``LB_TLS_PORT`` says where: 0 serves HTTPS on ``LB_PORT`` alone, another port serves HTTPS
there and plain HTTP stays on ``LB_PORT``. Both workers take the context from
``server_context`` and handle a connection on the TLS listener the same way:

1. look at its first bytes without reading them (``MSG_PEEK``): a TLS client opens with a
   handshake record, a plain HTTP client with a method;
2. plain HTTP is answered ``PLAIN_HTTP_REPLY`` (a 400 in the contract's envelope, in clear,
   as nginx does) and closed; anything else goes to the TLS handshake, which refuses what is
   not TLS.

``server_context`` is also the check at start (``lb-run``, the gunicorn master): a certificate
or key that is missing, unreadable, expired or not yet valid, or that do not match, is one
``TlsError`` line before anything starts.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import ssl

from lb.routing import error_body
from lb.settings import Settings, SettingsError

HANDSHAKE_RECORD = 0x16  # the first byte of every TLS connection (a ClientHello record)
PEEK_BYTES = 8

log = logging.getLogger("lb.tls")
PLAIN_HTTP_MESSAGE = "Bad Request: The plain HTTP request was sent to HTTPS port"


class TlsError(SettingsError):
    """A certificate or key the balancer cannot serve with: one line saying which and why."""


def listener_ports(settings: Settings) -> tuple[int | None, int | None]:
    """The plain HTTP port and the HTTPS port, None for the one not served."""
    if not settings.tls_cert:
        return settings.port, None
    if settings.tls_port:
        return settings.port, settings.tls_port
    return None, settings.port


def binds(settings: Settings) -> list[str]:
    """gunicorn's ``bind``: every listener, plain and TLS."""
    return [f"{settings.host}:{port}" for port in listener_ports(settings) if port]


def served_urls(settings: Settings) -> str:
    """Where the balancer answers, for the start line."""
    plain, tls = listener_ports(settings)
    urls = [f"{scheme}://{settings.host}:{port}"
            for scheme, port in (("http", plain), ("https", tls)) if port]
    return " and ".join(urls)


def is_tls_listener(settings: Settings, sockname: object) -> bool:
    """Whether a listening socket (by its ``getsockname()``) is the HTTPS one."""
    tls_port = listener_ports(settings)[1]
    return (tls_port is not None and isinstance(sockname, tuple)
            and len(sockname) >= 2 and sockname[1] == tls_port)


def server_context(settings: Settings, now: datetime.datetime | None = None
                   ) -> ssl.SSLContext | None:
    """The context for the HTTPS listener (None without ``LB_TLS_CERT``), or ``TlsError``.

    Modern defaults: Python's server context (no SSLv3, no compression, OpenSSL's secure
    cipher list) and TLS 1.2 at least.
    """
    if not settings.tls_cert:
        return None
    cert = _readable("LB_TLS_CERT", settings.tls_cert)
    key = _readable("LB_TLS_KEY", settings.tls_key) if settings.tls_key else None
    problem = validity_problem(_validity(cert), now or datetime.datetime.now(datetime.UTC))
    if problem:
        raise TlsError(f"LB_TLS_CERT {cert}: the certificate {problem}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"LB_TLS_KEY {key or cert} does not match the certificate in "
                           f"LB_TLS_CERT {cert}") from None
        where = f"LB_TLS_KEY {key}" if key else f"LB_TLS_CERT {cert}"
        raise TlsError(f"{where}: no usable private key ({exc.reason or exc})") from None
    return context


def _readable(name: str, path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TlsError(f"{name} {path}: cannot be read ({exc.strerror})") from None
    return os.path.abspath(path)


def _validity(cert: str) -> tuple[datetime.datetime, datetime.datetime]:
    # The standard library's own decoder (what its test suite uses): no third-party package
    # for two dates. A file whose first PEM block is no certificate fails here.
    try:
        decoded = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except ssl.SSLError:
        raise TlsError(f"LB_TLS_CERT {cert}: no PEM certificate in it") from None

    def date(field: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded[field]),
                                               datetime.UTC)

    return date("notBefore"), date("notAfter")


def validity_problem(validity: tuple[datetime.datetime, datetime.datetime],
                     now: datetime.datetime) -> str | None:
    """What is wrong with a certificate's dates at ``now``, or None."""
    not_before, not_after = validity
    if now >= not_after:
        return f"expired on {not_after:%Y-%m-%d %H:%M} UTC"
    if now < not_before:
        return f"is not valid before {not_before:%Y-%m-%d %H:%M} UTC"
    return None


def opens_plain_http(first: bytes) -> bool:
    """Whether a connection to the HTTPS listener began with plain HTTP (a method's letters)
    instead of a TLS handshake record."""
    return bool(first) and first[0] != HANDSHAKE_RECORD and first[:1].isalpha()


def refuse_plain_http(conn: socket.socket) -> None:
    """Answer a plain HTTP request on the HTTPS port and close: the request is read first (as
    far as it has come), so that the close does not reset the connection under the reply."""
    peer = conn.getpeername()
    log.warning("plain HTTP request from %s on the HTTPS port: answered 400, closed",
                peer[0] if isinstance(peer, tuple) else peer)
    with contextlib.suppress(OSError):
        conn.recv(65536)
        conn.sendall(plain_http_reply())
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def plain_http_reply() -> bytes:
    """What a plain HTTP request on the HTTPS port gets, in clear, before the close."""
    body = error_body(PLAIN_HTTP_MESSAGE)
    return (f"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1") + body
