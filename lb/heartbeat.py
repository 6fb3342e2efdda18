"""Heartbeat probes, shared by ``/add`` (waiting for new replicas) and the supervisor."""

from __future__ import annotations

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


def probe(address: str, timeout: float) -> bool:
    """True when ``address``'s ``/heartbeat`` answers 200 within ``timeout`` seconds."""
    try:
        reply = _session().get(address + "/heartbeat", timeout=timeout)
        return reply.status_code == 200
    except requests.RequestException:
        return False


def wait_ready(addresses: Iterable[str], timeout: float, interval: float = 0.05) -> set[str]:
    """Poll until every address answers its heartbeat or ``timeout`` passes; the ready ones."""
    pending = set(addresses)
    ready: set[str] = set()
    deadline = time.monotonic() + timeout
    while pending:
        for address in list(pending):
            if probe(address, timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
                pending.discard(address)
                ready.add(address)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return ready
