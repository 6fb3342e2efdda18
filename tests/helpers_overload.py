"""Overload on loopback: echo replicas of a known capacity, and clients that offer a fixed rate.

``echo_replicas`` starts gunicorn echo replicas (``tests.helpers_echo``) with a few threads and
a fixed delay per request: a capacity of ``threads / delay`` requests a second each, whatever
the machine's speed. ``open_loop`` offers requests at a fixed rate, each on its own
connection, however slowly the balancer answers (the load an overloaded service meets: clients
do not wait for each other); ``closed_loop`` keeps a number of clients busy, to measure the
capacity. Both are bounded in count and in time, and every request ends: answered, or counted
as a timeout or a connection error.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def echo_replicas(n: int, threads: int, delay: float) -> Iterator[list[str]]:
    """``n`` gunicorn echo replicas (one worker, ``threads`` threads, ``delay`` seconds per
    request but heartbeats); their base URLs. Stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(n):
            port = free_port()
            env = {**os.environ, "ECHO_DELAY": str(delay), "SERVER_ID": str(i + 1)}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "python:replica.gunicorn_conf",
                 "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread",
                 "--threads", str(threads), "--backlog", "2048", "--log-level", "warning",
                 "--no-control-socket", "tests.helpers_echo:create_app()"],
                env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for url in urls:
            while True:
                try:
                    if requests.get(url + "/heartbeat", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, f"echo replica {url} did not come up"
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Shots:
    """What the clients got: per status the count, the seconds each 200 took, and what went
    wrong otherwise."""

    seconds: float = 0.0  # how long the load was offered
    began: float = 0.0  # monotonic time the first request went out
    last: float = 0.0  # ... and the last answer came
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # of the 200s
    shed: list[float] = field(default_factory=list)  # seconds each 503 took
    timeouts: int = 0  # no complete answer within the client's timeout
    errors: list[str] = field(default_factory=list)  # connection errors, malformed answers
    retry_after: set[str] = field(default_factory=set)  # the 503s' Retry-After values
    bad_503: list[str] = field(default_factory=list)  # 503s without the envelope or the header

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def goodput(self) -> float:
        """200s a second, over the time from the first request to the last answer (answers
        coming late do not count as if they came within the offered seconds)."""
        span = max(self.seconds, self.last - self.began)
        return self.ok / span if span else 0.0

    def p(self, share: float, values: list[float] | None = None) -> float:
        ordered = sorted(self.latencies if values is None else values)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]

    def line(self) -> str:
        return (f"{self.goodput:.1f} req/s served, p50 {self.p(0.5) * 1000:.0f} ms, p99 "
                f"{self.p(0.99) * 1000:.0f} ms, max {self.p(1.0) * 1000:.0f} ms; statuses "
                f"{dict(sorted(self.statuses.items()))}, 503 p99 "
                f"{self.p(0.99, self.shed) * 1000:.0f} ms, timeouts {self.timeouts}, errors "
                f"{len(self.errors)}")


async def _one(host: str, port: int, target: str, timeout: float, shots: Shots) -> None:
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                             "Connection: close\r\n\r\n".encode())
                data = await reader.read()  # to the close: the whole answer
            finally:
                writer.close()
    except TimeoutError:
        shots.timeouts += 1
        return
    except OSError as exc:
        shots.errors.append(repr(exc))
        return
    shots.last = max(shots.last, time.monotonic())
    took = time.monotonic() - began
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        shots.errors.append(f"not an answer: {data[:100]!r}")
        return
    shots.statuses[status] = shots.statuses.get(status, 0) + 1
    if status == 200:
        shots.latencies.append(took)
    elif status == 503:
        shots.shed.append(took)
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:])}
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if ("retry-after" not in fields or not isinstance(message, dict)
                or message.get("status") != "failure"
                or not str(message.get("message", "")).startswith("<Error> ")):
            shots.bad_503.append(data[:300].decode("latin-1"))
        else:
            shots.retry_after.add(fields["retry-after"])


def _target(path: str) -> str:
    return f"{path}?id={random.randrange(1 << 30)}"  # spread over the replicas by LB_HASH_KEY


async def _open(url: str, rate: float, seconds: float, path: str, timeout: float) -> Shots:
    host, port = url.removeprefix("http://").split(":")
    began = time.monotonic()
    shots = Shots(seconds=seconds, began=began)
    tasks = []
    for i in range(int(rate * seconds)):
        due = began + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(_one(host, int(port), _target(path), timeout, shots)))
    await asyncio.gather(*tasks)
    return shots


async def _closed(url: str, clients: int, seconds: float, path: str, timeout: float) -> Shots:
    host, port = url.removeprefix("http://").split(":")
    shots = Shots(seconds=seconds, began=time.monotonic())
    end = shots.began + seconds

    async def client() -> None:
        while time.monotonic() < end:
            await _one(host, int(port), _target(path), timeout, shots)

    await asyncio.gather(*(client() for _ in range(clients)))
    return shots


def open_loop(url: str, rate: float, seconds: float, path: str = "/home",
              timeout: float = 15.0) -> Shots:
    """``rate`` requests a second for ``seconds`` (``rate * seconds`` in all), each on a new
    connection, sent on time whatever the answers; every one ends within ``timeout``."""
    return asyncio.run(_open(url, rate, seconds, path, timeout))


def closed_loop(url: str, clients: int, seconds: float, path: str = "/home",
                timeout: float = 15.0) -> Shots:
    """``clients`` clients, each sending its next request as its last is answered."""
    return asyncio.run(_closed(url, clients, seconds, path, timeout))
