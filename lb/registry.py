"""The replica registry: one JSON file shared by the balancer's workers and the supervisor.

Every read-modify-write happens under one ``filelock.FileLock`` on a separate ``.lock`` file and
ends with an atomic replace (temp file in the same folder, fsync, ``os.replace``), so a reader
never sees half a file and a writer killed at any point leaves the old state or the new one.
Readers take no lock. ``version`` grows by one with every write.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import filelock

from lb.hashring import HashRing
from lb.strategies import Lookup, build_lookup

STARTING, READY, DOWN, REMOVING = "starting", "ready", "down", "removing"
STATES = (STARTING, READY, DOWN, REMOVING)


class RegistryError(Exception):
    """Root of the registry's errors."""


class RegistryBusy(RegistryError):
    """The lock could not be had in time."""


class RegistryCorrupt(RegistryError):
    """The file exists but is not a registry."""


class RegistryMissing(RegistryError):
    """No registry file yet."""


@dataclass
class Replica:
    """One member of the desired replica set."""

    hostname: str
    server_id: int
    slots: list[int]
    state: str = STARTING
    address: str | None = None  # base URL, e.g. http://127.0.0.1:41234
    handle: str | None = None  # backend's own id: "pid/create-time" or a container id
    last_heartbeat: float | None = None
    failures: int = 0  # consecutive missed heartbeats
    restarts: int = 0  # consecutive starts that never became ready
    not_before: float = 0.0  # no (re)start before this time: the crash-loop guard's back-off
    owner: str | None = None  # who is acting on this entry ("add:<pid>", "rm:<pid>", ...)
    deadline: float | None = None  # until when the owner holds it; after that, the supervisor
    created: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replica:
        return cls(**data)

    @property
    def held(self) -> bool:
        """Someone (an /add or /rm in flight) is acting on this entry right now."""
        return self.owner is not None and (self.deadline or 0) > time.time()

    @property
    def adding(self) -> bool:
        """An ``/add`` in flight is starting this replica."""
        return self.held and (self.owner or "").startswith("add:")


@dataclass
class RingParams:
    slots: int
    virtual: int
    hash: str
    probing: str


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
        return [r for r in self.replicas if r.state == READY and r.address]

    def lookup(self, strategy: str, replicas: list[Replica]) -> Lookup:
        """``strategy``'s lookup over ``replicas`` (``lb.strategies``)."""
        return build_lookup(strategy, lambda: self.hash_ring(replicas),
                            [r.server_id for r in replicas])

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
            "replicas": [asdict(r) for r in self.replicas],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> State:
        return cls(
            ring=RingParams(**data["ring"]),
            replicas=[Replica.from_dict(r) for r in data["replicas"]],
            version=int(data["version"]),
        )


class Registry:
    """The JSON file at ``path`` and its lock at ``path + '.lock'``."""

    def __init__(self, path: str, lock_timeout: float = 10.0) -> None:
        self.path = os.path.abspath(path)
        self.lock_timeout = lock_timeout
        # A FileLock object is re-entrant: a second thread using the same object would walk
        # straight in. Threads of one process queue on a plain lock first; processes on the
        # file lock.
        self._thread_lock = threading.Lock()
        self._lock = filelock.FileLock(self.path + ".lock", timeout=lock_timeout)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> State:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError as exc:
            raise RegistryMissing(f"no registry at {self.path}") from exc
        except (OSError, ValueError) as exc:
            raise RegistryCorrupt(f"cannot read registry {self.path}: {exc}") from exc
        try:
            return State.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryCorrupt(f"{self.path} is not a registry: {exc!r}") from exc

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
        if not self._thread_lock.acquire(timeout=self.lock_timeout):
            raise RegistryBusy(f"registry {self.path} busy in this process for "
                               f"{self.lock_timeout}s")
        try:
            try:
                self._lock.acquire(timeout=max(0.0, self.lock_timeout - (time.monotonic() - began)))
            except filelock.Timeout as exc:
                raise RegistryBusy(
                    f"registry lock {self._lock.lock_file} not acquired in {self.lock_timeout}s"
                ) from exc
            try:
                yield
            finally:
                self._lock.release()
        finally:
            self._thread_lock.release()

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
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
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

    def _write(self, state: State) -> None:
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


class RegistryView:
    """A worker's cached copy of the registry, re-read only when the file changed.

    A stat per call; the JSON is parsed only after a write. Like git's "racy clean" check, a
    file whose mtime is too recent to be trusted (two writes within the filesystem's timestamp
    granularity could share a stamp) is re-read until it ages.
    """

    RACY_SECONDS = 0.05

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._stamp: tuple[int, int, int] | None = None
        self._state: State | None = None

    def current(self) -> State:
        stamp = self.registry.stamp()
        racy = stamp is not None and time.time_ns() - stamp[1] < self.RACY_SECONDS * 1e9
        if self._state is None or stamp != self._stamp or racy:
            state = self.registry.read()
            self._stamp, self._state = stamp, state
        return self._state
