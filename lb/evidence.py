"""Evidence of life from routing: the answers balancer workers got from each replica.

A replica's ``/heartbeat`` queues behind requests in its gunicorn thread pool, so under load it
can come late from a replica that answers routed requests all along. The supervisor must not
replace such a replica; with several balancers (etcd) none of them sees a replica's whole load,
so each worker publishes what it saw and the supervisor reads them all:

- ``Router.answered`` (``lb.routing``) counts, per replica hostname, the answers a worker got
  (a complete answer head with a status below 500; ``RingWalk.told`` counts them);
- ``Publisher`` (a thread in each balancer worker) writes that worker's counters to the registry
  store every ``LB_HEARTBEAT_INTERVAL / 2`` seconds under the worker's own ``source`` name (the
  file store: one small file beside the registry file; etcd: one key under a lease);
- ``Evidence`` (in the supervisor) compares each source's counters with the ones it read at its
  previous tick: a replica whose counter changed in some source answered since then.

Counters, not times: no clocks to agree across hosts. A source seen for the first time is no
evidence yet (its counters may be old: a worker long gone, a supervisor just started), and
neither is a source that vanished. "Changed" rather than "grew": the threads worker counts
from many threads without a lock, so a lost increment may even step a counter back; any change
still means answers came.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Protocol

log = logging.getLogger(__name__)

# A worker whose counters did not change writes them again this often anyway: the file store
# forgets sources not written for STALE_SECONDS (workers that died), etcd's lease outlives it.
REPUBLISH_SECONDS = 5.0
STALE_SECONDS = 60.0

Counts = Mapping[str, int]


class EvidenceStore(Protocol):
    """What the registry stores (``lb.registry.Registry``, ``lb.etcd.EtcdRegistry``) offer."""

    def publish_answers(self, source: str, counts: Counts) -> None: ...

    def withdraw_answers(self, source: str) -> None: ...

    def read_answers(self) -> dict[str, dict[str, int]]: ...


def source_name() -> str:
    """This worker's name among the sources: host, pid and a nonce (pids repeat across hosts,
    containers and restarts), in characters any store takes as a file name or key."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def parse_counts(data: object) -> dict[str, int] | None:
    """A published document as counters, or None when it is not one (then it is ignored)."""
    if not isinstance(data, dict):
        return None
    if not all(isinstance(k, str) and type(v) is int for k, v in data.items()):
        return None
    return dict(data)


class Publisher:
    """A balancer worker's thread that publishes ``counts()`` every ``period`` seconds (when
    they changed, or ``REPUBLISH_SECONDS`` after the last write), and withdraws them at
    ``stop``. A store that cannot be written is tried again next period."""

    def __init__(self, store: EvidenceStore, counts: Callable[[], Counts], period: float,
                 source: str | None = None) -> None:
        self.store = store
        self.counts = counts
        self.period = period
        self.source = source or source_name()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="evidence", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        try:
            self.store.withdraw_answers(self.source)
        except Exception as exc:  # noqa: BLE001 - best effort: a stale source is no evidence
            log.debug("could not withdraw answers of %s: %s", self.source, exc)

    def _run(self) -> None:
        last: dict[str, int] | None = None
        written = 0.0
        while not self._stop.wait(self.period):
            counts = dict(self.counts())  # one C-level copy: safe against the counting threads
            if counts == last and time.monotonic() - written < REPUBLISH_SECONDS:
                continue
            try:
                self.store.publish_answers(self.source, counts)
            except Exception as exc:  # noqa: BLE001 - said once; the next period tries again
                if not self._failing:
                    log.warning("cannot publish this worker's answers (evidence of life): %s",
                                exc)
                self._failing = True
                continue
            if self._failing:
                log.info("publishing this worker's answers again")
            self._failing = False
            last, written = counts, time.monotonic()


class Evidence:
    """The supervisor's side: which replicas answered routed requests since its last look."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, int]] | None = None  # source -> hostname -> count

    def serving(self, published: Mapping[str, Mapping[str, int]]) -> set[str]:
        """Hostnames whose counter changed in some source since the previous call (the first
        call knows no previous one: nothing)."""
        before = self._seen or {}
        found: set[str] = set()
        for source, counts in published.items():
            old = before.get(source)
            if old is None:
                continue
            found.update(h for h, n in counts.items() if old.get(h, 0) != n)
        self._seen = {s: dict(c) for s, c in published.items()}
        return found

    def forget(self) -> None:
        """No look this tick (the store could not be read): the next one starts afresh."""
        self._seen = None
