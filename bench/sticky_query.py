"""What a sticky key from the query (``LB_HASH_KEY=query:id``) costs, plain and hostile, side by side.

Four queries, each ending in the key: a plain one (``id=123456``); one as long as the others (4
KB) but of a single value, for what the length alone costs; the review's hostile one (4 KB of
``%61=`` parameters, each a name to decode before the key); and a targeted one (4 KB of
``%69%64x=``, near misses that spell the first two characters of ``id``). For each:

- ``request_key`` alone: ``lb.routing.query_value`` as the async path calls it, and the former
  way (every name decoded until one matches) for comparison;
- the whole routed GET on the event-driven path, in-process (``tests/helpers_aio.py``'s harness: the
  real server, forwarder and pool, no sockets), with the query in its request line;
- with ``--stack N``: the CPU the balancer's processes (gunicorn's master and its one async
  worker) spend per request on a real stack (``lb-run`` on loopback, 3 local replicas), over
  N requests on one kept-alive connection: what a request costs with the system calls too.

Ratios are against the plain query. In-process figures are the best of ``--repeat`` runs (the
least disturbed).

    .venv/bin/python bench/sticky_query.py [--repeat 5] [--stack 3000]
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import time
from collections.abc import Callable
from urllib.parse import unquote_plus

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from analysis.stacks import LocalStack
from lb.routing import query_value, request_key
from tests.helpers_aio import Harness

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


def stack_costs(requests: int) -> dict[str, float]:
    """CPU µs per request of the balancer's gunicorn (master and worker), by query."""
    costs = {}
    with LocalStack("sticky", {"workers": 1, "n": 3, "hash_key": "query:id"}) as stack:
        assert stack.proc is not None
        gunicorn = [p for p in psutil.Process(stack.proc.pid).children()
                    if "gunicorn" in " ".join(p.cmdline())]
        procs = [q for p in gunicorn for q in (p, *p.children(recursive=True))]
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        try:
            for label, query in QUERIES.items():
                path = f"/home?{query}"

                def get(path: str = path) -> None:
                    conn.request("GET", path)
                    reply = conn.getresponse()
                    reply.read()
                    assert reply.status == 200, reply.status

                for _ in range(min(200, requests)):
                    get()
                began = cpu(procs)
                for _ in range(requests):
                    get()
                costs[label] = (cpu(procs) - began) / requests * 1e6
        finally:
            conn.close()
    return costs


def cpu(procs: list[psutil.Process]) -> float:
    times = [p.cpu_times() for p in procs]
    return sum(t.user + t.system for t in times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stack", type=int, default=0, metavar="N",
                        help="also N requests per query on a real stack (0: not)")
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
    if args.stack:
        costs = stack_costs(args.stack)
        print(f"\nReal stack, balancer CPU per request ({args.stack} requests each):")
        for label, us in costs.items():
            print(f"- {label}: {us:.0f} µs ({us / costs['plain']:.2f}x)")


if __name__ == "__main__":
    main()
