"""What a hostile query costs a sticky key (``LB_HASH_KEY=query:k``): a benchmark, not a test.

A 4 KB query of ``%61=`` parameters (800 of them: 1,000 would pass gunicorn's 4,094-byte request
line limit and be a 414) makes ``lb.routing.query_value`` decode every name on the way to ``k``.
The target: such a request costs within about 2x a plain one. Printed per worker:

- **in-process**: µs of ``request_key`` for the plain query (``k=123456``) and for the hostile
  one (``k`` last, and ``k`` absent), and their ratio;
- **end to end**: the median latency of sequential keep-alive GETs through a real stack (one
  replica, ``LB_HASH_KEY=query:k``), plain against hostile, and their ratio.

Run: ``PYTHONPATH=. .venv/bin/python bench/sticky_query.py [--requests 2000] [--worker both]``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HOSTILE = "&".join(["%61="] * 800)
QUERIES = {
    "plain": "k=123456",
    "hostile, k last": f"{HOSTILE}&k=123456",
    "hostile, no k": HOSTILE,
}


def in_process(rounds: int) -> dict[str, float]:
    """µs per ``request_key`` call, best of 5 runs of ``rounds`` calls."""
    from lb.routing import query_value, request_key

    out = {}
    for name, query in QUERIES.items():
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            def in_query(name: str, query: str = query) -> str | None:
                return query_value(query, name)

            for _ in range(rounds):
                request_key("query:k", lambda name: None, in_query, "127.0.0.1")
            best = min(best, (time.perf_counter() - began) / rounds)
        out[name] = best * 1e6
    return out


def end_to_end(url: str, requests: int) -> dict[str, float]:
    """Median ms per keep-alive GET /home?<query>, one connection, one request at a time."""
    host, port = url.removeprefix("http://").split(":")
    out = {}
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        for name, query in QUERIES.items():
            raw = f"GET /home?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            times = []
            for _ in range(requests):
                began = time.perf_counter()
                sock.sendall(raw)
                status = reader.readline()
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                times.append(time.perf_counter() - began)
                if not status.startswith(b"HTTP/1.1 200"):
                    sys.exit(f"{name}: {status!r}")
            out[name] = statistics.median(times) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--worker", choices=("async", "threads", "both"), default="both")
    options = parser.parse_args()
    from tests.helpers_stack import running_stack

    calls = in_process(200)
    print("in-process request_key, µs: " + ", ".join(f"{k}: {v:.1f}" for k, v in calls.items())
          + f"; ratio hostile/plain: {calls['hostile, k last'] / calls['plain']:.1f}x "
          f"(no k: {calls['hostile, no k'] / calls['plain']:.1f}x)")
    workers = ("async", "threads") if options.worker == "both" else (options.worker,)
    for worker in workers:
        with running_stack(Path(tempfile.mkdtemp(prefix="sticky")), worker, n=1,
                           hash_key="query:k") as stack:
            end_to_end(stack.url, 200)  # warm up
            ms = end_to_end(stack.url, options.requests)
        ratio = ms["hostile, k last"] / ms["plain"]
        print(f"{worker}: median ms per GET: " + ", ".join(f"{k}: {v:.3f}" for k, v in ms.items())
              + f"; ratio hostile/plain: {ratio:.2f}x (no k: "
              f"{ms['hostile, no k'] / ms['plain']:.2f}x; target: about 2x at most)")


if __name__ == "__main__":
    main()
