"""etcd v3, the registry store that several balancers and supervisors on several hosts share.

The one seam to etcd is ``Etcd``: the members' JSON gateway (``/v3/...``) through ``etcd3gw``,
tried member after member until an operation's deadline, so one member's loss (the etcd leader
included) costs a retry, not an error. Everything else speaks in its four verbs: ``get``,
``txn``, leases and ``watch``.

The registry is one key, ``<prefix>/state``, holding the same JSON document as the file store.
A read-modify-write (``EtcdRegistry.update``):

1. takes the write lock, ``<prefix>/lock``, created only if absent and tied to a short lease, so
   writers queue as they do on the file's lock and a writer that dies frees it within seconds;
2. reads the state and its revision, lets the caller change it;
3. writes it in one transaction that compares the state's revision with the one read, the lock
   with the one taken, and, for a supervisor, the leader key with the one it won (``fence``).

So an update is never lost, and a writer that lost its lock (a pause longer than the lease) or
a supervisor that lost its leadership writes nothing. When the outcome of a write is unknown (a
member died while answering), the key is read back: the new bytes there mean it landed; else
the write is sent again with the same comparisons, which can succeed once at most.

Balancers learn of changes through a watch on the key (``EtcdView``), in a thread of each
worker; routing reads the state that thread last applied and never talks to etcd. The watch is
re-made from a fresh read every ``WATCH_IDLE`` seconds, which also notices a cluster that lost
its quorum: routing then goes on with the last state (fail static), as with a broken file.

One supervisor acts (``Leadership``): the one that created ``<prefix>/leader`` under its lease.
It keeps the lease alive, and trusts its leadership only until the lease could have run out
as seen from its own clock; its registry writes are fenced by the leader key.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import etcd3gw
import requests
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from lb.evidence import parse_counts
from lb.registry import (
    FailStatic,
    RegistryBusy,
    RegistryError,
    RegistryMissing,
    RegistryUnreadable,
    RegistryWriteUnknown,
    State,
    parse_state,
    queued,
)
from lb.settings import ETCD_SCHEME as SCHEME
from lb.settings import EtcdAddress

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (0.5, 1.0)  # connect, read: a hung member moves us on to the next in 1 s
LOCK_TTL = 5  # seconds a dead writer can hold the write lock (blocks under it take milliseconds)
# Seconds a quiet watch lasts before a fresh read re-makes it: a hung member's stream goes
# quiet without breaking, so this bounds how long a balancer can follow one.
WATCH_IDLE = 2.0
# A balancer worker's answers key (lb.evidence) outlives the worker by at most this many seconds;
# publishing and reading them gives up after ANSWERS_DEADLINE (a tick without evidence).
ANSWERS_TTL = 15
ANSWERS_DEADLINE = 1.0
T = TypeVar("T")


class EtcdUnreachable(RegistryError):
    """No member answered in time, or the cluster has no quorum."""

    summary = "the replica registry (etcd) cannot be reached"


class NotLeader(RegistryError):
    """A fenced write was refused: this supervisor no longer leads."""

    summary = "this supervisor no longer leads"


def is_etcd(url: str) -> bool:
    return url.startswith(SCHEME)


# -- the seam ---------------------------------------------------------------------------------------
def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def mod_is(key: str, revision: int) -> dict[str, Any]:
    """Compare: ``key`` was last written at ``revision`` (0: it does not exist)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": revision}


def created_is(key: str, revision: int) -> dict[str, Any]:
    """Compare: ``key`` was created at ``revision`` (0: it does not exist)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE",
            "create_revision": revision}


def put(key: str, value: bytes, lease: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = lease
    return {"request_put": request}


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


@dataclass(frozen=True)
class Value:
    """A key as read: its bytes (None when absent) and revisions."""

    data: bytes | None
    mod_revision: int
    create_revision: int
    revision: int  # the store's revision when it was read


class Etcd:
    """The members' JSON gateway, tried in turn until an operation's deadline."""

    def __init__(self, endpoints: tuple[tuple[str, int], ...], deadline: float = 10.0) -> None:
        self.endpoints = endpoints
        self.deadline = deadline
        # requests takes (connect, read); etcd3gw's annotation says a number.
        self._clients = [etcd3gw.Etcd3Client(host=h, port=p, api_path="/v3/",
                                             timeout=REQUEST_TIMEOUT)  # type: ignore[arg-type]
                         for h, p in endpoints]
        for client in self._clients:
            client.session.trust_env = False  # never through a proxy from the environment
        self._first = 0  # the member that answered last: tried first next time

    def _call(self, op: Callable[[etcd3gw.Etcd3Client], T], what: str,
              deadline: float | None = None) -> T:
        """``op`` on one member after another until one answers or the deadline passes.
        A member that refuses or answers with an error (no leader, no quorum) is skipped."""
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        problem = ""
        while True:
            for i in range(len(self._clients)):
                index = (self._first + i) % len(self._clients)
                try:
                    result = op(self._clients[index])
                except (Etcd3Exception, requests.RequestException, ValueError) as exc:
                    problem = f"{self._name(index)}: {_brief(exc)}"
                    continue
                self._first = index
                return result
            if time.monotonic() >= end:
                members = ", ".join(self._name(i) for i in range(len(self._clients)))
                raise EtcdUnreachable(f"cannot reach etcd at {members} ({what}: {problem})",
                                      "no member answered in time")
            time.sleep(0.05 + random.random() * 0.05)

    def _name(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"{host}:{port}"

    def get(self, key: str, deadline: float | None = None) -> Value:
        """A linearizable read: what a quorum agrees is there now."""
        reply = self._call(lambda c: c.post(c.get_url("/kv/range"), json={"key": _b64(key)}),
                           "read", deadline)
        revision = int(reply["header"]["revision"])
        kvs = reply.get("kvs") or []
        if not kvs:
            return Value(None, 0, 0, revision)
        kv = kvs[0]
        return Value(_unb64(kv.get("value", "")), int(kv["mod_revision"]),
                     int(kv["create_revision"]), revision)

    def get_prefix(self, prefix: str, deadline: float | None = None) -> dict[str, bytes]:
        """Every key that begins with ``prefix`` and its value (a linearizable read)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # etcd's range_end for "begins with"
        body = {"key": _b64(prefix), "range_end": _b64(end)}
        reply = self._call(lambda c: c.post(c.get_url("/kv/range"), json=body), "read",
                           deadline)
        return {_unb64(kv["key"]).decode(): _unb64(kv.get("value", ""))
                for kv in reply.get("kvs") or []}

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None,
            deadline: float | None = None) -> tuple[bool, int]:
        """Whether every comparison held (then ``success`` ran), and the store's revision.
        Sent again to another member when one fails: callers make that harmless."""
        body = {"compare": compare, "success": success, "failure": failure or []}
        reply = self._call(lambda c: c.post(c.get_url("/kv/txn"), json=body), "write",
                           deadline)
        return bool(reply.get("succeeded", False)), int(reply["header"]["revision"])

    def grant(self, ttl: int) -> int:
        reply = self._call(lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": ttl}),
                           "lease grant")
        return int(reply["ID"])

    def keep_alive(self, lease: int, deadline: float | None = None) -> int:
        """Seconds the lease has left after this refresh; 0 when it has run out."""
        reply = self._call(lambda c: c.post(c.get_url("/lease/keepalive"), json={"ID": lease}),
                           "lease keep-alive", deadline)
        return int(reply.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End a lease and delete its keys; best effort (it runs out by itself anyway)."""
        def op(client: etcd3gw.Etcd3Client) -> None:
            try:
                client.post(client.get_url("/kv/lease/revoke"), json={"ID": lease})
            except Etcd3Exception as exc:
                if "lease not found" not in (exc.detail_text or ""):
                    raise  # gone already: what a revoke wants

        try:
            self._call(op, "lease revoke", deadline=1.0)
        except EtcdUnreachable as exc:
            log.debug("lease %x not revoked: %s", lease, exc)

    def raft_leader(self) -> int | None:
        """The index of the member that leads etcd's raft, from the members' own status."""
        for i, client in enumerate(self._clients):
            try:
                status = client.status()
            except (Etcd3Exception, requests.RequestException, ValueError):
                continue  # a member down says nothing
            if status["header"]["member_id"] == status.get("leader"):
                return i
        return None

    def watch(self, key: str, start_revision: int, idle: float) -> Iterator[Value]:
        """The key's changes from ``start_revision`` on, from the member that answered last,
        until ``idle`` seconds pass without one (then it ends) or the stream breaks (then it
        raises EtcdUnreachable)."""
        client = self._clients[self._first]
        body = {"create_request": {"key": _b64(key), "start_revision": start_revision}}
        session = requests.Session()
        session.trust_env = False
        try:
            reply = session.post(client.get_url("/watch"), json=body, stream=True,
                                 timeout=(REQUEST_TIMEOUT[0], idle))
            for line in reply.iter_lines():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("canceled") or result.get("compact_revision"):
                    raise EtcdUnreachable(f"etcd watch of {key} ended: {result}",
                                          "the watch was cancelled")
                for event in result.get("events", ()):
                    kv = event["kv"]
                    deleted = event.get("type") == "DELETE"
                    yield Value(None if deleted else _unb64(kv.get("value", "")),
                                int(kv.get("mod_revision", 0)),
                                int(kv.get("create_revision", 0)),
                                int(result["header"]["revision"]))
        except requests.exceptions.ConnectionError as exc:
            if "Read timed out" in str(exc):
                return  # quiet for ``idle`` seconds: the caller reads afresh
            raise EtcdUnreachable(f"etcd watch of {key} broke: {_brief(exc)}",
                                  "the watch broke") from exc
        except (requests.RequestException, ValueError) as exc:
            raise EtcdUnreachable(f"etcd watch of {key} broke: {_brief(exc)}",
                                  "the watch broke") from exc
        finally:
            session.close()


def _brief(exc: BaseException) -> str:
    """An etcd failure in a few words (requests' own texts run to hundreds of characters)."""
    if isinstance(exc, ConnectionTimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionFailedError):
        return "refused" if "refused" in (exc.detail_text or "").lower() else "connection failed"
    if isinstance(exc, Etcd3Exception):
        detail = exc.detail_text or ""
        try:
            detail = json.loads(detail).get("message", detail)
        except (ValueError, AttributeError):
            pass
        return f"{type(exc).__name__}: {detail[:100]}"
    return f"{type(exc).__name__}: {str(exc)[:100]}"


# -- the store --------------------------------------------------------------------------------------
class Fence:
    """Extra comparisons a store's writes must pass (a supervisor's leadership)."""

    def compares(self) -> list[dict[str, Any]]:
        return []

    def holds(self) -> bool:
        return True


class EtcdRegistry:
    """The registry as the key ``<prefix>/state``; see the module's text for the protocol."""

    kind = "etcd"

    def __init__(self, address: EtcdAddress, lock_timeout: float = 10.0,
                 fence: Fence | None = None, etcd: Etcd | None = None) -> None:
        self.address = address
        self.lock_timeout = lock_timeout
        self.fence = fence or Fence()
        self.etcd = etcd or Etcd(address.endpoints, deadline=lock_timeout)
        self.state_key = address.prefix + "/state"
        self.lock_key = address.prefix + "/lock"
        self.leader_key = address.prefix + "/leader"
        self.answers_prefix = address.prefix + "/answers/"  # evidence of life (lb.evidence)
        self._thread_lock = threading.Lock()
        self._held: int | None = None  # the create revision of our lock key while we hold it
        # source -> the lease of its answers key, and when it was granted or refreshed last
        self._answers_leases: dict[str, tuple[int, float]] = {}

    @property
    def where(self) -> str:
        return str(self.address)

    def fenced(self, fence: Fence) -> EtcdRegistry:
        """The same registry, its writes fenced by ``fence``."""
        return EtcdRegistry(self.address, self.lock_timeout, fence, self.etcd)

    # -- reading ------------------------------------------------------------------------------
    def get(self) -> Value:
        return self.etcd.get(self.state_key)

    def exists(self) -> bool:
        return self.get().data is not None

    def read_bytes(self) -> bytes:
        value = self.get()
        if value.data is None:
            raise RegistryMissing(f"no registry at {self.where}")
        return value.data

    def read(self) -> State:
        return self.parse(self.read_bytes())

    def parse(self, raw: bytes) -> State:
        return parse_state(raw, self.where)

    def view(self) -> EtcdView:
        return EtcdView(self)

    # -- evidence of life (lb.evidence): a key per balancer worker, under its own lease -------
    def publish_answers(self, source: str, counts: Mapping[str, int]) -> None:
        """Put ``source``'s counters under a lease of ``ANSWERS_TTL`` seconds, refreshed here,
        so a worker that died takes its key with it. Never under the write lock."""
        now = time.monotonic()
        try:
            lease, kept = self._answers_leases.get(source, (0, now))
            if not lease:
                lease = self.etcd.grant(ANSWERS_TTL)
            elif now - kept > ANSWERS_TTL / 3:
                if self.etcd.keep_alive(lease, ANSWERS_DEADLINE) <= 0:
                    lease = self.etcd.grant(ANSWERS_TTL)  # it ran out: a new one
                kept = now
            self._answers_leases[source] = (lease, kept)
            self.etcd.txn([], [put(self.answers_prefix + source, json.dumps(counts).encode(),
                                   lease)], deadline=ANSWERS_DEADLINE)
        except RegistryError:
            self._answers_leases.pop(source, None)  # maybe gone: the next try takes a new one
            raise

    def withdraw_answers(self, source: str) -> None:
        lease, _ = self._answers_leases.pop(source, (0, 0.0))
        if lease:
            self.etcd.revoke(lease)  # deletes the key with it

    def read_answers(self) -> dict[str, dict[str, int]]:
        """Every live worker's counters (unreadable values ignored)."""
        found: dict[str, dict[str, int]] = {}
        for key, raw in self.etcd.get_prefix(self.answers_prefix, ANSWERS_DEADLINE).items():
            try:
                counts = parse_counts(json.loads(raw))
            except ValueError:
                continue
            if counts is not None:
                found[key[len(self.answers_prefix):]] = counts
        return found

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """The write lock: this process's threads queue on a plain lock, processes on the key."""
        began = time.monotonic()
        with queued(self._thread_lock, self.lock_timeout, self.where):
            lease = None
            try:
                lease = self.etcd.grant(LOCK_TTL)
                self._held = self._take_lock(lease, began + self.lock_timeout)
                yield
            finally:
                self._held = None
                if lease is not None:
                    self.etcd.revoke(lease)  # deletes the lock key with it

    def _take_lock(self, lease: int, end: float) -> int:
        """Create the lock key under ``lease``; its create revision. Waits while another
        holds it."""
        mine = f"{uuid.uuid4().hex}".encode()
        wait = 0.01
        while True:
            ok, revision = self.etcd.txn([created_is(self.lock_key, 0)],
                                         [put(self.lock_key, mine, lease)])
            if ok:
                return revision
            found = self.etcd.get(self.lock_key)
            if found.data == mine:  # our first try landed, its answer was lost
                return found.create_revision
            if time.monotonic() >= end:
                raise RegistryBusy(f"registry lock {self.lock_key} not acquired in "
                                   f"{self.lock_timeout}s")
            time.sleep(wait * (1 + random.random()))
            wait = min(0.1, wait * 2)

    @contextmanager
    def update(self) -> Iterator[State]:
        """Read, let the caller change the state, write it back if it changed; all under the
        write lock, the write compared with the revision read. An exception inside the block
        writes nothing."""
        with self.locked():
            value = self.get()
            if value.data is None:
                raise RegistryMissing(f"no registry at {self.where}")
            state = self.parse(value.data)
            before = json.dumps(state.to_dict(), sort_keys=True)
            yield state
            if json.dumps(state.to_dict(), sort_keys=True) != before:
                state.version += 1
                self._write(state, value.mod_revision)

    def _write(self, state: State, read_at: int) -> None:
        """One transaction: the new state if the key is still at ``read_at``, the lock ours
        and the fence holds."""
        if not self.fence.holds():
            raise NotLeader(f"not written to {self.where}: this supervisor no longer leads")
        data = json.dumps(state.to_dict(), indent=1).encode()
        compare = [mod_is(self.state_key, read_at), *self.fence.compares()]
        if self._held is not None:
            compare.append(created_is(self.lock_key, self._held))
        for _ in range(2):
            try:
                ok, _revision = self.etcd.txn(compare, [put(self.state_key, data)])
            except EtcdUnreachable:
                ok = False  # unknown: what the key holds now says
            if ok:
                return
            try:
                now = self.get()
            except EtcdUnreachable as exc:
                raise RegistryWriteUnknown(f"{exc}; the write to {self.where} may or may not "
                                           "have landed") from exc
            if now.data == data:
                return  # it landed; the reply was lost
            if now.mod_revision != read_at:
                break  # someone else wrote: ours can never land now
        if not self.fence.holds() or self.fence.compares() and not self._fence_holds():
            raise NotLeader(f"write to {self.where} refused: this supervisor no longer leads")
        raise RegistryBusy(f"write to {self.where} refused: the write lock was lost "
                           "(held past its lease?)", "the write lock was lost")

    def _fence_holds(self) -> bool:
        ok, _ = self.etcd.txn(self.fence.compares(), [])
        return ok

    def create(self, state: State, replace: bool = False) -> State:
        """Write ``state`` as the registry unless one exists (or ``replace``); the result."""
        with self.locked():
            value = self.get()
            old_version = 0
            if value.data is not None:
                try:
                    current = self.parse(value.data)
                except RegistryUnreadable:
                    if not replace:
                        raise
                else:
                    if not replace:
                        return current
                    old_version = current.version
            state.version = old_version + 1  # versions never go back, even across a reset
            self._write(state, value.mod_revision)
            return state

    def restore(self, state: State) -> State | None:
        """Write ``state`` if the key is (still) missing or unreadable, keeping an unreadable
        value beside it as ``<prefix>/corrupt-<ns>``; None if it is readable."""
        with self.locked():
            value = self.get()
            if value.data is not None:
                try:
                    self.parse(value.data)
                    return None
                except RegistryUnreadable:
                    aside = f"{self.address.prefix}/corrupt-{time.time_ns()}"
                    self.etcd.txn([], [put(aside, value.data)])
                    log.warning("kept the unreadable registry as %s", aside)
            self._write(state, value.mod_revision)
            return state

    def leader(self) -> str | None:
        """Who leads the supervisors, as the leader key says (None: nobody)."""
        return leader_of(self.etcd.get(self.leader_key, deadline=2.0))


# -- the balancers' view ----------------------------------------------------------------------------
class EtcdView(FailStatic):
    """A process's copy of the registry, kept current by a watch thread (``follow``).

    The same face as the file's ``RegistryView``: ``current()`` for routing (no I/O: the state
    the watch last applied), ``latest()`` for replies about the registry (a fresh read), fail
    static with ``problem`` and ``stale_since`` while etcd cannot be reached.
    """

    def __init__(self, registry: EtcdRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._state: State | None = None
        self._raw = b""
        self.revision = 0  # the etcd revision of the state applied
        self.applied_at: float | None = None  # when this process applied a change last
        self.problem: RegistryError | None = None
        self.stale_since: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    # -- what routing and the replies ask -----------------------------------------------------
    def current(self) -> State:
        """The applied state. No I/O once the watch thread runs (routing calls this on an
        event loop): until it has read a state, this raises what stops it."""
        state = self._state
        if state is not None:
            return state
        if self._thread is not None:
            raise self.problem or EtcdUnreachable(
                f"registry {self.registry.where} not read yet", "not read yet")
        return self.check()

    def check(self) -> State:
        """The applied state; a read when there is none yet."""
        if self._state is None:
            self.refresh()
        if self._state is None:
            assert self.problem is not None
            raise self.problem
        return self._state

    def latest(self) -> State:
        """A fresh read, applied; raises while etcd cannot be reached."""
        self.refresh()
        if self.problem is not None or self._state is None:
            raise self.problem or RegistryMissing(f"no registry at {self.registry.where}")
        return self._state

    @property
    def written_at(self) -> float | None:
        """When the last change was applied here (the watch applies writes as they happen)."""
        return self.applied_at

    def watch(self, watched: bool) -> None:
        """The file view's switch; this view is always watched once it follows."""

    def changed(self) -> None:
        """The file view's nudge; the watch applies changes itself."""

    # -- keeping it current -------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the key and apply what it holds; on failure note the problem (fail static)."""
        try:
            value = self.registry.get()
        except EtcdUnreachable as exc:
            self._stale(exc)
            return
        self.apply(value)

    def apply(self, value: Value) -> None:
        """A value of the state key, read or watched; older revisions than applied are
        ignored (a read and the watch may race)."""
        with self._lock:
            if value.mod_revision and value.mod_revision < self.revision:
                return
            if value.data is None:
                self._stale(RegistryMissing(f"no registry at {self.registry.where}"))
                return
            if value.data != self._raw or self._state is None:
                try:
                    state = self.registry.parse(value.data)
                except RegistryUnreadable as exc:
                    self.revision = value.mod_revision
                    self._stale(exc)
                    return
                self._state, self._raw = state, value.data
                self.applied_at = time.time()
            self.revision = max(self.revision, value.mod_revision)
            self._fresh()

    def follow(self, interval: float = 0.0) -> None:
        """Start the watch thread (once): a fresh read, then the key's changes, then again.
        A first read happens here, before it returns, if none has yet."""
        if self._thread is not None:
            return
        if self._state is None:
            self.refresh()
        self._thread = threading.Thread(target=self._follow, name="registry-watch",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()

    def _follow(self) -> None:
        wait = 0.1
        while not self._closed.is_set():
            try:
                value = self.registry.get()
            except EtcdUnreachable as exc:  # nothing answers a read: stale until one does
                self._stale(exc)
                self._closed.wait(wait)
                wait = min(2.0, wait * 2)
                continue
            self.apply(value)
            wait = 0.1
            try:
                for change in self.registry.etcd.watch(self.registry.state_key,
                                                       value.revision + 1, WATCH_IDLE):
                    self.apply(change)
                    if self._closed.is_set():
                        return
            except EtcdUnreachable as exc:
                # The member it watched through went away: the next read finds another, and
                # only if none answers is the view stale.
                log.info("%s; reading afresh", exc)
                self._closed.wait(0.05)

    @property
    def where(self) -> str:
        return self.registry.where


# -- one acting supervisor --------------------------------------------------------------------------
class Leadership(Fence):
    """An election on ``<prefix>/leader``: the supervisor that created it under its lease leads
    until the lease runs out. ``holds()`` is this process's own, conservative answer (no I/O):
    the lease was refreshed less than ``ttl`` ago minus a margin, measured from when the
    refresh was sent, on the monotonic clock, which a SIGSTOP does not stop."""

    MARGIN = 0.25  # of the TTL: clocks of two machines may run at slightly different rates

    def __init__(self, etcd: Etcd, key: str, ttl: int, identity: str) -> None:
        self.etcd = etcd
        self.key = key
        self.ttl = ttl
        self.identity = identity
        self._lease: int | None = None
        self._created = 0  # the leader key's create revision: the fencing token
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()

    def holds(self) -> bool:
        return self._lease is not None and time.monotonic() < self._valid_until

    def compares(self) -> list[dict[str, Any]]:
        return [created_is(self.key, self._created)]

    @property
    def token(self) -> int:
        return self._created

    def campaign(self) -> bool:
        """Try once to lead: True when this process leads now."""
        if self.holds():
            return True
        self.step_down()
        sent = time.monotonic()
        lease = self.etcd.grant(self.ttl)
        # The key names this campaign, not only this process: a key left by an earlier
        # campaign of ours (its lease about to run out) must not pass for a win.
        mine = f"{self.identity} {uuid.uuid4().hex[:12]}".encode()
        try:
            ok, revision = self.etcd.txn([created_is(self.key, 0)],
                                         [put(self.key, mine, lease)])
            if not ok:
                found = self.etcd.get(self.key)
                ok = found.data == mine  # our first try landed, its answer was lost
                revision = found.create_revision
        except EtcdUnreachable:
            self.etcd.revoke(lease)
            raise
        if not ok:
            self.etcd.revoke(lease)
            return False
        with self._lock:
            self._lease, self._created = lease, revision
            self._valid_until = sent + self.ttl * (1 - self.MARGIN)
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, args=(lease,), name="leader-lease",
                                        daemon=True)
        self._keeper.start()
        return True

    def _keep(self, lease: int) -> None:
        """Refresh the lease three times a TTL while it is ours."""
        while not self._stop.wait(self.ttl / 3):
            sent = time.monotonic()
            try:
                left = self.etcd.keep_alive(lease, deadline=self.ttl / 3)
            except EtcdUnreachable as exc:
                log.warning("could not refresh the leader lease: %s", exc)
                continue  # holds() lapses by itself when this goes on
            with self._lock:
                if self._lease != lease:
                    return
                if left <= 0:
                    log.warning("the leader lease ran out: standing by")
                    self._lease = None
                    return
                self._valid_until = sent + min(left, self.ttl) * (1 - self.MARGIN)

    def step_down(self) -> None:
        """Stop leading (a refused write, a stop): the lease and the key go."""
        self._stop.set()
        with self._lock:
            lease, self._lease = self._lease, None
            self._valid_until = 0.0
        if lease is not None:
            self.etcd.revoke(lease)

    def leader(self) -> str | None:
        return leader_of(self.etcd.get(self.key, deadline=2.0))


def leader_of(value: Value) -> str | None:
    """The leading supervisor's identity ("host:pid") from the leader key's value."""
    if value.data is None:
        return None
    return value.data.decode("utf-8", "replace").partition(" ")[0]
