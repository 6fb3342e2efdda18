"""The threads path's forwarding: blocking keep-alive connections per thread (``http.client``).

The reference implementation of the data path (``LB_WORKER=threads``): the Flask view hands
over the request's parts, this module does the I/O, and every rule comes from ``lb.routing``.
``http.client`` directly, not urllib3: urllib3 re-encodes the target (``%2e`` became ``%2E``,
``/%zz`` became ``/%25zz``) where the replica must get it exactly as the client sent it.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from lb.registry import Replica
from lb.routing import (
    STARTING_POLL_SECONDS,
    Router,
    header_value,
    replica_error,
    reply_headers,
)
from lb.settings import Settings


@dataclass
class Upstream:
    """A replica's complete answer, ready to be passed back."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: Replica


class ReplicaConnection(http.client.HTTPConnection):
    """Connects within the connect timeout, then waits up to the upstream timeout per read; the
    request line goes out byte for byte (``http.client`` would insist on ASCII)."""

    def __init__(self, host: str, port: int | None, connect_timeout: float,
                 read_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)

    def _encode_request(self, request: str) -> bytes:
        return request.encode("latin-1")  # the target as received (gunicorn decodes latin-1)


class Forwarder:
    """Sends a routed GET to the first candidate replica that answers (threads path)."""

    def __init__(self, settings: Settings, router: Router) -> None:
        self.settings = settings
        self.router = router
        self._local = threading.local()

    def forward(self, target: str, headers: Iterable[tuple[str, str]], key: int,
                path: str) -> Upstream:
        """GET ``target`` (path and query as received) with ``headers`` (already the forwarded
        set) from the first replica that answers; ``path`` (decoded) names it in errors."""
        fields = list(headers)
        attempts = self.router.attempts(key)
        if attempts.empty and self.router.waiting_for_replicas():
            deadline = time.monotonic() + self.settings.upstream_timeout
            while self.router.waiting_for_replicas() and time.monotonic() < deadline:
                time.sleep(STARTING_POLL_SECONDS)
            attempts = self.router.attempts(key)
        for replica in attempts:
            try:
                upstream = self._get(replica, target, fields)
            except (OSError, http.client.HTTPException) as exc:
                attempts.failed(replica, exc)
                continue
            attempts.answered(replica, upstream.status)
            error = replica_error(upstream.status, header_value(upstream.headers, "Content-Type"),
                                  replica.hostname, path)
            if error is not None:
                raise error
            return upstream
        raise attempts.exhausted()

    def _connection(self, address: str, fresh: bool) -> ReplicaConnection:
        """This thread's keep-alive connection to ``address`` (a new one when ``fresh``)."""
        conns: dict[str, ReplicaConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(address)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            parts = urlsplit(address)
            conn = conns[address] = ReplicaConnection(
                parts.hostname or "", parts.port, self.settings.connect_timeout,
                self.settings.upstream_timeout)
        return conn

    def _get(self, replica: Replica, target: str, headers: list[tuple[str, str]]) -> Upstream:
        address = replica.address or ""  # routable: it has one
        conn = self._connection(address, fresh=False)
        reused = conn.sock is not None
        try:
            return self._exchange(conn, replica, target, headers)
        except (ConnectionError, http.client.BadStatusLine):
            if not reused:
                raise
        # The replica closed a kept-alive connection between two requests (its keep-alive
        # timeout): not a failure of the replica. Once more on a new connection.
        return self._exchange(self._connection(address, fresh=True), replica, target, headers)

    @staticmethod
    def _exchange(conn: ReplicaConnection, replica: Replica, target: str,
                  headers: list[tuple[str, str]]) -> Upstream:
        try:
            conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"{conn.host}:{conn.port}")
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            reply = conn.getresponse()
            body = reply.read()  # bytes as sent, encoding untouched
        except BaseException:
            conn.close()
            raise
        if reply.will_close:
            conn.close()
        return Upstream(reply.status, reply_headers(reply.getheaders()), body, replica)
