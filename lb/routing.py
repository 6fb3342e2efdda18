"""The routing core: which replicas a GET may go to, in which order, and the rules around it.

Both data paths call this and differ only in their I/O: the threads path (the Flask view and
``lb.threads.forward``, blocking sockets) and the event-driven path (``lb.aio``). What lives here is
written once for both:

- which requests are routed at all (``is_routed``) and the target forwarded (``origin_target``);
- the request key (``request_key``), the hash map and strategies over the routable replicas,
  bounded loads, suspects, ejected replicas (``Router.candidates``; the rule that ejects is
  ``lb.ejections``, told by the walk);
- one request's way round the ring: retries clockwise, other failure domains (Swarm nodes)
  first (``spread_over_domains``), the resend on a stale kept-alive connection, what is
  counted, 502, 503 and 504 (``RingWalk``), and what a replica's error reply becomes
  (``replica_error``);
- the header rules both ways (``forward_headers``, ``reply_headers``) and request codings
  (``transfer_coding_error``);
- the error envelope's bytes and reason phrases (``error_body``, ``reason_phrase``), identical
  on both paths, and what a client is told when the registry cannot be used
  (``registry_trouble``).

No sockets here; the registry is read through its store's view: the file's (a ``stat`` per
request, none when watched: ``lb.watch``) or etcd's (the state its watch thread last applied).
"""

from __future__ import annotations

import enum
import errno
import functools
import itertools
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AnyStr
from urllib.parse import parse_qsl, unquote, unquote_to_bytes, urlsplit

import werkzeug.urls  # noqa: F401 - registers the "werkzeug.url_quote" decoding error handler
import xxhash
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.sansio.utils import get_host

from lb.bounded import RecentLoad
from lb.ejections import Ejections
from lb.errors import ApiError, envelope, sentence
from lb.events import RouterEvents
from lb.hedging import Hedging
from lb.limits import ReplicaLimits, Waiter
from lb.registry import (
    STARTING,
    RegistryError,
    RegistryUnreadable,
    RegistryWriteUnknown,
    Replica,
    State,
)
from lb.settings import Settings
from lb.slowstart import Ramped, fallbacks, joining_order, ramping
from lb.strategies import Lookup

if TYPE_CHECKING:
    from lb.stores import Store, View

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Claims about the client or the scheme that only a proxy may make (the replica's gunicorn
# trusts its loopback peer): the edge sets its own X-Forwarded-* and passes no others on.
SPOOFABLE = frozenset({"forwarded", "x-real-ip", "x-forwarded-ssl", "x-forwarded-protocol"})
# Set by the balancer itself on the way to the replica.
SET_ON_FORWARD = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-host",
                            "x-forwarded-proto", "x-request-id"})
# The client side of "Expect: 100-continue" is the balancer's (RFC 9110 section 10.1.1): a
# replica asked for it would answer 100 first, an interim answer to a request with no body.
OWNED_BY_BALANCER = frozenset({"expect"})
REQUEST_DROP = HOP_BY_HOP | SPOOFABLE | SET_ON_FORWARD | OWNED_BY_BALANCER
# Set again by the balancer for its own reply (a replica's own X-Served-By or X-Request-ID is
# replaced, never sent twice).
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server", "x-served-by", "x-request-id"}
_RESPONSE_DROP_ANY = frozenset(RESPONSE_DROP | {n.encode() for n in RESPONSE_DROP})
_CONNECTION = frozenset({"connection", b"connection"})
# The usual Connection value, naming a header that is dropped anyway: nothing to look into.
_KEEP_ALIVE = frozenset({"keep-alive", b"keep-alive"})
# How long a worker avoids a replica it could not reach, until the supervisor has decided.
SUSPECT_SECONDS = 1.0
# While replicas are still starting (a stack that just came up), a routed GET waits for the
# first one this long (at most LB_UPSTREAM_TIMEOUT) instead of failing at once.
STARTING_POLL_SECONDS = 0.05

# Methods RFC 9110 (section 9) and RFC 5789 define: a path that does not take one of them is a
# 405 with its Allow; any other method is not implemented here at all, 501 (section 9.1).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                           "PATCH"})
# Answers that never have a body, whatever their header fields say (RFC 9110 section 6.4.1).
BODILESS_STATUSES = frozenset({204, 304})

# The most a replica's answer head may take (as the threads path's http.client allows): past
# it the replica broke the protocol, 502. gunicorn's own heads are a few hundred bytes.
REPLY_HEAD_MAX_BYTES = 65536
REPLY_HEAD_MAX_FIELDS = 100

RESERVED_PREFIX = "/_lb"
ADMIN_PATHS = frozenset({"/rep", "/add", "/rm"})
JSON_TYPE = "application/json"


def bodiless(status: int) -> bool:
    """An answer with this status has no body and no Content-Length of its own: 1xx, 204, 304."""
    return status < 200 or status in BODILESS_STATUSES


class UpstreamError(ConnectionError):
    """A replica gave no complete answer: how, and how far it had come.

    - ``before_reply``: the connection closed before any byte of the answer (a kept-alive
      connection the replica had closed: the request may go once more on a new connection);
    - ``began``: an answer had begun, then timed out or broke the protocol: never retried
      (the replica may be slow to answer, not unable, or is broken). An answer cut by the
      replica's close (a crash) is not ``began``: nothing of it went to the client, and a GET
      may go to the next replica (RFC 9110 section 9.2.2);
    - ``timed_out``: no answer, or no further byte of it, within its deadline (504, not 502).
    """

    def __init__(self, message: str, *, before_reply: bool = False, began: bool = False,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.before_reply = before_reply
        self.began = began
        self.timed_out = timed_out


# Linux acknowledges received data within its delayed-ACK bound (200 ms) however busy the
# receiving process, and first retransmits after at least 200 ms: a bound below this would close
# connections to live replicas.
UNACKNOWLEDGED_FLOOR = 0.5


def bound_unacknowledged(sock: Any, connect_timeout: float) -> None:
    """Make a connection to a replica fail once bytes sent on it stay unacknowledged for
    ``connect_timeout`` (at least ``UNACKNOWLEDGED_FLOOR``; TCP_USER_TIMEOUT, Linux; nothing
    where the option is missing). A replica's host that vanished (its node stopped, a cable
    pulled) sends no reset: a request written to a kept-alive connection to it would wait its
    whole LB_UPSTREAM_TIMEOUT for an answer, while a live host's kernel acknowledges within a
    round trip, the same round trip LB_CONNECT_TIMEOUT bounds at connect. ``host_gone`` tells
    that failure; a slow replica on a live host is unaffected (its kernel still acknowledges)."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is not None:
        seconds = max(connect_timeout, UNACKNOWLEDGED_FLOOR)
        sock.setsockopt(socket.IPPROTO_TCP, option, round(seconds * 1000))


def host_gone(exc: BaseException | None) -> bool:
    """Whether ``exc`` is how a connection bounded by ``bound_unacknowledged`` fails when its
    peer's host stopped acknowledging: the kernel's ETIMEDOUT (not a wait of Python's own, whose
    ``TimeoutError`` has no errno). The replica is then unreachable: not a kept-alive connection
    it closed (no resend on a new one), nor late (no 504)."""
    return isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT


# -- which requests, which target -----------------------------------------------------------------
def is_routed(method: str, path: str) -> bool:
    """A GET or HEAD the replicas answer: anything but the admin endpoints and the reserved
    prefix.

    ``path`` is decoded (``/%72ep`` is ``/rep``), as the Flask app matches it.
    """
    return ((method == "GET" or method == "HEAD") and path not in ADMIN_PATHS
            and path != RESERVED_PREFIX and not path.startswith(RESERVED_PREFIX + "/"))


def decode_path(raw_path: str) -> str:
    """The path as the Flask app sees it: percent-escapes decoded, as UTF-8 (gunicorn and
    werkzeug do the same)."""
    if "%" not in raw_path:
        return raw_path
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def origin_target(raw: str) -> str | None:
    """The target to forward: path and query exactly as the client sent them.

    An absolute-form target (``GET http://host/path``, RFC 9112 section 3.2.2) goes on as its
    path and query alone (``/`` when it has no path); the host it names is never used. Any
    other form (``*``, authority form) is not a routable target: None.
    """
    if raw.startswith("/"):
        return raw
    if raw[:7].lower() == "http://" or raw[:8].lower() == "https://":
        parts = urlsplit(raw)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return None


# -- the request key ------------------------------------------------------------------------------
def request_key(spec: str, header: Callable[[str], str | None],
                query: Callable[[str], str | None], client: str | None) -> int:
    """The integer the request hash H is applied to.

    ``random``: a fresh 6-digit request id (the specification's). ``client``, ``header:NAME``,
    ``query:NAME``: that value (ASCII digits as they are, anything else through xxHash), so the
    same client or user keeps landing on the same replica; a missing value falls back to random.
    ``header`` and ``query`` look a name up in the request (None when absent).
    """
    value: str | None = None
    if spec == "client":
        value = client
    elif spec.startswith("header:"):
        value = header(spec[7:])
    elif spec.startswith("query:"):
        value = query(spec[6:])
    if not value:
        # random.randint's uniform draw without its three Python calls (on every request
        # with the default key): 900,000 values from 53 random bits, bias below 1e-10.
        return 100000 + int(random.random() * 900000)
    # str.isdigit() accepts "²" and other digits int() refuses: ASCII digits only.
    if len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return xxhash.xxh64_intdigest(value.encode("utf-8", "surrogateescape"))


# -- headers --------------------------------------------------------------------------------------
def forward_headers(headers: Iterable[tuple[str, str]], client: str, host: str,
                    request_id: str, scheme: str = "http") -> list[tuple[str, str]]:
    """End-to-end headers only, plus the ``X-Forwarded-*`` a replica needs to know its client,
    and last the request's ``X-Request-ID``.

    ``headers`` are the client's, in order (repeated names allowed); ``host`` is the host the
    client asked for (``X-Forwarded-Host``), ``scheme`` what it spoke to the balancer
    (``X-Forwarded-Proto``: https on the TLS listener). Names with ``_`` are dropped as gunicorn drops
    them (``X_Forwarded_For`` would become ``X-Forwarded-For`` in the replica's WSGI environ).
    """
    return [*forwarded_fields(headers, client, host, scheme), ("X-Request-ID", request_id)]


def forwarded_fields(headers: Iterable[tuple[str, str]], client: str,
                     host: str, scheme: str = "http") -> list[tuple[str, str]]:
    """``forward_headers`` but the request id: what depends on the client's headers alone
    (a caller may keep it for the next request with the same headers)."""
    out: list[tuple[str, str]] = []
    named: set[str] = set()  # listed in Connection: hop-by-hop too
    prior: list[str] = []
    for pair in headers:
        lower = pair[0].lower()
        if lower == "connection":
            if pair[1].lower() not in _KEEP_ALIVE:
                named.update(connection_options(pair[1]))
        elif lower == "x-forwarded-for":
            prior.append(pair[1])
        elif lower not in REQUEST_DROP and "_" not in lower:
            out.append(pair)
    named.difference_update(REQUEST_DROP)  # "Connection: keep-alive": dropped already
    if named:
        out = [pair for pair in out if pair[0].lower() not in named]
    forwarded_for = ",".join(prior)
    out.append(("X-Forwarded-For", f"{forwarded_for}, {client}" if forwarded_for else client))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Forwarded-Proto", scheme))  # the replicas themselves speak plain HTTP
    return out


# Up to this many parameters in a query, looking at each is cheaper than a regular expression.
SCANNED_PARAMETERS = 8


@functools.lru_cache(maxsize=256)
def forwarded_host(host_header: str | None, server: tuple[str, int] | None) -> str:
    """The host the client asked for, validated as werkzeug validates ``request.host``."""
    return get_host("http", host_header, server)


def query_value(query: str, name: str) -> str | None:
    """The first value of ``name`` in a query string, as werkzeug's ``request.args.get(name)``
    gives it (``+`` is a space, escapes as UTF-8, invalid bytes left escaped); None when absent.

    Bounded whatever the query holds. A few parameters are looked at one by one, a name
    decoded only when it has something to decode. Past ``SCANNED_PARAMETERS``, a regular
    expression made once per name (``_raw_names``) finds in one pass, in C, the parameters
    whose raw name could decode to ``name``, and only those are decoded: a query of a
    thousand ``%61=`` costs a scan of its bytes, not a thousand decodings. ``query`` is a
    target's query as the request line carried it: ASCII (llhttp refuses anything else); any
    other goes werkzeug's own way.
    """
    if not query.isascii():
        return _query_value_reference(query, name)
    if query.count("&") < SCANNED_PARAMETERS:
        for part in query.split("&"):
            key, _, value = part.partition("=")
            as_sent = "%" not in key and "+" not in key  # nothing in it to decode
            if (key == name if as_sent else _decoded(key) == name) and part:  # "": skipped
                return value if "%" not in value and "+" not in value else _decoded(value)
        return None
    text = "&" + query  # every parameter's name now follows an "&"
    finder, beginnings = _raw_names(name)
    # Where the first parameter that may be it begins: found by str.find, faster than the
    # expression at every "&" (none of a thousand "%61=" begins as "id" can).
    starts = [at for beginning in beginnings if (at := text.find(beginning)) >= 0]
    found = finder.search(text, min(starts)) if starts else None
    while found is not None:
        end = found.end()
        raw = found[1]
        # A match without "%" or "+" is ``name`` as it is; one with them is decoded to be sure.
        if ("%" not in raw and "+" not in raw) or _decoded(raw) == name:
            if end == len(text) or text[end] == "&":
                return ""  # "name" alone, or "name&": werkzeug's blank value
            stop = text.find("&", end)
            value = text[end + 1:] if stop < 0 else text[end + 1:stop]
            return value if "%" not in value and "+" not in value else _decoded(value)
        found = finder.search(text, end)  # a name that only looked like it (see _raw_names)
    return None


def _decoded(raw: str) -> str:
    """A query name or value decoded as ``urllib.parse.parse_qsl`` does for werkzeug."""
    if "+" in raw:
        raw = raw.replace("+", " ")
    return unquote(raw, errors="werkzeug.url_quote") if "%" in raw else raw


def _query_value_reference(query: str, name: str) -> str | None:
    """``request.args.get(name)`` the way werkzeug computes it, for a WSGI query string (the
    request's bytes as latin-1); None where werkzeug itself fails (bytes that are not UTF-8)."""
    try:
        text = query.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None
    for key, value in parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote"):
        if key == name:
            return value
    return None


def _escaped(byte: int) -> str:
    """A pattern for ``%XX`` of ``byte``, hex letters in either case."""
    return "%" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{byte:02X}")


@functools.lru_cache(maxsize=64)
def _raw_names(name: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A pattern finding, in ``"&" + query``, each parameter whose raw name may decode to
    ``name`` (group 1: the raw name), leftmost first; and the ways such a parameter may begin
    (``&`` and its first character's raw forms, or their first bytes).

    Each character of ``name`` may be sent as itself (unless ``&``, ``=`` or ``+``, which mean
    something else raw), as ``+`` if a space, or as its UTF-8 bytes escaped; ``%`` as itself
    only when no two hex digits follow. A ``%HH`` in ``name`` with HH of 80 or over may also
    be a byte that is not UTF-8, escaped in either case (werkzeug escapes it again). At each
    position at most one alternative can match: no backtracking. Every raw name decoding to
    ``name`` matches; a match decodes to ``name`` unless ``name`` holds such a ``%HH`` and the
    byte is valid UTF-8 with its neighbours: the caller decodes each match to make sure.
    """
    tokens: list[str] = []
    i = 0
    while i < len(name):
        if re.fullmatch(r"%[89A-F][0-9A-F]", name[i:i + 3]):
            spelt = "".join(_spellings(c) for c in name[i:i + 3])
            tokens.append(f"(?:{_escaped(int(name[i + 1:i + 3], 16))}|{spelt})")
            i += 3
            continue
        tokens.append(_spellings(name[i]))
        i += 1
    follows = "(?=[=&]|\\Z)" if name else "(?==)"  # parse_qsl skips empty parameters
    return re.compile(f"&({''.join(tokens)}){follows}"), _beginnings(name)


def _beginnings(name: str) -> tuple[str, ...]:
    """Every way ``"&" + raw name`` may begin when the raw name decodes to ``name``: ``&`` and
    the first character as itself, as ``+`` (a space), or ``%`` and its first byte's hex in
    either case (``&%`` alone when ``name`` begins with ``%``: all its forms begin so)."""
    if not name:
        return ("&=",)
    first = name[0]
    if first == "%":
        return ("&%",)
    byte = f"{first.encode('utf-8', 'surrogatepass')[0]:02X}"
    high, low = byte[0], byte[1]
    found = {f"&%{h}{lo}" for h in {high, high.lower()} for lo in {low, low.lower()}}
    if first == " ":
        found |= {"& ", "&+"}
    elif first.isascii() and first not in "&=+":
        found.add("&" + first)
    return tuple(sorted(found))


def _spellings(char: str) -> str:
    """A pattern for the raw forms of one character of a decoded query name."""
    forms: list[str] = []
    if char == " ":
        forms += [" ", r"\+"]
    elif char == "%":
        forms.append("%(?![0-9A-Fa-f]{2})")
    elif char.isascii() and char not in "&=+":
        forms.append(re.escape(char))
    forms.append("".join(_escaped(b) for b in char.encode("utf-8", "surrogatepass")))
    return f"(?:{'|'.join(forms)})"


def connection_options(value: AnyStr) -> set[AnyStr]:
    """The options one ``Connection`` header lists, lower-cased: ``close``, ``keep-alive``, or
    the names of further hop-by-hop headers (RFC 9110 section 7.6.1)."""
    comma = b"," if isinstance(value, bytes) else ","
    return {option.strip().lower() for option in value.split(comma)}


def reply_headers(headers: Iterable[tuple[AnyStr, AnyStr]]) -> list[tuple[AnyStr, AnyStr]]:
    """A replica's headers minus those of its own hop (the balancer sets them for its reply).

    ``str`` pairs (the threads path) or raw ``bytes`` pairs as parsed (the event-driven path,
    which passes them on without decoding).
    """
    kept: list[tuple[AnyStr, AnyStr]] = []
    named: set[AnyStr] = set()  # listed in Connection: hop-by-hop too
    for pair in headers:
        lower = pair[0].lower()
        if lower not in _RESPONSE_DROP_ANY:
            kept.append(pair)
        elif lower in _CONNECTION and pair[1].lower() not in _KEEP_ALIVE:
            named.update(connection_options(pair[1]))
    named.difference_update(_RESPONSE_DROP_ANY)  # "Connection: keep-alive": dropped already
    return [p for p in kept if p[0].lower() not in named] if named else kept


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """A request header's value (repeated ones joined with ``,`` as in a WSGI environ)."""
    lower = name.lower()
    values = [v for k, v in headers if k.lower() == lower]
    return ",".join(values) if values else None


# -- replies --------------------------------------------------------------------------------------
def error_body(message: str) -> bytes:
    """The contract's envelope as sent: the same bytes as Flask's ``jsonify`` gives."""
    return (json.dumps(envelope(message), ensure_ascii=True, sort_keys=True,
                       separators=(",", ":")) + "\n").encode("ascii")


def transfer_coding_error(value: str) -> ApiError | None:
    """What a request's ``Transfer-Encoding`` calls for, or None when it is plain ``chunked``.

    RFC 9112: without ``chunked`` as the final coding (once) a request body has no length
    that can be determined, 400 (section 6.3); any other coding before it is one this server
    does not implement, 501 (section 6.1) - never silently ignored.
    """
    codings = [c.strip(" \t").lower() for c in value.split(",")]
    if codings == ["chunked"]:
        return None
    if codings[-1] != "chunked" or codings.count("chunked") > 1:
        return ApiError(400, f"Transfer-Encoding {value!r}: chunked must be the final coding")
    return ApiError(501, f"Transfer-Encoding {value!r}: only chunked is implemented")


def registry_trouble(exc: RegistryError) -> str:
    """What a client is told when the registry cannot be used: what is wrong, never where."""
    if isinstance(exc, RegistryUnreadable):
        return (f"{sentence(exc.reason)}; routing goes on with the last good set of replicas, "
                "and admin calls are refused until the supervisor restores it")
    if isinstance(exc, RegistryWriteUnknown):
        return (f"{sentence(exc.reason)}: the registry could not be reached to confirm it, so "
                "this call's change may or may not have been made; see /rep")
    return f"{sentence(exc.reason)}; nothing was changed, try again later"


def reason_phrase(status: int) -> str:
    return HTTP_STATUS_CODES.get(status, "Unknown")


def missing_endpoint(path: str) -> ApiError:
    """A replica's 404 as the contract words it."""
    return ApiError(400, f"'{path}' endpoint does not exist in server replicas")


def replica_error(status: int, content_type: str | None, replica: str,
                  path: str) -> ApiError | None:
    """What a replica's error reply becomes, or None when it is passed back as it is.

    A 404 is the contract's 400. Any other error that is not JSON (gunicorn's HTML pages: a
    431 because a request was too big for the replica, a 500 of a crashed handler) becomes the
    envelope with the same status, so a client never gets a page the contract does not know.
    """
    if status == 404:
        return missing_endpoint(path)
    if status >= 400 and not (content_type or "").lower().startswith(JSON_TYPE):
        return ApiError(status, f"Replica {replica} answered {status} {reason_phrase(status)}")
    return None


# -- choosing replicas ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingTable:
    """The routable replicas of one registry version and the strategy's lookup over them."""

    version: int
    ring: Lookup
    by_id: dict[int, Replica]
    starting: bool  # some wanted replica is still starting (a fresh stack, an /add)

    @functools.cached_property
    def total_weight(self) -> int:
        """The routable replicas' weights added up: each one's part of the keys is w / this."""
        return sum(r.weight for r in self.by_id.values())

    @functools.cached_property
    def domains(self) -> dict[str, str]:
        """Hostname -> failure domain of the replicas whose domain is known (Swarm's nodes);
        empty when none is (local processes, one Docker engine): retries then keep the ring's
        order. Made at its first use, by a retry, never on a request's first try."""
        return {r.hostname: r.domain for r in self.by_id.values() if r.domain is not None}


def spread_over_domains(domains: Mapping[str, str], tiers: Iterable[list[Replica]],
                        tried: Sequence[str], limit: int) -> Iterator[Replica]:
    """The replicas of ``tiers`` (each in clockwise order; suspects' tier last), up to
    ``limit``, other failure domains first: each next one is the first of its tier, not tried,
    whose domain is none of the replicas tried (``tried``: hostnames, a walk's list as it
    grows) or given before it; else the tier's first not tried. A replica of unknown domain
    (None) shares it with none: with no domain known at all, this is the tiers' own order.

    A node that stops takes all its replicas at once: a request's retries then land on replicas
    it did not take, while the ring's order alone may give all 1 + retries from that node.
    """
    given: list[str] = []
    for tier in tiers:
        left = list(tier)
        while len(given) < limit:
            left = [r for r in left if r.hostname not in tried]  # (tried since, by the walk)
            if not left:
                break
            used = {domains.get(h) for h in (*tried, *given)}
            pick = next((r for r in left if r.domain is None or r.domain not in used), left[0])
            left.remove(pick)
            given.append(pick.hostname)
            yield pick


class Router:
    """Chooses replicas for request keys: one per worker process, shared by its threads."""

    def __init__(self, settings: Settings, registry: Store,
                 events: RouterEvents | None = None) -> None:
        self.settings = settings
        self.events = events or RouterEvents()
        self.inflight: dict[str, int] = {}  # hostname -> requests this worker has in flight
        # Bounded loads' window of this worker's recent requests (None: loads not bounded).
        self.recent = RecentLoad(settings.bounded_load) if settings.bounded_load else None
        # hostname -> answers below 500 this worker got: evidence of life (lb.evidence)
        self.answered: dict[str, int] = {}
        self.view: View = registry.view()  # public: readiness and admin replies consult it
        self._table: RoutingTable | None = None
        self._lock = threading.Lock()
        self._suspects: dict[str, float] = {}  # hostname -> monotonic time until
        # Passive health: replicas failing in a row are passed over for a while.
        self.ejections = Ejections(settings.eject_after, settings.eject_seconds,
                                   settings.eject_max_share, self.events)
        # Slots per replica and their queues (LB_REPLICA_MAXCONN), taken and given back by
        # the walk: the drivers only wait for one when told to (RingWalk.queue).
        self.limits = ReplicaLimits(settings.replica_maxconn, settings.queue_size,
                             settings.queue_timeout, self.events)
        # Hedged GETs: the deadline a try is given before the next candidate gets it too.
        self.hedging = Hedging(settings.hedge_after, settings.hedge_share,
                               settings.upstream_timeout)

    def table(self) -> RoutingTable:
        """The current table: the view's look at the registry, a rebuild only after it changed."""
        table = self._table
        if table is not None and table.version == self.view.current().version:
            return table  # the usual call (every request): no lock to take
        with self._lock:
            state = self.view.current()
            if self._table is None or self._table.version != state.version:
                routable = state.routable()
                self._table = RoutingTable(
                    state.version, self.lookup_for(state, routable),
                    {r.server_id: r for r in routable},
                    any(r.state == STARTING for r in state.members()))
                # Forget idle counters of replicas that left (hostnames churn with replacements).
                names = {r.hostname for r in routable}
                self.inflight = {h: c for h, c in self.inflight.items() if c or h in names}
                self.answered = {h: c for h, c in self.answered.items() if h in names}
                self.ejections.keep(names)
            return self._table

    def lookup_for(self, state: State, routable: list[Replica]) -> Lookup:
        """The strategy's lookup over the routable replicas at their weights; while some ramp
        up (``LB_SLOW_START``), one that gives them their keys gradually (``lb.slowstart``)."""
        lookup = state.lookup(self.settings.strategy, routable)
        period = self.settings.slow_start
        if not period:
            return lookup
        ramps = ramping({r.server_id: r.ready_since for r in routable if r.weight}, period,
                        time.time())
        base = [r for r in routable if r.server_id not in ramps and r.weight]
        if not ramps or not base:  # nothing ramps, or nothing else takes its keys meanwhile
            return lookup
        by_id = {r.server_id: r for r in routable}
        joined = [by_id[server_id] for server_id in joining_order(ramps)]
        maps = {i: state.lookup(self.settings.strategy, base + joined[:i])
                for i in fallbacks(ramps)}
        return Ramped({**maps, len(joined): lookup}, ramps, period)

    def candidates(self, key: int) -> list[Replica]:
        """Up to 1 + retries distinct replicas clockwise from ``key``, other failure domains
        first after the first one; suspects go last, ejected replicas not at all (unless every
        one is: then they are all there is)."""
        return list(self.choices(self.table(), key))

    def choices(self, table: RoutingTable, key: int,
                tried: Sequence[str] = ()) -> Iterator[Replica]:
        """``candidates`` one at a time: the walk round the ring goes only as far as the
        request needs (usually its first replica answers).

        When replicas have failure domains (``RoutingTable.domains``), the order within the
        others and within the suspects puts domains not yet tried first
        (``spread_over_domains``); ``tried``: the hostnames a walk tried (the list it keeps
        adding to), so that a retry avoids the domain of a first try made without this walk.
        """
        limit = 1 + self.settings.retries
        now = time.monotonic()
        if self.settings.bounded_load:
            yield from self._bounded(table, key, limit, now, tried)
            return
        suspects = self._suspects
        ejections = self.ejections
        spread = table.domains
        ready: list[Replica] = []  # with domains: the others, all of them, to spread
        later: list[Replica] = []
        given = 0
        for server_id in table.ring.walk(key):
            replica = table.by_id[server_id]
            if ejections.until and ejections.ejected(replica.hostname, now):
                continue  # as if not routable: its keys go clockwise
            if suspects and suspects.get(replica.hostname, 0) > now:
                later.append(replica)
                continue
            if spread:
                ready.append(replica)
                continue
            yield replica
            given += 1
            if given >= limit:
                return
        if not given and not ready and not later:  # every routable replica is ejected
            yield from self._panic(table, key, limit)  # route anyway
        elif spread:
            yield from spread_over_domains(spread, (ready, later), tried, limit)
        else:
            yield from later[:limit - given]

    def first_choice(self, table: RoutingTable, key: int) -> Replica | None:
        """``choices``' first replica when finding it takes no walk: the key's own replica,
        unless it is a suspect or ejected, or loads are bounded (then None: ask ``choices``)."""
        if self.settings.bounded_load:
            return None
        server_id = table.ring.lookup(key)  # a strategy's lookup is its walk's first step
        if server_id is None:
            return None
        replica = table.by_id[server_id]
        suspects = self._suspects
        if suspects and suspects.get(replica.hostname, 0) > time.monotonic():
            return None
        if self.ejections.until and self.ejections.ejected(replica.hostname, time.monotonic()):
            return None
        return replica

    def _panic(self, table: RoutingTable, key: int, limit: int) -> Iterator[Replica]:
        """Clockwise from ``key`` whatever the ejections: when every routable replica is
        ejected (the set shrank under them), routing to them beats answering 503."""
        for given, server_id in enumerate(table.ring.walk(key)):
            if given >= limit:
                return
            yield table.by_id[server_id]

    def _bounded(self, table: RoutingTable, key: int, limit: int, now: float,
                 tried: Sequence[str] = ()) -> Iterable[Replica]:
        """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018), judged
        over this worker's recent requests (``lb.bounded``: the rules and the bound).

        The key's own replica (the walk's first that is not ejected) while it holds fewer than
        ``ceil(c * mean)`` of the window; else the next one clockwise holding at most the mean
        (a replica's mean: its weight's part of the window).
        Replicas without room go with the suspects, and failure domains spread both tiers as in
        ``choices``.
        """
        total = table.total_weight
        recent = self.recent
        if total == 0 or recent is None:
            return []
        ok: list[Replica] = []
        full: list[Replica] = []
        ejections = self.ejections
        suspects = self._suspects
        home = True
        spread = table.domains
        for server_id in table.ring.walk(key):
            replica = table.by_id[server_id]
            if ejections.until and ejections.ejected(replica.hostname, now):
                continue
            room = recent.room(replica.hostname, home, recent.caps(replica.weight / total))
            home = False
            if room and suspects.get(replica.hostname, 0) <= now:
                ok.append(replica)
                if len(ok) >= limit and not spread:
                    break  # the rest of the walk could only come after these
            else:
                full.append(replica)
        if not ok and not full:  # every routable replica is ejected: route anyway
            return list(self._panic(table, key, limit))
        if spread:
            return spread_over_domains(spread, (ok, full), tried, limit)
        return (ok + full)[:limit]

    def waiting_for_replicas(self) -> bool:
        """No replica is routable yet, but some are starting: worth waiting a moment."""
        table = self.table()
        return not table.by_id and table.starting

    def failing(self, hostname: str) -> bool:
        """``hostname`` is a suspect or ejected now (the hedge budget's exemption)."""
        now = time.monotonic()
        return (self._suspects.get(hostname, 0) > now
                or bool(self.ejections.until) and self.ejections.ejected(hostname, now))

    def suspect(self, replica: Replica) -> None:
        self._suspects[replica.hostname] = time.monotonic() + SUSPECT_SECONDS

    def count(self, hostname: str, delta: int) -> None:
        """``delta`` more requests of this worker in flight to ``hostname`` (bounded loads
        alone need the counts: without them, nothing is counted)."""
        if not self.settings.bounded_load:
            return
        with self._lock:
            self.inflight[hostname] = self.inflight.get(hostname, 0) + delta
            if delta > 0 and self.recent is not None:
                self.recent.given(hostname)

    def walk(self, key: int, events: RouterEvents | None = None) -> RingWalk:
        """``key``'s way round the ring, reported to ``events`` (the router's by default)."""
        return RingWalk(self, self.table(), key, events or self.events)


class Outcome(enum.Enum):
    """How one try at a replica ended, as a driver tells ``RingWalk.told``."""

    ANSWERED = "answered"  # a complete answer's head came (any status): passed back
    UNREACHABLE = "unreachable"  # no connection, a new one closed before any answer, or an
    # answer cut by the replica's close (a crash) before any of it went to the client
    STALE = "stale"  # a kept-alive (reused) connection closed before any byte of an answer
    TIMED_OUT = "timed out"  # no byte of an answer within its deadline
    STALLED = "stalled"  # an answer began, then no further byte of it within its deadline
    BROKEN = "broken"  # an answer began, then broke the protocol or a bound

    @staticmethod
    def of(error: UpstreamError, reused: bool) -> Outcome:
        """What ``error`` from one exchange means; ``reused``: the exchange went on a
        kept-alive connection that had carried an earlier one."""
        if error.began:
            return STALLED if error.timed_out else BROKEN
        if error.timed_out:
            return TIMED_OUT
        return STALE if error.before_reply and reused else UNREACHABLE


# The members as module names: an enum member looked up on its class costs a descriptor call.
ANSWERED, UNREACHABLE, STALE = Outcome.ANSWERED, Outcome.UNREACHABLE, Outcome.STALE
TIMED_OUT, STALLED, BROKEN = Outcome.TIMED_OUT, Outcome.STALLED, Outcome.BROKEN
# Failures after which no other replica gets the request: an answer had begun (a replica slow
# to answer would get every request twice, a broken one would be asked again and again).
FINAL_FAILURES = frozenset({STALLED, BROKEN})
# Failures that make the request's answer a 504, when the walk ends on them (else a 502).
LATE = frozenset({TIMED_OUT, STALLED})


class Step(enum.Enum):
    """What a driver of a ``RingWalk`` does next."""

    TRY = "try"  # send to ``walk.replica``, on a kept-alive connection if one is idle
    RESEND = "resend"  # send to ``walk.replica`` once more, on a new connection
    GIVE_UP = "give up"  # the request's answer is ``walk.error`` (502, 503 or 504)
    DONE = "done"  # answered: nothing more to do
    WAIT = "wait"  # a hedged request's other try is still in flight: wait for its outcome


TRY, RESEND, GIVE_UP, DONE, WAIT = Step.TRY, Step.RESEND, Step.GIVE_UP, Step.DONE, Step.WAIT


class RingWalk:
    """One routed request's way round the ring, written once for every driver (the threads
    path's ``Forwarder``, the event-driven path's task and its fast path): told how each try
    ended, it says what to do next. No I/O here, so every sequence of outcomes is tested
    without sockets (``tests/test_ring_walk.py``). A driver reads::

        step = walk.start()
        while step is TRY or step is RESEND:
            send to walk.replica (RESEND: on a new connection), then
            step = walk.told(outcome, error or status)
        step is DONE (answered), or GIVE_UP: walk.error is the answer

    ``first()`` is ``start()``'s usual case on its own (the key's own replica, no walk), for the
    fast path; ``told`` goes on from it the same way.

    The states: nothing tried; trying ``replica`` (``resent`` once or not); DONE; GIVE_UP.

    - ``start``: no routable replica at all, GIVE_UP with 503 (nothing is counted); else
      TRY the key's own replica (``Router.first_choice``) or the first of ``Router.choices``.
    - ``told(ANSWERED)``: DONE. ``told(STALE)`` the first time for this replica: RESEND (the
      replica closed a kept-alive connection between two requests, its keep-alive timeout: not
      its failure); any other failure, a STALE after a resend included, is the replica's: it
      becomes a suspect and is reported, then GIVE_UP after ``FINAL_FAILURES`` (502, 504
      when it stalled), else TRY the next replica of ``Router.choices`` not tried yet, or
      GIVE_UP when ``1 + LB_RETRIES`` replicas were tried or none is left (504 when the last
      failure was ``LATE``, else 502).
    - Every outcome but a first STALE is also told to ``Router.ejections`` (``lb.ejections``):
      a failure, or an answer with a 5xx status, counts towards the replica's ejection; any
      other answer ends its streak. A 5xx answer is still DONE: passed back, never retried.

    Why this is the walk the routing rules ask for:

    - *No replica twice, but one resend each.* A replica is tried only if its hostname is not
      in ``tried``, and is added to it as it is tried; RESEND is given at most once per
      replica (``resent``), and only for STALE, which no answer had begun on.
    - *At most 1 + retries replicas.* ``_next`` gives a replica only while ``len(tried)`` is
      below the limit.
    - *Ejected replicas never, suspects last.* ``Router.choices`` skips ejected replicas (all of
      them are given only when nothing else is routable) and puts suspects after the others
      (and bounded loads' full replicas with them); the walk is made lazily after the first
      failure, so that replica is a suspect by then and comes last too, and ``tried`` skips it
      anyway.
    - *Other failure domains first.* ``Router.choices`` is given ``tried`` (the list itself,
      as it grows), so each retry goes, among the others and then among the suspects, to the
      first replica whose domain no replica tried is in (``spread_over_domains``), the first
      try's included; with no domain known the order is the ring's, as it was.
    - *In-flight counts back to zero.* A replica is counted once as it becomes the one tried,
      and uncounted once as the walk leaves it (answered or failed); a RESEND stays on it. So
      at DONE or GIVE_UP nothing of this request is counted. A driver that stops in between
      (its client left) leaves its count, as every path always has.
    - *Each end has its status.* 503 only when nothing is routable or no slot came (below);
      504 only when the last failure was a deadline; 502 otherwise.
    - *A slot per try, given back once* (``lb.limits``, ``LB_REPLICA_MAXCONN``). The replica
      tried takes a slot as it becomes the one tried (``slotted``); when none is free the driver
      ``queue``s for one and is told by ``waited`` to TRY or GIVE_UP (503, ``Retry-After``:
      not a failure of the replica, nothing suspected, no next replica). The slot goes back as
      the walk leaves the replica (``told``, as the in-flight count) or in ``abandon``.

    Hedging (``lb.hedging``): a driver whose try has had no answer within ``hedge_after()``
    calls ``hedge()``: within the budget (no token needed when its replica has become a
    suspect or ejected meanwhile) and the ``1 + LB_RETRIES`` limit, the next replica
    along the same walk becomes ``replica`` (TRY it) while the first stays in flight as
    ``pending``; at most one is pending. ``told`` then names the try it reports
    (``replica=``): an answer from either is DONE. ``SUSPECT_AFTER`` pending tries in a row
    overtaken by hedges that took a token (no answer from the replica between) make their
    replica a suspect (``Hedging.overtaken``); a lost try counts neither towards ejection
    nor as a success, and a hedge that lost counts for nothing. A failure of one while the
    other is in flight is the failed replica's as usual, and WAIT: the other's outcome decides.

    Hedges and slots: each try in flight holds its own slot (``slotted`` for ``replica``,
    ``pending_slotted`` for ``pending``), given back once: when its outcome is told, when it
    lost (at the winner's ``told(ANSWERED)``: the driver closes it), or in ``abandon``. A hedge
    goes only to a next candidate with a slot free now, never into its queue (it exists to
    save time): with none, no hedge, no token spent, and it is asked again a deadline later
    (as after a refusal by the budget). A queue wait happens only with no try in flight (the
    first try, or the next one after both failed), so the hedge deadline counts from a send.
    """

    __slots__ = ("_began", "_choices", "_hedgeable", "_hedges", "_paid", "_refusals", "error",
                 "events", "key", "pending", "pending_slotted", "replica", "resent", "router",
                 "slotted", "table", "tried", "waiter")

    def __init__(self, router: Router, table: RoutingTable, key: int,
                 events: RouterEvents) -> None:
        self.router = router
        self.table = table
        self.key = key
        self.events = events
        self.tried: list[str] = []  # hostnames, in the order tried
        self.replica: Replica | None = None  # the one being tried
        self.resent = False  # ... sent once more on a new connection already
        self.error: ApiError | None = None  # the answer, once GIVE_UP
        self._choices: Iterator[Replica] | None = None  # the walk, made at its first use
        self._began = 0.0
        self.slotted = False  # ``replica``'s slot is this request's (lb.limits)
        self.waiter: Waiter | None = None  # ... queued for one
        self.pending: Replica | None = None  # a try overtaken by a hedge, still in flight
        self.pending_slotted = False  # ... and ``pending``'s slot is this request's
        self._hedgeable = True  # no hedge refused for the try in flight
        self._paid = False  # the hedge in flight took a token
        self._refusals = 0  # hedges refused (budget, no slot) for the try in flight
        self._hedges = 0  # hedges sent for this request

    @property
    def empty(self) -> bool:
        """No replica is routable at all."""
        return not self.table.by_id

    def first(self) -> Replica | None:
        """The key's own replica, when finding it takes no walk (the usual request: see
        ``Router.first_choice``), now the one tried; None when the walk is needed (then
        ``start``)."""
        replica = self.router.first_choice(self.table, self.key)
        if replica is not None:
            self._trying(replica)
        return replica

    def start(self) -> Step:
        """The first step: TRY ``replica``, or GIVE_UP (503: nothing routable)."""
        if self.replica is not None or self.tried:
            raise RuntimeError("the walk has started already")
        if not self.table.by_id:
            self.error = ApiError(503, "No replica available to serve the request")
            return GIVE_UP
        if self.first() is not None:
            return TRY
        return self._next()

    def told(self, outcome: Outcome, error: BaseException | None = None,
             status: int = 0, replica: Replica | None = None) -> Step:
        """How the try at ``replica`` (by default the one in ``replica``; with a hedge in
        flight, either) ended (``status``: the answer's, ``error``: the failure reported),
        and what to do next."""
        if self.pending is not None:
            return self._told_hedged(outcome, error, status, replica)
        replica = self.replica
        if replica is None:
            raise RuntimeError(f"told {outcome} with no replica being tried")
        router = self.router
        if outcome is ANSWERED:
            self.replica = None
            if self.slotted:
                self.slotted = False
                router.limits.release(replica.hostname)
            if router.settings.bounded_load:  # (the counts' only use: no call without it)
                router.count(replica.hostname, -1)
            if status < 500:  # the supervisor's evidence that it serves (lb.evidence)
                router.answered[replica.hostname] = router.answered.get(replica.hostname, 0) + 1
            ejections = router.ejections
            if status >= 500 or ejections.streaks:  # (else nothing to count or to reset)
                ejections.answered(replica.hostname, status, len(self.table.by_id))
            seconds = time.perf_counter() - self._began
            hedging = router.hedging
            if hedging.share:
                hedging.observe(seconds)
                if hedging.losses:
                    hedging.losses.pop(replica.hostname, None)
            # (a hedge is not a retry: counted apart, lb_hedges_total)
            self.events.forwarded(replica, status, seconds, len(self.tried) - 1 - self._hedges)
            return DONE
        if outcome is STALE and not self.resent:
            self.resent = True
            return RESEND
        self.replica = None
        if self.slotted:
            self.slotted = False
            router.limits.release(replica.hostname)
        self._failed(replica, outcome, error)
        if outcome in FINAL_FAILURES:
            return self._exhausted(outcome)
        return self._next(outcome)

    def _failed(self, replica: Replica, outcome: Outcome, error: BaseException | None) -> None:
        router = self.router
        if router.settings.bounded_load:
            router.count(replica.hostname, -1)
        router.suspect(replica)
        router.ejections.failed(replica.hostname, len(self.table.by_id))
        self.events.unreachable(replica, error or ConnectionError(outcome.value))

    # -- hedging ---------------------------------------------------------------------------------
    def hedge_after(self) -> float:
        """Seconds after its send the try in flight may go unanswered before ``hedge()``
        (one more deadline for each refusal by the budget: by then its replica may be known
        failing); 0: no hedge for it (hedging off, a hedge in flight already, the try still
        waiting for a slot, no replica left to hedge to)."""
        if (self.pending is not None or not self._hedgeable or self.replica is None
                or not self.slotted  # not in flight: it waits for a slot (lb.limits)
                or len(self.tried) >= 1 + self.router.settings.retries):
            return 0.0
        return self.router.hedging.after * (1 + self._refusals)

    def hedge(self) -> Replica | None:
        """The try in flight had no answer in time: the next replica along the walk, now
        ``replica`` (send it the request too; the first stays in flight as ``pending``), or
        None (the budget is spent, the next candidate has no free slot, or no replica is left:
        wait for the first)."""
        first = self.replica
        if not self.hedge_after() or first is None:
            return None
        router = self.router
        hedging = router.hedging
        # A try at a replica found failing since it was sent (a suspect, or ejected) moves
        # off it without a token: that costs no replica work twice, and a hang's requests
        # in flight outnumber any small burst.
        free = router.failing(first.hostname)
        self._paid = not free
        if not free and not hedging.allow():
            self.events.hedge_refused()
            self._refusals += 1  # asked again a deadline later
            return None
        choices = self._choices
        if choices is None:
            choices = self._choices = self.router.choices(self.table, self.key, self.tried)
        for replica in choices:
            if replica.hostname in self.tried:
                continue
            limits = router.limits
            if limits.maxconn and not limits.take(replica.hostname):
                # No slot free there now: a hedge never queues (it exists to save time). The
                # candidate stays next along the walk; asked again a deadline later.
                self._choices = itertools.chain((replica,), choices)
                self._refusals += 1
                break
            self.pending, self.pending_slotted = first, self.slotted
            self._hedges += 1
            self._trying(replica, taken=True)
            self.events.hedged(replica)
            return replica
        else:
            self._hedgeable = False  # no replica left to hedge to
        if not free:
            hedging.tokens += 1.0  # not spent after all
        return None

    def _told_hedged(self, outcome: Outcome, error: BaseException | None, status: int,
                     replica: Replica | None) -> Step:
        """``told`` with two tries in flight: ``replica`` names the one that ended."""
        hedge, first = self.replica, self.pending
        assert hedge is not None and first is not None
        if replica is None or replica.hostname not in (hedge.hostname, first.hostname):
            raise RuntimeError(f"told {outcome} of a replica not in flight")
        ended_first = replica.hostname == first.hostname
        other = hedge if ended_first else first
        # Each try's own slot: the ended one's is ``slotted`` from here on, as ``told`` expects.
        ended_slotted = self.pending_slotted if ended_first else self.slotted
        other_slotted = self.slotted if ended_first else self.pending_slotted
        self.pending, self.pending_slotted = None, False
        self.replica, self.slotted = replica, ended_slotted
        self.resent = True  # a try that raced is not sent once more
        router = self.router
        if outcome is ANSWERED:
            # The loser is closed by the driver: its slot and count go back now, once.
            if other_slotted:
                router.limits.release(other.hostname)
            if router.settings.bounded_load:
                router.count(other.hostname, -1)
            if not ended_first:  # the hedge won: the first had no answer within the deadline
                self.events.hedge_won(replica)
                # (a free hedge's loser was known failing already)
                if self._paid and router.hedging.overtaken(first.hostname):
                    router.suspect(first)
            return self.told(ANSWERED, status=status)
        if self.slotted:
            self.slotted = False
            router.limits.release(replica.hostname)
        if outcome is STALE:  # a kept-alive connection's close: not the replica's failure
            if router.settings.bounded_load:
                router.count(replica.hostname, -1)
        else:
            self._failed(replica, outcome, error)
        self.replica, self.slotted = other, other_slotted  # the other try goes on alone
        self._hedgeable = False
        return WAIT

    def _next(self, outcome: Outcome | None = None) -> Step:
        """The next replica along the walk not tried yet, or GIVE_UP."""
        if len(self.tried) < 1 + self.router.settings.retries:
            choices = self._choices
            tried = self.tried
            if choices is None:
                choices = self._choices = self.router.choices(self.table, self.key, tried)
            for replica in choices:
                if replica.hostname not in tried:
                    self._trying(replica)
                    return TRY
        return self._exhausted(outcome)

    def _trying(self, replica: Replica, taken: bool = False) -> None:
        """``replica`` becomes the one tried (``taken``: its slot is taken already)."""
        self.replica = replica
        self.resent = False
        limits = self.router.limits
        self.slotted = taken or not limits.maxconn or limits.take(replica.hostname)
        self._hedgeable = True
        self._refusals = 0
        self.tried.append(replica.hostname)
        if self.router.settings.bounded_load:
            self.router.count(replica.hostname, +1)
        self._began = time.perf_counter()

    # -- a slot at the replica (lb.limits): only when ``slotted`` is False after TRY ------------
    def queue(self, wake: Callable[[], object]) -> Waiter | None:
        """``replica`` is at its limit: queue for a slot there, ``wake`` called when the wait
        ends by another's hand. None when the queue is full: GIVE_UP, ``error`` the 503."""
        replica = self.replica
        assert replica is not None and not self.slotted
        limits = self.router.limits
        self.waiter = limits.wait(replica.hostname, wake)
        if self.waiter is None:
            self._refused(limits.full(replica.hostname))
        return self.waiter

    def waited(self) -> Step:
        """The wait is over (woken, or its time ran out): TRY with the slot, or GIVE_UP with
        the 503. Waiting for a slot is no failure of the replica: not suspected, not counted
        towards ejection, and not a reason to move the overload to the next replica."""
        waiter, self.waiter = self.waiter, None
        assert waiter is not None and self.replica is not None
        limits = self.router.limits
        if limits.leave(waiter):
            self.slotted = True
            return TRY
        return self._refused(limits.timed_out(self.replica.hostname))

    def abandon(self) -> None:
        """The driver stops before the walk's end (its client left, a bug, shutdown): its
        slots (both tries' when hedged), or its place in the queue, are given back. Harmless after DONE or GIVE_UP."""
        replica, waiter, self.waiter = self.replica, self.waiter, None
        limits = self.router.limits
        if waiter is not None and limits.leave(waiter):
            self.slotted = True
        if self.slotted and replica is not None:
            self.slotted = False
            limits.release(replica.hostname)
        pending = self.pending
        if self.pending_slotted and pending is not None:  # a hedged try in flight too
            self.pending_slotted = False
            limits.release(pending.hostname)

    def _refused(self, error: ApiError) -> Step:
        replica = self.replica
        assert replica is not None
        self.replica = None
        if self.router.settings.bounded_load:
            self.router.count(replica.hostname, -1)
        self.error = error
        return GIVE_UP

    def _exhausted(self, outcome: Outcome | None) -> Step:
        """No further replica will be tried: 504 when the last one tried timed out, 502 when
        it could not be reached or broke the protocol."""
        self.events.exhausted(self.tried)
        tried = ", ".join(self.tried)
        if outcome in LATE:
            self.error = ApiError(504, f"No replica answered in time (tried {tried})")
        else:
            self.error = ApiError(502, f"No replica could serve the request (tried {tried})")
        return GIVE_UP
