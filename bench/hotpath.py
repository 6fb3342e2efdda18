"""The event-driven path's own work per routed GET, in-process: no sockets, no other process.

The real ``lb.aio`` server, forwarder, pool, router and metrics (batched, as in a worker) on a
uvloop loop, with in-memory transports: each request is fed to a ``ClientConnection`` as the
bytes wrk sends, the replica's answer (gunicorn's bytes for ``/home``) to the pooled
``ReplicaConnection`` it went out on, and the reply written back is checked. What is left out
is what the kernel and the loop add (system calls, wake-ups): this is the Python (and the
parsers' C) a request costs on a warm cache.

Three figures, on a registry of 3 ready replicas (the benchmark's settings: maglev, key
``query:id``):

- **warm µs per request**: best of ``--repeat`` runs of ``--requests`` requests back to back
  (the minimum is the least disturbed by other processes);
- **cold µs per request**: the median over ``--cold`` requests, each half (the request, the
  replica's answer) run after the caches were flushed, as a worker at half load meets them
  once wrk and the replicas have run in between: closer to what a worker really spends, since
  a cold interpreter pays for every object and line of code a request touches;
- **calls per request**: the balancer's Python function calls and the calls of C functions
  they make (``sys.setprofile``; the harness's own are not counted), the same on every run of
  the same code: what changes when code is cut.

Run: ``make bench-hotpath`` (``.venv/bin/python bench/hotpath.py [--requests 20000] [--repeat 5]
[--cold 2000]``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import uvloop

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lb.aio.server import ClientConnection, Limits, Server
from lb.aio.upstream import AsyncForwarder, ReplicaConnection, ReplicaPool
from lb.bootstrap import initial_state
from lb.ops.metrics import BalancerMetrics
from lb.registry import READY, Registry, RegistryView
from lb.routing import Router
from lb.settings import Settings
from lb.watch import RegistryWatch

BODY = b'{"message":"Hello from Server: 1","status":"successful"}\n'
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Fri, 04 Dec 2026 02:00:00 GMT\r\n"
          b"Connection: keep-alive\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class Transport:
    """Enough of an asyncio transport for the server and the pool: writes are kept."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 5000)}.get(name, default)


class Harness:
    """One client connection, one warm pooled connection per replica."""

    def __init__(self, folder: str) -> None:
        settings = Settings.from_env({}, registry=os.path.join(folder, "registry.json"), n=3,
                                     strategy="maglev", hash_key="query:id")
        state = initial_state(settings)
        for r in state.replicas:
            r.state, r.address = READY, f"http://127.0.0.1:{40000 + r.server_id}"
        registry = Registry(settings.registry_path)
        registry.create(state, replace=True)
        time.sleep(RegistryView.RACY_SECONDS * 2)  # past the racy-stamp window, as in a worker
        self.loop = uvloop.new_event_loop()
        metrics = BalancerMetrics()
        self.counts = metrics.batched()
        router = Router(settings, registry, metrics)
        self.watch = RegistryWatch.attach(router.view, self.loop)  # as in a worker
        self.pool = ReplicaPool(self.loop, settings.connect_timeout, settings.upstream_timeout)
        self.replicas: dict[str, tuple[ReplicaConnection, Transport]] = {}
        for r in state.replicas:
            assert r.address is not None
            self.connect(r.address)
        server = Server(settings, Limits(4094, 100, 8190, settings.max_body),
                        AsyncForwarder(settings, router, self.pool, self.counts),
                        app=None, counts=self.counts,  # type: ignore[arg-type]
                        keepalive=5, server_header="gunicorn")
        self.client = ClientConnection(server, self.loop)
        self.client_transport = Transport(("127.0.0.1", 40001))
        self.client.connection_made(self.client_transport)  # type: ignore[arg-type]

    def connect(self, address: str) -> None:
        """A warm pooled connection to the replica at ``address``, as after a first request."""
        conn = ReplicaConnection(self.loop, self.pool.deadlines, self.pool.heads)
        transport = Transport(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.keep_alive = True
        self.pool.release(address, conn)
        self.replicas[address] = (conn, transport)

    def reconnect(self, conn: ReplicaConnection) -> None:
        """A fresh connection in place of ``conn`` (closed)."""
        address = next(a for a, (c, _) in self.replicas.items() if c is conn)
        self.connect(address)

    def send(self, raw: bytes) -> tuple[ReplicaConnection, bytes]:
        """``raw`` from the client; the connection it went out on and what was sent."""
        self.client.data_received(raw)
        for conn, transport in self.replicas.values():
            if transport.written:
                sent = b"".join(transport.written)
                transport.written.clear()
                return conn, sent
        raise AssertionError(f"no replica was asked: {self.client_transport.written[-1:]!r}")

    def request(self, raw: bytes, answer: bytes = ANSWER) -> None:
        conn, _ = self.send(raw)
        conn.data_received(answer)

    def replies(self) -> bytes:
        """What the client got since the last call."""
        reply = b"".join(self.client_transport.written)
        self.client_transport.written.clear()
        return reply

    def check(self) -> None:
        reply = self.replies()
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(BODY), reply[:300]

    def close(self) -> None:
        """The registry watch (an inotify descriptor) and the loop."""
        if self.watch is not None:
            self.watch.close()
        self.loop.close()


def requests(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [b"GET /home?id=%d HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n" % rng.randint(100000, 999999)
            for _ in range(n)]


class CacheFlush:
    """Writes a buffer larger than the machine's caches, so what runs next finds them cold."""

    def __init__(self, mib: int = 16) -> None:
        self.buffer = bytearray(mib * 2**20)
        self.ones = b"\x01" * (len(self.buffer) // 64)

    def __call__(self) -> None:
        self.buffer[::64] = self.ones  # a byte in every cache line


def run(n: int = 20_000, repeat: int = 5, cold: int = 2000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        harness = Harness(folder)
        batch = requests(n)
        for raw in batch[:200]:  # warm: the routing table, caches
            harness.request(raw)
        harness.check()
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            for raw in batch:
                harness.request(raw)
            best = min(best, time.perf_counter() - began)
            harness.check()
            harness.counts.flush()
        # Cold: as a worker at half load meets each request, after other processes ran; the
        # caches are flushed before the request and again before the replica's answer.
        flush, clock, halves = CacheFlush(), time.perf_counter, []
        for raw in batch[:cold]:
            flush()
            began = clock()
            conn, _ = harness.send(raw)
            sent = clock()
            flush()
            answered = clock()
            conn.data_received(ANSWER)
            halves.append((sent - began, clock() - answered))
            harness.check()
        calls = [0]
        ours = os.path.join(os.path.dirname(HERE), "lb") + os.sep

        def count(frame: Any, event: str, _arg: Any) -> None:
            # The balancer's own calls: its functions, and C functions they call (the
            # frame is the caller's then); not the harness's.
            if event in ("call", "c_call") and frame.f_code.co_filename.startswith(ours):
                calls[0] += 1

        sample = batch[:1000]
        sys.setprofile(count)
        for raw in sample:
            harness.request(raw)
        sys.setprofile(None)
        harness.check()
        harness.close()
    request_us = 1e6 * statistics.median(h[0] for h in halves)
    answer_us = 1e6 * statistics.median(h[1] for h in halves)
    return {"us_per_request": 1e6 * best / n, "calls_per_request": calls[0] / len(sample),
            "cold_request_us": request_us, "cold_answer_us": answer_us,
            "cold_us": request_us + answer_us}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", type=int, default=2000, help="requests on cold caches")
    args = parser.parse_args(argv)
    f = run(args.requests, args.repeat, args.cold)
    print(f"warm: {f['us_per_request']:.1f} µs per request (best of {args.repeat} x "
          f"{args.requests}), {f['calls_per_request']:.1f} calls per request")
    print(f"cold: {f['cold_us']:.1f} µs per request (median of {args.cold}: the request "
          f"{f['cold_request_us']:.1f} µs, the answer {f['cold_answer_us']:.1f} µs)")


if __name__ == "__main__":
    main()
