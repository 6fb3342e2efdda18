"""Talking to a balancer: asynchronous load (asyncio + aiohttp, bounded concurrency) and the
contract's admin calls (``/rep``, ``/add``, ``/rm``).

Every load run is bounded twice: by a request count and by a deadline.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import requests

SERVER_RE = re.compile(r"Hello from Server: (\d+)")


class AnalysisError(Exception):
    """Root of the analysis tool's errors: the balancer did not answer as the contract says."""


@dataclass
class Result:
    """One request: when it started and ended (seconds since the run began), how it went."""

    start: float
    end: float
    status: int  # 0: no HTTP reply at all (connection refused, reset, timeout)
    server_id: int | None = None
    served_by: str | None = None  # the balancer's X-Served-By header (the replica's hostname)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.server_id is not None

    @property
    def latency(self) -> float:
        return self.end - self.start


# CA certificate(s) an https balancer's certificate is checked against (lb-analyze --cacert);
# None: the system's.
CA_FILE: str | None = None


def trust(cafile: str | None) -> None:
    """Check https balancers' certificates against ``cafile`` (PEM) from now on."""
    global CA_FILE
    CA_FILE = cafile


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=CA_FILE)


def parse_server_id(body: str) -> int | None:
    match = SERVER_RE.search(body)
    return int(match.group(1)) if match else None


async def _one(session: aiohttp.ClientSession, url: str, t0: float) -> Result:
    began = time.perf_counter() - t0
    try:
        async with session.get(url) as reply:
            body = await reply.text()
            return Result(began, time.perf_counter() - t0, reply.status, parse_server_id(body),
                          reply.headers.get("X-Served-By"))
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Result(began, time.perf_counter() - t0, 0, error=type(exc).__name__)


async def load(url: str, count: int | None = None, duration: float | None = None,
               concurrency: int = 32, timeout: float = 10.0,
               on_result: Callable[[Result], None] | None = None,
               t0: float | None = None) -> list[Result]:
    """GET ``url`` ``count`` times (or until ``duration`` seconds pass, whichever is first),
    with at most ``concurrency`` requests in flight; results in completion order."""
    if count is None and duration is None:
        raise ValueError("a load run needs a count, a duration or both")
    t0 = time.perf_counter() if t0 is None else t0
    deadline = t0 + (duration if duration is not None else 3600.0)
    remaining = [count if count is not None else 10**12]
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False,
                                     ssl=_tls_context() if url.startswith("https:") else True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def worker() -> None:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                result = await _one(session, url, t0)
                results.append(result)
                if on_result is not None:
                    on_result(result)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def run_load(url: str, count: int | None = None, duration: float | None = None,
             concurrency: int = 32, timeout: float = 10.0, progress: bool = True,
             label: str = "requests") -> list[Result]:
    """``load`` from synchronous code, with a tqdm progress bar."""
    from tqdm import tqdm

    total = count if count is not None else None
    with tqdm(total=total, desc=label, unit="req", disable=not progress, leave=False) as bar:
        return asyncio.run(load(url, count, duration, concurrency, timeout,
                                on_result=lambda r: bar.update(1)))


# -- the admin calls -------------------------------------------------------------------------------
class Admin:
    """``/rep``, ``/add`` and ``/rm`` of one balancer, as the contract defines them."""

    def __init__(self, url: str, token: str = "", timeout: float = 90.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # loopback only: no proxies from the environment
        if CA_FILE:
            self.session.verify = CA_FILE
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            reply = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise AnalysisError(f"{method} {self.url}{path}: {exc}") from exc
        try:
            data = reply.json()
        except ValueError as exc:
            raise AnalysisError(f"{method} {path}: not JSON ({reply.status_code})") from exc
        if reply.status_code != 200 or data.get("status") != "successful":
            raise AnalysisError(f"{method} {path} -> {reply.status_code}: {data.get('message')}")
        return data["message"]

    def rep(self) -> dict[str, Any]:
        return self._call("GET", "/rep")  # type: ignore[no-any-return]

    def add(self, n: int, hostnames: list[str] | None = None) -> dict[str, Any]:
        return self._call("POST", "/add", {"n": n, "hostnames": hostnames or []})  # type: ignore[no-any-return]

    def rm(self, n: int, hostnames: list[str] | None = None) -> dict[str, Any]:
        return self._call("DELETE", "/rm", {"n": n, "hostnames": hostnames or []})  # type: ignore[no-any-return]

    def scale_to(self, n: int, prefix: str = "an") -> dict[str, Any]:
        """Bring N to ``n``: new replicas get names ``<prefix><k>``; the newest ones go first."""
        rep = self.rep()
        if rep["N"] < n:
            taken = set(rep["replicas"])
            names = [f"{prefix}{k}" for k in range(1, 1000) if f"{prefix}{k}" not in taken]
            rep = self.add(n - rep["N"], names[: n - rep["N"]])
        elif rep["N"] > n:
            extra = rep["N"] - n
            rep = self.rm(extra, rep["replicas"][-extra:])
        return rep
