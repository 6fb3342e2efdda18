"""Routing a GET: pick replicas from the hash map, forward, retry clockwise on failure.

No Flask in here: the app hands over the request's parts and turns the result into a reply.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import requests
import urllib3
import xxhash

from lb.errors import ApiError
from lb.registry import Registry, RegistryView, Replica
from lb.settings import Settings
from lb.strategies import Lookup, build_lookup

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Set again by this server for its own reply.
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}
# How long a worker avoids a replica it could not reach, until the supervisor has decided.
SUSPECT_SECONDS = 1.0


class _Lookup(Protocol):
    def get(self, key: str) -> str | None: ...


def request_key(spec: str, headers: _Lookup, query: _Lookup, client: str | None) -> int:
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
    """The routable replicas of one registry version and the strategy's lookup over them."""

    version: int
    ring: Lookup
    by_id: dict[int, Replica]


class RouterEvents:
    """What the router reports (metrics and logs subscribe here); the default ignores it."""

    def forwarded(self, replica: Replica, status: int, seconds: float, attempt: int) -> None:
        """A replica answered (any status) after ``seconds``; ``attempt`` 0 is the first try."""

    def unreachable(self, replica: Replica, error: BaseException) -> None:
        """A replica could not be reached; the next candidate gets the request."""

    def exhausted(self, tried: list[str]) -> None:
        """No candidate could serve the request."""


@dataclass
class Upstream:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: Replica
    attempts: list[str] = field(default_factory=list)


class Router:
    def __init__(self, settings: Settings, registry: Registry,
                 events: RouterEvents | None = None) -> None:
        self.settings = settings
        self.events = events or RouterEvents()
        self.inflight: dict[str, int] = {}  # hostname -> requests this worker has in flight
        self.view = RegistryView(registry)  # public: readiness and admin replies consult it
        self._table: RoutingTable | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._suspects: dict[str, float] = {}  # hostname -> monotonic time until

    # -- choosing ------------------------------------------------------------------------------
    def table(self) -> RoutingTable:
        """The current table: a stat per call, a rebuild only after the registry changed."""
        with self._lock:
            state = self.view.current()
            if self._table is None or self._table.version != state.version:
                routable = state.routable()
                self._table = RoutingTable(state.version,
                                           build_lookup(self.settings, state, routable),
                                           {r.server_id: r for r in routable})
                # Forget idle counters of replicas that left (hostnames churn with replacements).
                names = {r.hostname for r in routable}
                self.inflight = {h: c for h, c in self.inflight.items() if c or h in names}
            return self._table

    def candidates(self, key: int) -> list[Replica]:
        """Up to 1 + retries distinct replicas clockwise from ``key``; suspects go last."""
        table = self.table()
        limit = 1 + self.settings.retries
        now = time.monotonic()
        if self.settings.bounded_load:
            return self._bounded(table, key, limit, now)
        chosen: list[Replica] = []
        later: list[Replica] = []
        for server_id in table.ring.walk(key):
            replica = table.by_id[server_id]
            (later if self._suspects.get(replica.hostname, 0) > now else chosen).append(replica)
            if len(chosen) >= limit:
                break
        return (chosen + later)[:limit]

    def _bounded(self, table: RoutingTable, key: int, limit: int, now: float) -> list[Replica]:
        """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018).

        A replica already holding ``ceil(c * mean)`` of this worker's in-flight requests
        (counting this one) is passed over for the next one clockwise; overflow only walks.
        """
        n = len(table.by_id)
        if n == 0:
            return []
        with self._lock:
            total = sum(self.inflight.values()) + 1
        cap = max(1, math.ceil(self.settings.bounded_load * total / n))
        ok: list[Replica] = []
        full: list[Replica] = []
        for server_id in table.ring.walk(key):
            replica = table.by_id[server_id]
            busy = self.inflight.get(replica.hostname, 0) + 1 > cap
            (full if busy or self._suspects.get(replica.hostname, 0) > now else ok).append(replica)
        return (ok + full)[:limit]

    def suspect(self, replica: Replica) -> None:
        self._suspects[replica.hostname] = time.monotonic() + SUSPECT_SECONDS

    # -- forwarding ----------------------------------------------------------------------------
    def _pool(self, address: str) -> urllib3.HTTPConnectionPool:
        """This thread's keep-alive pool to ``address``: urllib3 directly, not ``requests``,
        whose per-request preparing and merging cost about a third of the balancer's CPU."""
        pools: dict[str, urllib3.HTTPConnectionPool] | None = getattr(self._local, "pools", None)
        if pools is None:
            pools = self._local.pools = {}
        pool = pools.get(address)
        if pool is None:
            pool = pools[address] = urllib3.connection_from_url(address, maxsize=4, retries=False)
        return pool

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
        for attempt, replica in enumerate(candidates):
            tried.append(replica.hostname)
            began = time.perf_counter()
            self._count(replica.hostname, +1)
            try:
                upstream = self._get(replica, target, headers, timeout, tried)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                self.suspect(replica)
                self.events.unreachable(replica, exc)
                continue
            finally:
                self._count(replica.hostname, -1)
            self.events.forwarded(replica, upstream.status, time.perf_counter() - began, attempt)
            return upstream
        self.events.exhausted(tried)
        raise ApiError(502, f"No replica could serve the request (tried {', '.join(tried)})")

    def _count(self, hostname: str, delta: int) -> None:
        with self._lock:
            self.inflight[hostname] = self.inflight.get(hostname, 0) + delta

    def _get(self, replica: Replica, target: str, headers: Mapping[str, str],
             timeout: tuple[float, float], tried: list[str]) -> Upstream:
        # The target as the client sent it: no URL "preparing" that would drop dot segments or
        # decode unreserved escapes, turning "/%2e%2e/x" into a literal "/../x" for the replica.
        fields = urllib3.HTTPHeaderDict()
        for name, value in headers.items():
            fields[name] = value  # names are case-insensitive: the last one set wins
        reply = self._pool(replica.address or "").urlopen(  # routable: it has an address
            "GET", target, headers=fields, retries=False, redirect=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            preload_content=False, assert_same_host=False)
        try:
            body = reply.read(decode_content=False)  # bytes as sent, encoding untouched
        except BaseException:
            reply.close()
            raise
        reply.release_conn()  # body fully read: the connection goes back to the pool
        out = [(k, v) for k, v in reply.headers.items() if k.lower() not in RESPONSE_DROP]
        return Upstream(reply.status, out, body, replica, list(tried))
