"""Hot keys through the public API: sticky keys of Zipf popularity, bounded loads off, the former
method (in-flight counts) and the window (``lb.bounded``), side by side.

Each method gets a real stack (``lb-run``, N local replicas, ``LB_HASH_KEY=query:k``) and the
same seeded sequence of GETs ``/home?k=<key>`` (keys 0..K-1, P(rank r) ~ 1/r^s), sent by a few
concurrent clients; ``X-Served-By`` says who served each. A key's home is the replica that served
it with bounded loads off. Per method:

- max/mean of the per-replica counts;
- the share of requests served away from their key's home;
- the least share the bound requires: from the run with loads off, what each replica got above
  ``c x mean``, over all requests;
- how many replicas the requests a hot key spilled went to (mean over the 10 hottest keys that
  spilled at all).

The former method runs from another checkout (``--before``: a tree with the in-flight
``Router._bounded``, e.g. ``git worktree add /tmp/before <commit>``); without it that row is left
out. Loopback only; every run is bounded by its request count and a deadline.

    .venv/bin/python bench/hot_keys.py [--requests 20000] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import os
import random
import sys
import time
from collections import Counter, defaultdict

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from analysis.stacks import LocalStack


def zipf_keys(count: int, keys: int, s: float, seed: int) -> list[int]:
    """``count`` keys drawn from 0..keys-1 with P(rank r) ~ 1/r^s (key 0 the hottest)."""
    cumulative = list(itertools.accumulate(1 / (r + 1) ** s for r in range(keys)))
    rng = random.Random(seed)
    top = cumulative[-1]
    return [bisect.bisect_left(cumulative, rng.random() * top) for _ in range(count)]


async def _send(url: str, keys: list[int], clients: int, deadline: float) -> list[str]:
    """Who served each of ``keys`` (in order), ``clients`` at a time; "" for a failure."""
    served = [""] * len(keys)
    queue = iter(range(len(keys)))
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client() -> None:
            for i in queue:
                if time.monotonic() > deadline:
                    return
                try:
                    async with session.get(f"{url}/home?k={keys[i]}") as reply:
                        await reply.read()
                        if reply.status == 200:
                            served[i] = reply.headers.get("X-Served-By", "")
                except (TimeoutError, aiohttp.ClientError):
                    pass
        await asyncio.gather(*(client() for _ in range(clients)))
    return served


def run(label: str, settings: dict[str, str], keys: list[int], clients: int,
        tree: str | None = None) -> list[str]:
    """One stack, the whole sequence; ``tree``: the checkout whose ``lb`` runs it."""
    stack = LocalStack(label, settings)
    here = os.getcwd()
    if tree:  # ``python -m lb`` imports from its working directory first
        stack.env["PYTHONPATH"] = tree
        os.chdir(tree)
    try:
        with stack:
            warm = keys[:200]  # connections and replicas up, not counted
            asyncio.run(_send(stack.url, warm, clients, time.monotonic() + 60))
            return asyncio.run(_send(stack.url, keys, clients, time.monotonic() + 300))
    finally:
        os.chdir(here)


def figures(served: list[str], keys: list[int], home: dict[int, str], c: float,
            off: list[str]) -> dict[str, float]:
    ok = [(k, s) for k, s in zip(keys, served, strict=True) if s]
    counts = Counter(s for _, s in ok)
    n = len(home_counts := Counter(off_s for off_s in off if off_s)) or 1
    mean = len(ok) / n
    away = [(k, s) for k, s in ok if home.get(k) not in (None, s)]
    spill: dict[int, set[str]] = defaultdict(set)
    for k, s in away:
        spill[k].add(s)
    hot = sorted(spill, key=lambda k: k)[:10]  # key 0 is the hottest
    cap = c * sum(home_counts.values()) / n
    least = sum(max(0.0, v - cap) for v in home_counts.values()) / max(1, sum(home_counts.values()))
    return {"max_mean": max(counts.values()) / mean, "away": len(away) / len(ok),
            "least": least, "spread": sum(len(spill[k]) for k in hot) / len(hot) if hot else 0.0,
            "failed": len(served) - len(ok)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--s", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--c", type=float, default=1.25, help="LB_BOUNDED_LOAD")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--strategy", default="maglev")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--before", default=None,
                        help="checkout with the former (in-flight) bounded loads")
    args = parser.parse_args(argv)
    keys = zipf_keys(args.requests, args.keys, args.s, args.seed)
    base = {"n": str(args.n), "strategy": args.strategy, "hash_key": "query:k",
            "log_level": "warning"}
    off = run("hot-off", {**base, "bounded_load": "0"}, keys, args.clients)
    home = {k: s for k, s in zip(keys, off, strict=True) if s}
    rows = [("off", off)]
    bounded = {**base, "bounded_load": str(args.c)}
    if args.before:
        rows.append(("in-flight (former)", run("hot-before", bounded, keys, args.clients,
                                               args.before)))
    rows.append(("window (lb.bounded)", run("hot-window", bounded, keys, args.clients)))
    print(f"{args.requests} GETs, Zipf s={args.s} over {args.keys} keys, N={args.n}, "
          f"{args.strategy}, c={args.c}, {args.clients} clients")
    print("| method | max/mean | share away from home | least share the bound requires | "
          "replicas a hot key's spill went to (top 10) | failed |")
    print("|---|---|---|---|---|---|")
    for label, served in rows:
        f = figures(served, keys, home, args.c, off)
        print(f"| {label} | {f['max_mean']:.3f} | {f['away']:.2%} | {f['least']:.2%} | "
              f"{f['spread']:.1f} | {f['failed']:.0f} |")


if __name__ == "__main__":
    main()
