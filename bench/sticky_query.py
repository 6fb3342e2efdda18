"""What a sticky key from the query (``LB_HASH_KEY=query:id``) costs, plain and hostile, side by side.

Four queries, each ending in the key: a plain one (``id=123456``); one as long as the others (4
KB) but of a single value, for what the length alone costs; the review's hostile one (4 KB of
``%61=`` parameters, each a name to decode before the key); and a targeted one (4 KB of
``%69%64x=``, near misses that spell the first two characters of ``id``). For each:

- ``request_key`` alone: ``lb.routing.query_value`` as the async path calls it, and the former
  way (every name decoded until one matches) for comparison;
- the whole routed GET on the event-driven path, in-process (``bench/hotpath.py``'s harness: the
  real server, forwarder and pool, no sockets), with the query in its request line.

Ratios are against the plain query. Loopback-free, one process; figures are the best of
``--repeat`` runs (the least disturbed).

    .venv/bin/python bench/sticky_query.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from urllib.parse import unquote_plus

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.hotpath import Harness
from lb.routing import query_value, request_key

REQUEST_LINE_MAX = 4094  # gunicorn's limit_request_line, the harness's too
KEY = "id=123456"


def filled(parameter: str) -> str:
    """A query of ``parameter`` repeated, then the key, as long as a request line allows."""
    room = REQUEST_LINE_MAX - len("GET /home? HTTP/1.1") - len(KEY) - 1
    return "&".join([parameter] * (room // (len(parameter) + 1))) + "&" + KEY


def padded() -> str:
    """A query as long, but of one long value: what its 4 KB cost without anything to decode."""
    return "pad=" + "x" * (len(filled("%61=")) - len(KEY) - 5) + "&" + KEY


QUERIES = {"plain": KEY, "4 KB, one value": padded(), "hostile %61=": filled("%61="),
           "targeted %69%64x=": filled("%69%64x=")}


def decode_every_name(query: str, name: str) -> str | None:
    """The former ``query_value``: each name decoded until one is ``name``."""
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name or unquote_plus(key) == name:
            return unquote_plus(value) if "%" in value or "+" in value else value
    return None


def best_us(call: Callable[[], object], repeat: int, seconds: float = 0.2) -> float:
    """Microseconds per call: the best of ``repeat`` batches of about ``seconds`` each."""
    began, n = time.perf_counter(), 0
    while time.perf_counter() - began < seconds / 4:
        call()
        n += 1
    batch = max(1, n * 4)
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        for _ in range(batch):
            call()
        best = min(best, (time.perf_counter() - began) / batch)
    return best * 1e6


def key_cost(query: str, lookup: Callable[[str, str], str | None], repeat: int) -> float:
    return best_us(lambda: request_key("query:id", lambda n: None,
                                       lambda n: lookup(query, n), "127.0.0.1"), repeat)


def request_cost(harness: Harness, query: str, repeat: int) -> float:
    raw = b"GET /home?%s HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n" % query.encode()
    harness.request(raw)
    harness.check()

    def one() -> None:
        harness.request(raw)
        harness.replies()

    cost = best_us(one, repeat)
    harness.request(raw)
    harness.check()
    return cost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        harness = Harness(folder)
        try:
            for label, query in QUERIES.items():
                assert query_value(query, "id") == decode_every_name(query, "id") == "123456"
                rows.append((label, len(query), query.count("&") + 1,
                             key_cost(query, query_value, args.repeat),
                             key_cost(query, decode_every_name, args.repeat),
                             request_cost(harness, query, args.repeat)))
        finally:
            harness.close()
    plain = rows[0]
    print("| query | bytes | params | request_key µs (x plain) | decoding every name µs "
          "(x plain) | whole routed GET µs (x plain) |")
    print("|---|---|---|---|---|---|")
    for label, size, params, key_us, former_us, request_us in rows:
        print(f"| {label} | {size} | {params} | {key_us:.2f} ({key_us / plain[3]:.1f}x) | "
              f"{former_us:.2f} ({former_us / plain[4]:.1f}x) | "
              f"{request_us:.1f} ({request_us / plain[5]:.2f}x) |")


if __name__ == "__main__":
    main()
