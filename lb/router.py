"""Routing a GET: pick replicas from the hash map, forward, retry clockwise on failure.

No Flask in here: the app hands over the request's parts and turns the result into a reply.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests
import urllib3
import xxhash
from requests.adapters import HTTPAdapter

from lb.errors import ApiError
from lb.hashring import HashRing
from lb.registry import Registry, RegistryView, Replica
from lb.settings import Settings

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Set again by this server for its own reply.
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}
# How long a worker avoids a replica it could not reach, until the supervisor has decided.
SUSPECT_SECONDS = 1.0


def request_key(spec: str, headers: Mapping[str, str], query: Mapping[str, str],
                client: str | None) -> int:
    """The integer the request hash H is applied to.

    ``random``: a fresh 6-digit request id (the specification's). ``client``, ``header:NAME``,
    ``query:NAME``: that value (digits as they are, anything else through xxHash), so the same
    client or user keeps landing on the same replica; a missing value falls back to random.
    """
    value: str | None = None
    if spec == "client":
        value = client
    elif spec.startswith("header:"):
        value = headers.get(spec[7:])
    elif spec.startswith("query:"):
        value = query.get(spec[6:])
    if not value:
        return random.randint(100000, 999999)
    if value.isdigit() and len(value) <= 18:
        return int(value)
    return xxhash.xxh64_intdigest(value.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class RoutingTable:
    """The routable replicas of one registry version, on their persisted slots."""

    version: int
    ring: HashRing
    by_id: dict[int, Replica]


@dataclass
class Upstream:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: Replica
    attempts: list[str] = field(default_factory=list)


class Router:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self._view = RegistryView(registry)
        self._table: RoutingTable | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._suspects: dict[str, float] = {}  # hostname -> monotonic time until

    # -- choosing ------------------------------------------------------------------------------
    def table(self) -> RoutingTable:
        """The current table: a stat per call, a rebuild only after the registry changed."""
        with self._lock:
            state = self._view.current()
            if self._table is None or self._table.version != state.version:
                routable = state.routable()
                self._table = RoutingTable(state.version, state.hash_ring(routable),
                                           {r.server_id: r for r in routable})
            return self._table

    def candidates(self, key: int) -> list[Replica]:
        """Up to 1 + retries distinct replicas clockwise from ``key``; suspects go last."""
        table = self.table()
        limit = 1 + self.settings.retries
        now = time.monotonic()
        first = table.ring.lookup(key)
        if first is not None and self._suspects.get(table.by_id[first].hostname, 0) <= now:
            chosen = [table.by_id[first]]  # the common case: no walk at all
            if limit == 1:
                return chosen
        chosen, later = [], []
        for server_id in table.ring.walk(key):
            replica = table.by_id[server_id]
            (later if self._suspects.get(replica.hostname, 0) > now else chosen).append(replica)
            if len(chosen) >= limit:
                break
        return (chosen + later)[:limit]

    def suspect(self, replica: Replica) -> None:
        self._suspects[replica.hostname] = time.monotonic() + SUSPECT_SECONDS

    # -- forwarding ----------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or netrc from the environment
            adapter = HTTPAdapter(pool_connections=self.settings.max_replicas,
                                  pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            self._local.session = session
        return session

    def forward(self, target: str, headers: Mapping[str, str], key: int) -> Upstream:
        """GET ``target`` (path and query) from the first replica that answers.

        A replica that cannot be reached (connection refused or reset, timeout) costs the
        client nothing while another one is left: the next distinct replica clockwise gets the
        request. Every answer a replica gives, 5xx included, is passed back as it is.
        """
        candidates = self.candidates(key)
        if not candidates:
            raise ApiError(503, "No replica available to serve the request")
        timeout = (self.settings.connect_timeout, self.settings.upstream_timeout)
        tried: list[str] = []
        for replica in candidates:
            tried.append(replica.hostname)
            try:
                return self._get(replica, target, headers, timeout, tried)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
                self.suspect(replica)
        raise ApiError(502, f"No replica could serve the request (tried {', '.join(tried)})")

    def _get(self, replica: Replica, target: str, headers: Mapping[str, str],
             timeout: tuple[float, float], tried: list[str]) -> Upstream:
        reply = self._session().get(replica.address + target, headers=dict(headers),
                                    timeout=timeout, stream=True, allow_redirects=False)
        try:
            body = reply.raw.read(decode_content=False)  # bytes as sent, encoding untouched
        except BaseException:
            reply.close()
            raise
        reply.raw.release_conn()  # body fully read: the connection goes back to the pool
        out = [(k, v) for k, v in reply.raw.headers.items() if k.lower() not in RESPONSE_DROP]
        return Upstream(reply.status_code, out, body, replica, list(tried))
