"""Shared pieces of the fault tests: a bounded load generator, the processes of a running stack,
and the figures each test reports.

Sizes come from the environment so CI runs small and a soak run runs big, e.g.::

    CHAOS_REQUESTS=20000 CHAOS_KILLS=10 REGISTRY_KILLS=1000 FUZZ_EXAMPLES=2000 \\
        .venv/bin/pytest -s -m system tests/test_chaos.py ...

Every test prints one ``[hard-to-break] name: key=value ...`` line and appends the same figures
as one JSON line to ``tests/results/hard_to_break.jsonl`` (ignored by git).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from lb.backends.local import ENV_DEPLOYMENT, ENV_TOKEN
from lb.registry import State

RESULTS = Path(__file__).parent / "results" / "hard_to_break.jsonl"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def report(name: str, **figures: Any) -> None:
    """Print the figures (visible with ``-s``) and append them to the results file."""
    shown = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in figures.items())
    print(f"\n[hard-to-break] {name}: {shown}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"test": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             **figures}, default=str) + "\n")


# -- load -------------------------------------------------------------------------------------
@dataclass
class Load:
    """``total`` GETs of ``path`` from ``threads`` clients, spread over about ``seconds``.

    Bounded in count (``total``) and in time (``limit`` seconds): it never runs away. A failure is
    anything but a 200 from the contract's replica reply (exceptions included); each failure is
    kept with the time it happened, so a test can tell what caused it.
    """

    url: str
    total: int
    seconds: float
    threads: int = 8
    path: str = "/home"
    limit: float = 300.0
    client_retries: int = 0  # connection-level retries of the client itself (0: none)
    sent: int = 0
    ok: int = 0
    retried: int = 0  # requests that needed a client-level retry and then succeeded
    failures: list[tuple[float, str]] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)
    # Every request's (time.monotonic() when it was sent, seconds it took).
    latencies: list[tuple[float, float]] = field(default_factory=list)
    began: float = 0.0
    ended: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Load:
        self.began = time.monotonic()
        self._workers = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def _next(self) -> bool:
        """Claim the next request; pace so that ``total`` spreads over ``seconds``."""
        with self._lock:
            if self.sent >= self.total or self._stop.is_set():
                return False
            due = self.began + self.seconds * self.sent / self.total
            self.sent += 1
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return time.monotonic() - self.began < self.limit

    def _run(self) -> None:
        with requests.Session() as session:
            session.trust_env = False
            while self._next():
                began = time.monotonic()
                outcome, replica, retried = self._one(session)
                with self._lock:
                    self.latencies.append((began, time.monotonic() - began))
                    if outcome is None:
                        self.ok += 1
                        self.retried += retried
                        self.served_by[replica] += 1
                    else:
                        self.failures.append((time.monotonic(), outcome))

    def _one(self, session: requests.Session) -> tuple[str | None, str, bool]:
        outcome: str | None = None
        for attempt in range(1 + self.client_retries):
            try:
                reply = session.get(self.url + self.path, timeout=30)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # Only a connection-level failure is retried by the client: refused, reset, or
                # broken after the head, before the whole body (requests calls any body cut
                # short a ChunkedEncodingError, Content-Length or not).
                outcome = f"connection error: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            except requests.RequestException as exc:
                return f"{type(exc).__name__}: {str(exc)[:200]}", "", False
            if reply.status_code != 200:
                return f"HTTP {reply.status_code}: {reply.text[:200]}", "", False
            try:
                message = reply.json()["message"]
            except (ValueError, KeyError, TypeError):
                return f"bad body: {reply.text[:200]}", "", False
            if not str(message).startswith("Hello from Server: "):
                return f"bad message: {message!r}", "", False
            return None, reply.headers.get("X-Served-By", "?"), attempt > 0
        return outcome, "", False

    def running(self) -> bool:
        return any(t.is_alive() for t in self._workers)

    def wait(self, timeout: float | None = None) -> Load:
        deadline = time.monotonic() + (self.limit + 60 if timeout is None else timeout)
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for t in self._workers:
            t.join(timeout=60)
        self.ended = time.monotonic()
        return self

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.began

    def failures_between(self, t0: float, t1: float) -> int:
        return sum(1 for t, _ in self.failures if t0 <= t <= t1)


# -- the processes of a stack -----------------------------------------------------------------
def children_with(proc_pid: int, marker: str) -> list[psutil.Process]:
    """Live children of ``proc_pid`` whose command line contains ``marker``."""
    try:
        children = psutil.Process(proc_pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if marker in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            pass
    return found


def supervisor_of(lb_run_pid: int) -> psutil.Process | None:
    found = children_with(lb_run_pid, "-m supervisor")
    return found[0] if found else None


def balancer_master_of(lb_run_pid: int) -> psutil.Process | None:
    found = children_with(lb_run_pid, "gunicorn")
    return found[0] if found else None


def balancer_workers_of(lb_run_pid: int) -> list[psutil.Process]:
    master = balancer_master_of(lb_run_pid)
    if master is None:
        return []
    try:
        return [p for p in master.children() if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def instances_by_token(deployment: str) -> dict[str, list[psutil.Process]]:
    """Every live process marked as ``deployment``'s, grouped by replica token."""
    groups: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["environ"], ad_value=None):
        env = proc.info["environ"] or {}
        if env.get(ENV_DEPLOYMENT) != deployment:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        groups.setdefault(env.get(ENV_TOKEN, "?"), []).append(proc)
    return groups


def processes_match_registry(state: State, deployment: str) -> str | None:
    """None when the deployment's processes are exactly the registry's replicas, else why not.

    One process group per entry, and not one more: no duplicate, no orphan, none missing.
    """
    groups = instances_by_token(deployment)
    wanted = {r.handle.partition("/")[2]: r.hostname for r in state.replicas if r.handle}
    missing = [name for token, name in wanted.items() if token not in groups]
    extra = sorted(token[:8] for token in groups if token not in wanted)
    unhandled = [r.hostname for r in state.replicas if not r.handle]
    if missing or extra or unhandled:
        return f"missing={missing} orphans={extra} without-process={unhandled}"
    return None


def wait_for(check: Callable[[], str | None], timeout: float, interval: float = 0.1) -> None:
    """Until ``check()`` returns None (all good); else fail with its last explanation."""
    deadline = time.monotonic() + timeout
    why = check()
    while why is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"still not so after {timeout}s: {why}")
        time.sleep(interval)
        why = check()
