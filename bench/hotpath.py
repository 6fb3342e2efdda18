"""The event-driven path's own work per routed GET, in-process: no sockets, no other process.

The real ``lb.aio`` server, forwarder, pool, router and metrics (batched, as in a worker) on a
uvloop loop, with in-memory transports: each request is fed to a ``ClientConnection`` as the
bytes wrk sends, the replica's answer (gunicorn's bytes for ``/home``) to the pooled
``ReplicaProtocol`` it went out on, and the reply written back is checked. What is left out
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests.helpers_aio import ANSWER, Harness  # after the path is set


def requests(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [b"GET /home?id=%d HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n"
            % rng.randint(100000, 999999) for _ in range(n)]


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
