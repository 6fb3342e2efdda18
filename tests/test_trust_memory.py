"""A client cannot make the balancer hold replies in memory: what a client does not take waits
in bounded buffers (and the kernel's), never in a worker's heap.

Measured on the balancer's gunicorn workers (``helpers_chaos.balancer_workers_of``): their
resident memory, sampled every 0.1 s, may rise by at most ``RSS_BOUND`` over the figure taken
after a warm-up, while

- one connection pipelines GETs of 1 MiB answers for 15 s and never reads a byte;
- one 400 MiB answer goes to a client that reads nothing, or reads slowly.

The replica streams its answers from a generator (``/big`` of ``tests.helpers_misbehave``), so
the only place the bytes can pile up is the balancer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import psutil
import pytest

from tests.conftest import RunningStack
from tests.helpers_chaos import balancer_workers_of, report
from tests.helpers_misbehave import Client, start_misbehaving_replica
from tests.helpers_stack import running_stack

pytestmark = pytest.mark.system

MIB = 1 << 20
RSS_BOUND = 8 * MIB
GIVE_UP = 256 * MIB  # far past the bound: the client stops at once (the machine's sake)
PIPELINE_SECONDS = 15.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, lb_worker: str) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("memory"), lb_worker, n=0) as running:
        start_misbehaving_replica(running.registry, running.settings.deployment, "big-1")
        yield running


def workers_rss(stack: RunningStack) -> int:
    total = 0
    for proc in balancer_workers_of(stack.proc.pid):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


class Peak:
    """The highest sum of the workers' RSS, sampled every 0.1 s in a thread."""

    def __init__(self, stack: RunningStack) -> None:
        self.stack = stack
        self.baseline = workers_rss(stack)
        self.peak = self.baseline
        self.far_past = threading.Event()  # the rise passed GIVE_UP: stop now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, workers_rss(self.stack))
            if self.rise > GIVE_UP:
                self.far_past.set()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, workers_rss(self.stack))

    @property
    def rise(self) -> int:
        return self.peak - self.baseline


def warm_up(stack: RunningStack) -> None:
    """A few whole 1 MiB answers on each worker first: what a worker allocates once for any
    large answer is not what this test measures."""
    for _ in range(6):
        with Client(stack.url, timeout=30) as client:
            reply = client.get(f"/big?n={MIB}", "Connection: close")
            assert reply.status == 200 and len(reply.body) == MIB, reply
    time.sleep(0.5)


def still_serving(stack: RunningStack) -> None:
    with Client(stack.url, timeout=30) as client:
        reply = client.get("/home", "Connection: close")
    assert reply.status == 200, reply


def test_a_pipelining_client_that_never_reads_costs_bounded_memory(
        stack: RunningStack, lb_worker: str) -> None:
    warm_up(stack)
    request = f"GET /big?n={MIB} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    sent = 0
    host, port = stack.url.removeprefix("http://").split(":")
    with Peak(stack) as peak, socket.create_connection((host, int(port))) as sock:
        sock.setblocking(False)
        pending = b""
        stop = time.monotonic() + PIPELINE_SECONDS
        while (time.monotonic() < stop and sent < 2_000_000  # bounded in time and count
               and not peak.far_past.is_set()):
            if not pending:
                pending = request
            try:
                pending = pending[sock.send(pending):]
                if not pending:
                    sent += 1
            except BlockingIOError:
                time.sleep(0.05)  # the balancer reads no further: as it should, eventually
            except OSError:
                break  # the balancer gave up on this client: also bounded
    report(f"pipelining, never reading ({lb_worker})", requests_sent=sent,
           rss_rise_mib=peak.rise / MIB, baseline_mib=peak.baseline / MIB)
    still_serving(stack)
    assert peak.rise <= RSS_BOUND, (f"the workers' RSS rose by {peak.rise / MIB:.1f} MiB "
                                    f"({sent} pipelined requests of 1 MiB answers, none read)")


def read_nothing(sock: socket.socket, seconds: float, enough: threading.Event) -> int:
    enough.wait(seconds)
    return 0


def read_slowly(sock: socket.socket, seconds: float, enough: threading.Event) -> int:
    got = 0
    stop = time.monotonic() + seconds
    sock.settimeout(1.0)
    while time.monotonic() < stop and not enough.is_set():
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += len(chunk)
        time.sleep(0.05)  # about 1.3 MB/s at most
    return got


@pytest.mark.parametrize("reader", [read_nothing, read_slowly], ids=["not at all", "slowly"])
def test_a_huge_answer_to_a_slow_client_costs_bounded_memory(
        stack: RunningStack, lb_worker: str,
        reader: Callable[[socket.socket, float, threading.Event], int]) -> None:
    warm_up(stack)
    host, port = stack.url.removeprefix("http://").split(":")
    with Peak(stack) as peak, socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET /big?n={400 * MIB} HTTP/1.1\r\nHost: x\r\n"
                     f"Connection: close\r\n\r\n".encode())
        got = reader(sock, 8.0, peak.far_past)
    report(f"400 MiB answer, client reading {reader.__name__} ({lb_worker})",
           read_mib=got / MIB, rss_rise_mib=peak.rise / MIB, baseline_mib=peak.baseline / MIB)
    still_serving(stack)
    assert peak.rise <= RSS_BOUND, (f"the workers' RSS rose by {peak.rise / MIB:.1f} MiB for "
                                    f"one 400 MiB answer ({got / MIB:.1f} MiB of it read)")
