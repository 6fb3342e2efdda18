"""Heartbeat probes, shared by ``/add`` (waiting for new replicas) and the supervisor."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterable

import requests
from requests.adapters import HTTPAdapter

_local = threading.local()


def _session() -> requests.Session:
    """One pooled session per thread: ``requests.Session`` is not meant to be shared."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False  # never route heartbeats through a proxy from the environment
        session.mount("http://", HTTPAdapter(pool_connections=64, pool_maxsize=4, max_retries=0))
        _local.session = session
    return session


class Heartbeat(enum.Enum):
    """How one heartbeat went. The supervisor tells a late one from a failed one: a replica
    whose heartbeat queues behind requests is late but may be serving; a refused or reset
    connection, or an answer that is not 200, says it is not (``supervisor.core``)."""

    ANSWERED = "answered"  # 200 within the timeout
    LATE = "late"  # no connection or no answer within the timeout: busy, or hung
    FAILED = "failed"  # refused, reset, or not 200: not serving


ANSWERED, LATE, FAILED = Heartbeat.ANSWERED, Heartbeat.LATE, Heartbeat.FAILED


def probe(address: str, timeout: float) -> Heartbeat:
    """Whether ``address``'s ``/heartbeat`` answers 200 within ``timeout`` seconds, or is late,
    or failed."""
    try:
        reply = _session().get(address + "/heartbeat", timeout=timeout)
    except requests.Timeout:  # connect or read: ConnectTimeout is a ConnectionError too
        return LATE
    except requests.RequestException:
        return FAILED
    return ANSWERED if reply.status_code == 200 else FAILED


def wait_ready(addresses: Iterable[str], timeout: float, interval: float = 0.05) -> set[str]:
    """Poll until every address answers its heartbeat or ``timeout`` passes; the ready ones."""
    pending = set(addresses)
    ready: set[str] = set()
    deadline = time.monotonic() + timeout
    while pending:
        for address in list(pending):
            if probe(address, min(1.0, max(0.05, deadline - time.monotonic()))) is ANSWERED:
                pending.discard(address)
                ready.add(address)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return ready
