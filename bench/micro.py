"""Micro-benchmark: the balancer's own per-request work, without any HTTP.

For each lookup strategy, on a registry file with N ready replicas (as a worker sees it):

- ``RegistryView.current()``: the registry check (one ``stat``; the JSON is parsed again only
  after a write);
- ``lookup``: the strategy's ``lookup(key)`` alone;
- ``Router.candidates(key)``: registry check + table check + walk to 1 + retries replicas, i.e.
  the balancer's whole choice for one request;
- the same with bounded loads (c = 1.25);
- ``request_key``: drawing the request id.

Each figure is the best of ``--repeat`` runs of ``--calls`` calls (the usual ``timeit``
practice: the minimum is the least disturbed by other processes), in microseconds per call.
Run: ``.venv/bin/python bench/micro.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from lb.bootstrap import initial_state
from lb.registry import READY, Registry, RegistryView
from lb.routing import Router, request_key
from lb.settings import Settings


def best_us(fn: Callable[[int], object], keys: list[int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        for k in keys:
            fn(k)
        best = min(best, time.perf_counter() - began)
    return 1e6 * best / len(keys)


def _registry_check(view: RegistryView) -> Callable[[int], object]:
    return lambda _key: view.current()


def router_for(folder: str, n: int, **overrides: Any) -> Router:
    settings = Settings.from_env({}, registry=os.path.join(folder, "registry.json"), n=n,
                                 **overrides)
    state = initial_state(settings)
    for r in state.replicas:
        r.state, r.address = READY, f"http://127.0.0.1:{40000 + r.server_id}"
    registry = Registry(settings.registry_path)
    registry.create(state, replace=True)
    time.sleep(RegistryView.RACY_SECONDS * 2)  # let the file age past the racy-stamp window
    return Router(settings, registry)


def run(calls: int = 20_000, repeat: int = 5, n: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(5)
    keys = [rng.randint(100000, 999999) for _ in range(calls)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for label, overrides in (("ring (seed, M=512, K=9)", {"strategy": "ring"}),
                                 ("ring (xxhash, M=512, K=9)", {"strategy": "ring",
                                                                "hash": "xxhash"}),
                                 ("ring160", {"strategy": "ring160"}),
                                 ("maglev", {"strategy": "maglev"})):
            sub = os.path.join(folder, label.split()[0] + str(len(rows)))
            os.makedirs(sub)
            router = router_for(sub, n, **overrides)
            os.makedirs(sub + "b")
            bounded = router_for(sub + "b", n, bounded_load=1.25, **overrides)
            router.candidates(keys[0])
            bounded.candidates(keys[0])
            lookup = router.table().ring
            registry = router.view.registry
            assert isinstance(registry, Registry)  # router_for makes a file registry
            view = RegistryView(registry)
            view.current()
            rows.append({
                "strategy": label,
                "registry_check_us": best_us(_registry_check(view), keys, repeat),
                "lookup_us": best_us(lookup.lookup, keys, repeat),
                "candidates_us": best_us(router.candidates, keys, repeat),
                "candidates_bounded_us": best_us(bounded.candidates, keys, repeat),
                "request_key_us": best_us(
                    lambda k: request_key("random", _absent, _absent, "127.0.0.1"), keys, repeat),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| strategy | registry check | lookup | candidates() (lookup + registry check + "
             "walk) | candidates(), bounded loads 1.25 | request id |"),
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['registry_check_us']:.2f} µs | {r['lookup_us']:.2f} µs | "
              f"{r['candidates_us']:.2f} µs | {r['candidates_bounded_us']:.2f} µs | "
              f"{r['request_key_us']:.2f} µs |" for r in rows]
    return "\n".join(lines)


def _absent(name: str) -> str | None:
    return None  # no header or query field: the key is random


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n", type=int, default=3, help="replicas")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    rows = run(args.calls, args.repeat, args.n)
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    worst = max(r["candidates_us"] for r in rows)
    print(f"\nworst candidates(): {worst:.2f} µs per request (target < 20 µs): "
          f"{'met' if worst < 20 else 'NOT met'}", file=sys.stderr)


if __name__ == "__main__":
    main()
