"""The replica registry: one JSON file shared by the balancer's workers and the supervisor.

Every read-modify-write happens under one ``filelock.FileLock`` on a separate ``.lock`` file and
ends with an atomic replace (temp file in the same folder, fsync, ``os.replace``), so a reader
never sees half a file and a writer killed at any point leaves the old state or the new one.
Readers take no lock. ``version`` grows by one with every write.

Errors say two things: ``str(exc)`` names the file, for logs; ``exc.reason`` says what is wrong
without naming it, for replies to clients.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from enum import StrEnum
from typing import Any, Protocol

import filelock

from lb import leases
from lb.evidence import STALE_SECONDS, parse_counts
from lb.hashring import PROBING, HashRing, RingError, resolve_preset
from lb.leases import Lease, Purpose
from lb.strategies import MAX_WEIGHT, Lookup, build_lookup

log = logging.getLogger(__name__)


class ReplicaState(StrEnum):
    """Where a registry entry is in its life."""

    STARTING = "starting"  # wanted; its replica is being started, or has not answered yet
    READY = "ready"  # answering its heartbeats: requests go to it
    DOWN = "down"  # its replica is gone, stopped answering or never did: to be started again
    REMOVING = "removing"  # an /rm is stopping it: no longer wanted, never started again


STARTING, READY, DOWN, REMOVING = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DOWN,
                                   ReplicaState.REMOVING)


class RegistryError(Exception):
    """Root of the registry's errors: ``str()`` for logs, ``reason`` for clients (no path)."""

    summary = "the replica registry cannot be used"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.summary} ({self.detail})" if self.detail else self.summary


class RegistryBusy(RegistryError):
    """The lock could not be had in time."""

    summary = "the replica registry is locked"


class RegistryUnreadable(RegistryError):
    """The file cannot be used as a registry: it is missing or corrupt."""


class RegistryCorrupt(RegistryUnreadable):
    """The file exists but is not a registry (or cannot be read)."""

    summary = "the replica registry file is corrupt"


class RegistryMissing(RegistryUnreadable):
    """No registry file."""

    summary = "the replica registry file is missing"


class RegistryWriteUnknown(RegistryError):
    """A write was sent and nothing could confirm or rule out that it was applied (the store
    became unreachable meanwhile): it may yet be."""

    summary = "the replica registry did not confirm a write"


class RegistryUnwritable(RegistryError):
    """The registry (its folder, its lock or its file) cannot be written."""

    summary = "the replica registry cannot be written"


def _what(exc: Exception) -> str:
    """What ``State.from_dict`` found wrong, briefly."""
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r}" if exc.args else "a field is missing"
    if isinstance(exc, ValueError):
        return str(exc)[:80]
    return "a field has the wrong type"


class Placement(Protocol):
    """Where a started replica runs, as a backend tells it (``lb.backends.Instance``)."""

    @property
    def handle(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def domain(self) -> str | None: ...


def _oserror_detail(exc: OSError) -> str:
    """An OSError without the file name it carries."""
    return exc.strerror or type(exc).__name__


@dataclass
class Replica:
    """One member of the desired replica set."""

    hostname: str
    server_id: int
    slots: list[int]
    state: ReplicaState = STARTING
    address: str | None = None  # base URL, e.g. http://127.0.0.1:41234
    handle: str | None = None  # backend's own id: "pid/token", a container or service id
    # The failure domain its replica runs in (a Swarm node's hostname); None when unknown or
    # when every replica shares one host (local processes, one Docker engine). Written to the
    # document only when set, so documents without domains read and write as before.
    domain: str | None = None
    # Its share of the keys relative to the others' (lb.strategies); 0 drains it: routed
    # nothing new while it answers what it has. Written only when not 1.
    weight: int = 1
    # Wall-clock time it last became ready (an /add, a replacement, a recovery): slow start
    # ramps its share from then (lb.slowstart). Written only when known.
    ready_since: float | None = None
    last_heartbeat: float | None = None
    failures: int = 0  # consecutive missed heartbeats
    restarts: int = 0  # consecutive starts that never became ready
    not_before: float = 0.0  # no (re)start before this time: the crash-loop guard's back-off
    lease: Lease | None = None  # who is acting on this entry, what for, until when
    created: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replica:
        """The entry as the registry file has it; ValueError naming the first bad field, or
        TypeError for a field that is not an entry's."""
        fields = dict(data)
        lease = leases.from_fields(fields.pop("owner", None), fields.pop("deadline", None))
        try:
            state = ReplicaState(fields.pop("state", STARTING))
        except ValueError:
            raise ValueError("bad state") from None
        replica = cls(**fields, state=state, lease=lease)
        replica.check()
        return replica

    def to_dict(self) -> dict[str, Any]:
        """The entry as the registry file has it: every field in order, the lease as its
        ``owner`` and ``deadline`` fields; ``domain``, ``weight`` and ``ready_since`` only when
        not their default (documents without them read and write as before)."""
        data: dict[str, Any] = {}
        for f in dataclass_fields(self):
            if f.name == "lease":
                data["owner"], data["deadline"] = leases.to_fields(self.lease)
            elif f.name in _OMITTED_AT_DEFAULT and getattr(self, f.name) == f.default:
                continue
            else:
                data[f.name] = getattr(self, f.name)
        data["state"] = str(self.state)
        return data

    def check(self) -> None:
        """Raise ValueError naming the first field whose value cannot be this field's."""
        fields: list[tuple[str, bool]] = [
            ("hostname", isinstance(self.hostname, str) and bool(self.hostname)),
            ("server_id", _is_int(self.server_id) and self.server_id >= 1),
            ("slots", isinstance(self.slots, list) and all(_is_int(s) for s in self.slots)),
            ("weight", _is_int(self.weight) and 0 <= self.weight <= MAX_WEIGHT),
            ("failures", _is_int(self.failures) and self.failures >= 0),
            ("restarts", _is_int(self.restarts) and self.restarts >= 0),
            ("not_before", _is_number(self.not_before)),
            ("created", _is_number(self.created)),
        ]
        fields += [(name, getattr(self, name) is None or isinstance(getattr(self, name), str))
                   for name in ("address", "handle", "domain")]
        fields += [(name, getattr(self, name) is None or _is_number(getattr(self, name)))
                   for name in ("last_heartbeat", "ready_since")]
        for name, ok in fields:
            if not ok:
                raise ValueError(f"bad {name}")

    # -- its lease (lb.leases has the rules) ---------------------------------------------------
    @property
    def held(self) -> bool:
        """Someone (an /add, an /rm, the supervisor) is acting on this entry right now."""
        return self.held_at(time.time())

    def held_at(self, now: float) -> bool:
        return self.lease is not None and self.lease.active(now)

    @property
    def adding(self) -> bool:
        """An ``/add`` in flight is starting this replica (itself or through the supervisor)."""
        return (self.held and self.lease is not None
                and self.lease.purpose in (Purpose.ADD, Purpose.WANT))

    @property
    def wanted(self) -> bool:
        """An ``/add`` asked the supervisor for this replica and has not committed it."""
        return self.lease is not None and self.lease.purpose is Purpose.WANT

    def leased_to(self, holder: str) -> bool:
        """Whether ``holder`` took this entry's lease (running or not) and nobody took it since."""
        return self.lease is not None and self.lease.holder == holder

    def release(self) -> None:
        """End the lease now: the supervisor takes the entry over."""
        if self.lease is not None:
            self.lease = self.lease.released()

    def runs_as(self, placement: Placement) -> None:
        """Its replica was started, and runs where ``placement`` says: every field that says
        where is taken from it, together."""
        self.handle, self.address, self.domain = (placement.handle, placement.address,
                                                  placement.domain)

    def unplaced(self) -> None:
        """No replica runs for it any more (it is to be started afresh): nothing says where."""
        self.handle = self.address = self.domain = None


_OMITTED_AT_DEFAULT = frozenset({"domain", "weight", "ready_since"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RingParams:
    slots: int
    virtual: int
    hash: str
    probing: str

    MOST_SLOTS = 1 << 24  # far beyond any setting; a garbage value must not allocate gigabytes

    def check(self) -> None:
        if not (_is_int(self.slots) and 2 <= self.slots <= self.MOST_SLOTS):
            raise ValueError("bad ring slots")
        if not (_is_int(self.virtual) and 1 <= self.virtual <= self.slots):
            raise ValueError("bad ring virtual")
        if self.probing not in PROBING or not isinstance(self.hash, str):
            raise ValueError("unknown ring probing or hash")
        resolve_preset(self.hash, self.virtual)  # a preset, formulas or a plug-in; or ValueError


@dataclass
class State:
    ring: RingParams
    replicas: list[Replica] = field(default_factory=list)
    version: int = 0

    # -- queries -----------------------------------------------------------------------------
    def find(self, hostname: str) -> Replica | None:
        return next((r for r in self.replicas if r.hostname == hostname), None)

    def members(self) -> list[Replica]:
        """The desired set: everything not on its way out."""
        return [r for r in self.replicas if r.state != REMOVING]

    def routable(self) -> list[Replica]:
        """The replicas that answer: ready, with an address (weight 0 too: it still answers
        what it has, though the lookup gives it nothing new)."""
        return [r for r in self.replicas if r.state == READY and r.address]

    def lookup(self, strategy: str, replicas: list[Replica]) -> Lookup:
        """``strategy``'s lookup over those of ``replicas`` whose weight is not 0, by their
        weights (``lb.strategies``)."""
        weighted = [r for r in replicas if r.weight]
        return build_lookup(strategy, lambda: self.hash_ring(weighted),
                            [r.server_id for r in weighted],
                            {r.server_id: r.weight for r in weighted})

    def hash_ring(self, replicas: list[Replica] | None = None) -> HashRing:
        """The map of ``replicas`` (default: every entry) at their persisted slots."""
        ring = HashRing(self.ring.slots, self.ring.virtual, self.ring.hash, self.ring.probing)
        for r in self.replicas if replicas is None else replicas:
            ring.add(r.server_id, r.slots)
        return ring

    def free_server_ids(self) -> Iterator[int]:
        """Smallest unused positive server ids first (the spec's replicas are 1..N)."""
        used = {r.server_id for r in self.replicas}
        i = 1
        while True:
            if i not in used:
                yield i
            i += 1

    def rep(self) -> dict[str, Any]:
        """The contract's ``/rep`` message."""
        names = [r.hostname for r in self.members()]
        return {"N": len(names), "replicas": names}

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ring": asdict(self.ring),
            "replicas": [r.to_dict() for r in self.replicas],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> State:
        """The state ``data`` describes; ValueError, TypeError or KeyError if it is not one
        (every field's type, unique names, and a hash map the slots fit in are checked: a file
        that parses but is not a registry must not get as far as the routers)."""
        if not _is_int(data["version"]) or not isinstance(data["replicas"], list):
            raise ValueError("bad version or replicas")
        state = cls(ring=RingParams(**data["ring"]), version=data["version"])
        state.ring.check()
        for i, r in enumerate(data["replicas"]):
            try:
                state.replicas.append(Replica.from_dict(r))
            except ValueError as exc:  # by position: a name from a broken file may be anything
                raise ValueError(f"replica {i}: {exc}") from exc
        if len({r.hostname for r in state.replicas}) != len(state.replicas):
            raise ValueError("a hostname is there twice")
        try:
            state.hash_ring()  # slots within the map, none shared, no server id twice
        except (RingError, IndexError) as exc:
            raise ValueError(str(exc)) from exc
        return state


@contextmanager
def queued(lock: threading.Lock, timeout: float, where: str) -> Iterator[None]:
    """A store's writers in this process queue on ``lock`` before the store's own lock (a
    file lock or an etcd key, which do not tell this process's threads apart);
    ``RegistryBusy`` after ``timeout`` seconds."""
    if not lock.acquire(timeout=timeout):
        raise RegistryBusy(f"registry {where} busy in this process for {timeout}s")
    try:
        yield
    finally:
        lock.release()


def parse_state(raw: bytes, where: str) -> State:
    """The state a registry document holds; ``RegistryCorrupt`` saying why it holds none
    (every store keeps the same document, so every store reads it alike)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise RegistryCorrupt(f"cannot read registry {where}: {exc}",
                              f"not valid JSON: {str(exc)[:80]}") from exc
    try:
        return State.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RegistryCorrupt(f"{where} is not a registry: {exc!r}",
                              f"valid JSON, but not a registry: {_what(exc)}") from exc


class Registry:
    """The JSON file at ``path`` and its lock at ``path + '.lock'``: the embedded store.

    The etcd store (``lb.etcd.EtcdRegistry``) has the same face: ``read``, ``update``,
    ``create``, ``restore``, ``view``, ``where``, and the answer counts (``lb.evidence``)."""

    kind = "file"

    def __init__(self, path: str, lock_timeout: float = 10.0) -> None:
        self.path = os.path.abspath(path)
        self.lock_timeout = lock_timeout
        # A FileLock object is re-entrant: a second thread using the same object would walk
        # straight in. Threads of one process queue on a plain lock first; processes on the
        # file lock.
        self._thread_lock = threading.Lock()
        self._lock = filelock.FileLock(self.path + ".lock", timeout=lock_timeout)

    @property
    def where(self) -> str:
        """The store, for logs."""
        return self.path

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> State:
        return self.parse(self.read_bytes())

    def read_bytes(self) -> bytes:
        """The file as it is (``parse`` makes it a state)."""
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise RegistryMissing(f"no registry at {self.path}") from exc
        except OSError as exc:
            raise RegistryCorrupt(f"cannot read registry {self.path}: {exc}",
                                  f"cannot read it: {_oserror_detail(exc)}") from exc

    def parse(self, raw: bytes) -> State:
        return parse_state(raw, self.path)

    def view(self) -> RegistryView:
        """A cached copy for routing, re-read when the file changed."""
        return RegistryView(self)

    def stamp(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced (see ``RegistryView`` for the racy case)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextmanager
    def locked(self) -> Iterator[None]:
        began = time.monotonic()
        with queued(self._thread_lock, self.lock_timeout, self.path):
            try:
                self._lock.acquire(timeout=max(0.0, self.lock_timeout - (time.monotonic() - began)))
            except filelock.Timeout as exc:
                raise RegistryBusy(
                    f"registry lock {self._lock.lock_file} not acquired in {self.lock_timeout}s"
                ) from exc
            except OSError as exc:  # the lock file is gone and the folder cannot be written
                raise RegistryUnwritable(f"cannot lock registry {self.path}: {exc}",
                                         _oserror_detail(exc)) from exc
            try:
                yield
            finally:
                self._lock.release()

    @contextmanager
    def update(self) -> Iterator[State]:
        """Read, let the caller change the state, write it back if it changed; all locked.

        An exception inside the block writes nothing.
        """
        with self.locked():
            state = self.read()
            before = json.dumps(state.to_dict(), sort_keys=True)
            yield state
            if json.dumps(state.to_dict(), sort_keys=True) != before:
                state.version += 1
                self._write(state)

    def create(self, state: State, replace: bool = False) -> State:
        """Write ``state`` as the registry unless one exists (or ``replace``); the result.

        Safe to call from many processes at once: one of them creates, the others read.
        """
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise RegistryUnwritable(f"cannot create the folder of registry {self.path}: {exc}",
                                     _oserror_detail(exc)) from exc
        with self.locked():
            old_version = 0
            if self.exists():
                try:
                    current = self.read()
                except RegistryCorrupt:
                    if not replace:
                        raise
                else:
                    if not replace:
                        return current
                    old_version = current.version
            state.version = old_version + 1  # versions never go back, even across a reset
            self._write(state)
            return state

    def restore(self, state: State) -> State | None:
        """Write ``state`` if the file is (still) unreadable, keeping a corrupt one beside it as
        ``<name>.corrupt-<unix time in ns>``; the state written, or None if the file is readable
        (someone else restored it first). ``state.version`` must be past every version the
        readers may have seen: they rebuild their tables when the version changes."""
        with self.locked():
            try:
                self.read()
                return None
            except RegistryUnreadable:
                pass
            if self.exists():
                # A second name for the broken file, then the usual atomic replace: readers
                # never find the file missing in between.
                aside = f"{self.path}.corrupt-{time.time_ns()}"
                try:
                    os.link(self.path, aside)
                except OSError as exc:
                    raise RegistryUnwritable(f"cannot keep {self.path} aside: {exc}",
                                             _oserror_detail(exc)) from exc
                log.warning("kept the unreadable registry as %s", aside)
            self._write(state)
            return state

    # -- evidence of life (lb.evidence): a file per balancer worker, never under the lock ----
    @property
    def answers_folder(self) -> str:
        """Beside the registry file, a folder of its own: the inotify watch on the registry's
        folder (``lb.watch``) sees none of these writes."""
        return self.path + ".answers"

    def publish_answers(self, source: str, counts: Mapping[str, int]) -> None:
        """Replace ``source``'s file with ``counts`` (atomic replace; no fsync: a lost write
        is only a tick without evidence)."""
        folder = self.answers_folder
        os.makedirs(folder, exist_ok=True)
        final = os.path.join(folder, source + ".json")
        tmp = os.path.join(folder, "." + source + ".tmp")  # one writer per source
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(counts, fh)
        os.replace(tmp, final)

    def withdraw_answers(self, source: str) -> None:
        try:
            os.unlink(os.path.join(self.answers_folder, source + ".json"))
        except FileNotFoundError:
            pass

    def read_answers(self) -> dict[str, dict[str, int]]:
        """Every source's counters; files not written for ``STALE_SECONDS`` (workers that
        died without withdrawing) are removed, unreadable ones ignored."""
        found: dict[str, dict[str, int]] = {}
        try:
            entries = list(os.scandir(self.answers_folder))
        except FileNotFoundError:
            return found
        now = time.time()
        for entry in entries:
            try:
                if now - entry.stat().st_mtime > STALE_SECONDS:
                    os.unlink(entry.path)
                    continue
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                with open(entry.path, "rb") as fh:
                    counts = parse_counts(json.loads(fh.read()))
            except (OSError, ValueError):
                continue  # gone since the listing, or half a file from a killed writer
            if counts is not None:
                found[entry.name[:-len(".json")]] = counts
        return found

    def _write(self, state: State) -> None:
        try:
            self._replace_file(state)
        except OSError as exc:
            raise RegistryUnwritable(f"cannot write registry {self.path}: {exc}",
                                     _oserror_detail(exc)) from exc

    def _replace_file(self, state: State) -> None:
        folder = os.path.dirname(self.path)
        prefix = f".{os.path.basename(self.path)}-"
        # Writes happen under the lock only, so a temp file of ours that is already there was
        # left by a writer killed mid-write: clear it, or every such kill leaves one behind.
        for entry in os.scandir(folder):
            if (entry.name.startswith(prefix) and entry.name.endswith(".tmp")
                    and len(entry.name) == len(prefix) + 8 + 4):  # mkstemp: 8 random chars
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(state.to_dict(), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FailStatic:
    """Fail static, said once: a view that keeps its last good state while its store cannot be
    used logs one line when that starts (or its cause changes) and one when it ends, not one
    per call. Both stores' views are one."""

    _state: State | None
    problem: RegistryError | None
    stale_since: float | None

    @property
    def where(self) -> str:
        raise NotImplementedError

    def _stale(self, exc: RegistryError) -> None:
        if self.problem is None or type(exc) is not type(self.problem):
            if self._state is None:
                log.error("%s; nothing to route with until it can be read", exc)
            else:
                log.error("%s; routing goes on with the last good state (version %d, %d "
                          "routable)", exc, self._state.version, len(self._state.routable()))
            self.stale_since = self.stale_since or time.time()
        self.problem = exc

    def _fresh(self) -> None:
        if self.problem is not None:
            log.warning("registry %s is readable again (version %d) after %.1fs", self.where,
                        self._state.version if self._state else -1,
                        time.time() - (self.stale_since or time.time()))
        self.problem = self.stale_since = None


class RegistryView(FailStatic):
    """A process's cached copy of the registry, re-read only when the file changed.

    A stat per call (``check``); the JSON is parsed only after a write. Like git's "racy clean" check, a
    file whose mtime is too recent to be trusted (two writes within the filesystem's timestamp
    granularity could share a stamp) is re-read until it ages.

    Fail static: once a good state was read, a file that becomes unreadable (corrupt, missing)
    does not stop the caller. ``current()`` goes on returning the last good state, ``problem``
    says why, and one line is logged when that starts and one when it ends, not one per call.
    (Envoy keeps its last good configuration the same way.)

    Watched (``watch``, by ``lb.watch.RegistryWatch``, which sees the folder's changes as they
    happen), ``current()`` does not even stat: it trusts its last look at the file until the
    watch calls ``changed()``.
    """

    RACY_SECONDS = 0.05

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._lock = threading.Lock()  # the stamp and the state it belongs to change together
        self._stamp: tuple[int, int, int] | None = None
        self._state: State | None = None
        self._raw = b""  # the file's bytes that _state was parsed from
        self._good_mtime: float | None = None
        self.problem: RegistryError | None = None  # set while serving the last good state
        self.stale_since: float | None = None
        self._watched = False  # a watch will call changed() when the file may have changed
        self._trusted = False  # watched, and nothing changed since the last look
        self._changes = 0  # changed() calls: one during a look means look again

    def current(self) -> State:
        """The state to route with: a look at the file (``check()``), unless watched and the
        watch saw no change since the last look."""
        state = self._state
        if self._trusted and state is not None:
            return state
        return self.check()

    def watch(self, watched: bool) -> None:
        """Whether a watch reports the file's changes (``changed()``) from now on."""
        with self._lock:
            self._watched = watched
            self._trusted = False

    def changed(self) -> None:
        """The file may have changed: the next ``current()`` looks at it."""
        self._changes += 1
        self._trusted = False

    def check(self) -> State:
        """``current()``, always looking at the file: a stat, a read when it changed."""
        with self._lock:
            self._trusted = False
            changes = self._changes
            state, racy = self._look()
            # Trusted only when no change was reported during the look (it may have missed
            # it) and the stamp is old enough to tell two writes apart.
            self._trusted = self._watched and self._changes == changes and not racy
            return state

    def _look(self) -> tuple[State, bool]:
        """The state as the file has it now (or the last good one), and whether its stamp is
        too recent to tell it from a next write's."""
        stamp = self.registry.stamp()
        racy = stamp is not None and time.time_ns() - stamp[1] < self.RACY_SECONDS * 1e9
        if self._state is None or stamp != self._stamp or racy:
            try:
                raw = self.registry.read_bytes()
                # Unchanged bytes (a racy stamp checked again, on every call until it ages)
                # are the same state: reading costs a few microseconds, parsing ten times more.
                state = (self._state if raw == self._raw and self._state is not None
                         else self.registry.parse(raw))
            except RegistryUnreadable as exc:
                self._stale(exc)
                if self._state is None:
                    raise
            else:
                self._good_mtime = None if stamp is None else stamp[1] / 1e9
                self._state, self._raw = state, raw
                self._fresh()
            self._stamp = stamp  # an unreadable file is not parsed again until it changes
        return self._state, racy

    def follow(self, interval: float) -> None:
        """Keep the last good state recent without being asked: a daemon thread calls
        ``check()`` every ``interval`` seconds. Without it, a process that had no reason to
        look for a while (a balancer worker without traffic) would only have an old state to
        go on when the file becomes unreadable. The thread ends with the view."""
        ref = weakref.ref(self)

        def run() -> None:
            while True:
                time.sleep(interval)
                view = ref()
                if view is None:
                    return
                try:
                    view.check()
                except RegistryError:
                    pass  # logged by the view, once per change
                del view

        threading.Thread(target=run, name="registry-view", daemon=True).start()

    def latest(self) -> State:
        """The file's state, for replies about it (``/rep``, status): unlike ``current()``,
        which routing uses, this raises while only the last good state is left."""
        state = self.check()
        if self.problem is not None:
            raise self.problem
        return state

    @property
    def written_at(self) -> float | None:
        """When the state ``current()`` returns was written (the file's mtime, Unix time)."""
        return self._good_mtime

    @property
    def where(self) -> str:
        return self.registry.path
