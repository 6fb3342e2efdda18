"""False kills under load: replicas the supervisor replaced while they were serving, with late
heartbeats counted as misses (``LB_LATE_HEARTBEATS=count``, as before) and forgiven while the
balancer's workers get answers (``forgive``, the default; ``lb.evidence``).

For each mode, one ``lb-run`` with the default heartbeat settings (0.5 s interval, 0.5 s
timeout, 2 misses) and 3 local replicas, then wrk phases (loopback, bounded by ``-d``):

- *routed + direct*: 64 keep-alive connections on the balancer and, at the same time, wrk on
  each replica's own address (``--direct`` connections each, as ``bench.py``'s *direct* runs);
- *direct only*: the replicas loaded directly, nothing routed (no answers to count: the
  evidence cannot help here, and this says how often that costs a replica).

Replacements are the supervisor's ``lb_replacements_total`` (``/_lb/metrics``) over the phase;
also printed: forgiven heartbeats, missed ones, wrk's errors and non-2xx answers.

    .venv/bin/python bench/late_heartbeats.py [--seconds 20] [--direct 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from analysis.stacks import LocalStack
from bench.bench import WRK_LUA, replica_processes, wrk

COUNTERS = ("lb_replacements_total", "lb_heartbeats_late_but_serving_total",
            "lb_heartbeat_failures_total")


def counters(url: str) -> dict[str, float]:
    text = requests.get(url + "/_lb/metrics", timeout=10).text
    found = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in found:
                found[s.name] += s.value
    return found


def phase(stack: LocalStack, lua: str, seconds: float, routed: int, direct: int) -> dict[str, Any]:
    addresses = [a for a in replica_processes(stack.registry)[0] if a]
    before = counters(stack.url)
    results: dict[str, dict[str, Any]] = {}
    runs = []
    if routed:
        runs.append(("routed", lambda: wrk([stack.url], routed, seconds, lua)))
    if direct:
        runs.append(("direct", lambda: wrk(addresses, direct * len(addresses), seconds, lua)))
    threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f()))
               for k, f in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2.0)  # a replacement decided at the end is counted
    after = counters(stack.url)
    return {
        "replaced": int(after["lb_replacements_total"] - before["lb_replacements_total"]),
        "forgiven": int(after["lb_heartbeats_late_but_serving_total"]
                        - before["lb_heartbeats_late_but_serving_total"]),
        "missed": int(after["lb_heartbeat_failures_total"]
                      - before["lb_heartbeat_failures_total"]),
        **{f"{k}_rps": round(v["rps"]) for k, v in results.items()},
        **{f"{k}_errors": v["errors"] + v["non2xx"] for k, v in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per phase (20)")
    parser.add_argument("--routed", type=int, default=64, help="connections on the balancer")
    parser.add_argument("--direct", type=int, default=16, help="connections on each replica")
    parser.add_argument("--rounds", type=int, default=1, help="phases of each kind per mode")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="lb-late-")
    lua = os.path.join(work, "ids.lua")
    with open(lua, "w", encoding="utf-8") as fh:
        fh.write(WRK_LUA)
    rows = []
    for mode in ("count", "forgive"):
        settings = {"late_heartbeats": mode, "log_level": "warning"}
        with LocalStack(f"late-{mode}", settings, os.path.join(work, mode)) as stack:
            for _ in range(args.rounds):
                for name, routed, direct in (("routed + direct", args.routed, args.direct),
                                             ("direct only", 0, args.direct)):
                    row = {"mode": mode, "phase": name,
                           **phase(stack, lua, args.seconds, routed, direct)}
                    print(row, flush=True)
                    rows.append(row)
    print(f"\n{args.seconds:.0f} s phases, {args.routed} connections on the balancer, "
          f"{args.direct} on each replica; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}")
    print("| LB_LATE_HEARTBEATS | phase | replaced | forgiven | missed | routed req/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['phase']} | {r['replaced']} | {r['forgiven']} | "
              f"{r['missed']} | {r.get('routed_rps', '-')} | "
              f"{r.get('routed_errors', 0) + r.get('direct_errors', 0)} |")


if __name__ == "__main__":
    main()
