"""Figures of the Swarm deployment on the local 3-node test cluster (``make bench-swarm``).

Builds its own cluster (``make cluster-up``: a manager and two workers, each a container with its
own engine, on this machine), measures, and takes the cluster down again:

1. **/add of 20**: the time ``POST /add {"n": 20}`` takes (it returns once all 20 answer their
   heartbeat), and the time until every one of them has answered a GET *through the balancer*.
2. **Throughput, 3 nodes vs 1**: wrk through the balancer (keep-alive connections, random
   6-digit ids) with the same number of replicas spread over the 3 nodes, then all on one worker
   (``LB_SWARM_CONSTRAINTS=node.hostname==...``); interleaved rounds.
3. **Recovery after a node stops**: a worker's container stopped outright (``docker stop -t 0``)
   while a client sends GETs; until ``/rep`` no longer lists its replicas (detection), until
   each replacement answers through the balancer, until the manager calls the node down; the
   client's failed requests. Repeated ``--stops`` times (the node is started again between).

Every load is bounded in time and goes to 127.0.0.1 (the manager's published port) only. The
nodes share this machine's cores: three nodes add no CPU here, so (2) measures what crossing
the overlay network costs, not what more hosts would add. Writes bench/swarm-results.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import docker

from bench.bench import WRK_LUA, wrk
from tests.conftest import free_port
from tests.helpers_chaos import Load
from tests.helpers_swarm import Cluster, http_session, start_cluster, wait_until

SETTINGS = {"LB_STRATEGY": "maglev", "LB_HASH_KEY": "query:id", "LB_START_TIMEOUT": "60",
            "LB_N": "3", "LB_LOG_LEVEL": "warning", "LB_MAX_REPLICAS": "32"}


def all_seen(cluster: Cluster, names: set[str]) -> bool:
    """Whether each of ``names`` has answered a GET through the balancer (in this or an
    earlier call with the same ``names``)."""
    got = _seen.setdefault(frozenset(names), set())
    got |= cluster.serving(http_session(), 10)
    return names <= got


_seen: dict[frozenset[str], set[str]] = {}


def scale(cluster: Cluster, n: int) -> float:
    """Bring the replica set to ``n`` with /rm or /add; the call's seconds."""
    session = http_session()
    have = cluster.rep(session)["N"]
    began = time.monotonic()
    if n > have:
        reply = session.post(cluster.url + "/add", json={"n": n - have}, timeout=300)
    elif n < have:
        reply = session.delete(cluster.url + "/rm", json={"n": have - n}, timeout=300)
    else:
        return 0.0
    if reply.status_code != 200:
        raise RuntimeError(f"scaling to {n}: {reply.status_code} {reply.text}")
    return time.monotonic() - began


def add_twenty(cluster: Cluster) -> dict[str, Any]:
    session = http_session()
    scale(cluster, 3)
    before = set(cluster.rep(session)["replicas"])
    began = time.monotonic()
    reply = session.post(cluster.url + "/add", json={"n": 20}, timeout=300)
    returned = time.monotonic() - began
    if reply.status_code != 200:
        raise RuntimeError(f"/add 20: {reply.status_code} {reply.text}")
    new = set(reply.json()["message"]["replicas"]) - before
    wait_until("every balancer routes by the change", lambda: all_seen(cluster, new), 120, 0)
    serving = time.monotonic() - began
    where = cluster.placement()
    per_node = {node: sum(1 for h in new if where.get(h) == node) for node in sorted(
        set(where.values()))}
    scale(cluster, 3)
    return {"add_returned_s": round(returned, 1), "all_serving_s": round(serving, 1),
            "per_node": per_node}


def redeploy(cluster: Cluster, constraints: str) -> None:
    """make swarm-up with other constraints: it returns once the updated balancer serves."""
    proc = cluster.make("swarm-up", timeout=300, env={
        **SETTINGS, "LB_SWARM_CONSTRAINTS": constraints,
        "DOCKER_HOST": cluster.socket("manager")})
    if proc.returncode != 0:
        raise RuntimeError(f"swarm-up: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")


def throughput(cluster: Cluster, replicas: int, rounds: int, seconds: float,
               connections: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is missing: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    lua = work / "ids.lua"
    lua.write_text(WRK_LUA)
    layouts = {"3 nodes": "", "1 node": f"node.hostname=={cluster.name}-worker1"}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in layouts}
    placements: dict[str, dict[str, int]] = {}
    try:
        for _ in range(rounds):
            for layout, constraints in layouts.items():
                redeploy(cluster, constraints)
                scale(cluster, 0)
                scale(cluster, replicas)
                where = cluster.placement()
                placements[layout] = {n: list(where.values()).count(n)
                                      for n in sorted(set(where.values()))}
                wrk([cluster.url + "/home"], connections, 2, str(lua))  # warm the pools
                results[layout].append(wrk([cluster.url + "/home"], connections, seconds,
                                           str(lua)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        redeploy(cluster, "")
        scale(cluster, 0)
        scale(cluster, 3)
    summary = {}
    for layout, runs in results.items():
        summary[layout] = {
            "placement": placements.get(layout),
            "rps": [round(r["rps"]) for r in runs],
            "p50_ms": [round(r["p50_ms"], 1) for r in runs],
            "p99_ms": [round(r["p99_ms"], 1) for r in runs],
            "errors": sum(r["errors"] + r["non2xx"] for r in runs),
        }
    return summary


def node_stop(cluster: Cluster, node_hint: int) -> dict[str, Any]:
    session = http_session()
    scale(cluster, 6)
    wait_until("6 replicas placed", lambda: len(cluster.placement()) == 6, 120, 0.1)
    before = cluster.placement()
    workers = sorted({n for n in before.values() if n.startswith("worker")})
    node = max(workers, key=lambda w: (list(before.values()).count(w), w == f"worker{node_hint}"))
    leaving = {h for h, n in before.items() if n == node}
    node_id = cluster.node_id(node)
    host = docker.from_env(timeout=60)
    load = Load(cluster.url, total=2000, seconds=25, threads=6).start()
    time.sleep(2)
    began = time.monotonic()
    host.containers.get(f"{cluster.name}-{node}").stop(timeout=0)
    seen: set[str] = set()
    at: dict[str, float] = {}
    try:
        # One loop watches all three, so each time is its own (not one after the other).
        while len(at) < 3 and time.monotonic() - began < 180:
            elapsed = time.monotonic() - began
            rep = cluster.rep(session)
            new = set(rep["replicas"]) - set(before)
            if "detected" not in at and not leaving & set(rep["replicas"]) and rep["N"] == 6:
                at["detected"] = elapsed
            if "detected" in at and "serving" not in at:
                seen |= cluster.serving(session, 10)
                if new <= seen:
                    at["serving"] = time.monotonic() - began
            if "down" not in at and \
                    cluster.client().api.inspect_node(node_id)["Status"]["State"] == "down":
                at["down"] = elapsed
            time.sleep(0.05)
        where = cluster.placement()
        load.wait()
    finally:
        host.containers.get(f"{cluster.name}-{node}").start()
        host.close()
    if len(at) < 3:
        raise RuntimeError(f"node stop: only {at} within 180 s")
    detected, serving, down = at["detected"], at["serving"], at["down"]
    landed = sorted(where.get(h, "?") for h in new)
    return {"node": node, "replicas_lost": len(leaving), "detected_s": round(detected, 1),
            "all_replacements_serving_s": round(serving, 1),
            "manager_saw_node_down_s": round(down, 1), "replacements_on": landed,
            "client_requests": load.sent,
            "client_failures": len(load.failures),
            "failures": [f for _, f in load.failures[:20]]}


def failure_kinds(failures: list[str]) -> str:
    """The failures' first words (``HTTP 502``, a connection error), counted."""
    kinds: dict[str, int] = {}
    for f in failures:
        kind = f.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return "".join(f" ({n}× {k})" for k, n in kinds.items())


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# The Swarm deployment's figures (`make bench-swarm`)",
        "",
        f"{meta['when']}, {meta['cpus']} cores shared by the three node containers, their "
        "engines, the replicas, the balancer and the load generator; Docker "
        f"{meta['engine']} in every node; load average (1, 5, 15 min) {meta['load_before']} "
        f"before, {meta['load_after']} after (other work shared the machine). Stack settings: "
        + ", ".join(f"`{k}={v}`" for k, v in SETTINGS.items()) + ".",
        "",
        "## /add of 20 replicas",
        "",
        ("| /add returned (all 20 answered their heartbeat) | all 20 answered through the "
        "balancer | replicas per node |"),
        "|---|---|---|",
        (f"| {results['add20']['add_returned_s']} s | {results['add20']['all_serving_s']} s | "
        f"{results['add20']['per_node']} |"),
        "",
        (f"## Throughput through the balancer, {meta['replicas']} replicas "
        f"(wrk, {meta['connections']} connections, {meta['seconds']:.0f} s per run)"),
        "",
        "| replicas on | placement | req/s per run | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for layout, r in results["throughput"].items():
        lines.append(f"| {layout} | {r['placement']} | {', '.join(map(str, r['rps']))} | "
                     f"{', '.join(map(str, r['p50_ms']))} | {', '.join(map(str, r['p99_ms']))} "
                     f"| {r['errors']} |")
    lines += [
        "",
        "## A worker node stopped outright (6 replicas, a client sending GETs)",
        "",
        ("| node | replicas lost | /rep without them | all replacements serve | manager calls "
        "the node down | replacements on | client requests | failed |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["node_stops"]:
        lines.append(f"| {r['node']} | {r['replicas_lost']} | {r['detected_s']} s | "
                     f"{r['all_replacements_serving_s']} s | {r['manager_saw_node_down_s']} s | "
                     f"{', '.join(r['replacements_on'])} | {r['client_requests']} | "
                     f"{r['client_failures']}{failure_kinds(r['failures'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:] == ["--markdown"]:  # rewrite the .md from the .json of the last run
        results = json.loads((HERE / "swarm-results.json").read_text())
        (HERE / "swarm-results.md").write_text(markdown(results))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=6, help="replicas for the throughput runs")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved throughput rounds")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=24, help="wrk connections")
    parser.add_argument("--stops", type=int, default=2, help="node stops to measure")
    args = parser.parse_args()

    cluster, proc = start_cluster(free_port(), SETTINGS)
    try:
        if proc.returncode != 0:
            sys.exit(f"make cluster-up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results: dict[str, Any] = {"meta": {
            "when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "engine": cluster.client().version()["Version"], "replicas": args.replicas,
            "seconds": args.seconds, "connections": args.connections,
            "load_before": [round(x, 1) for x in os.getloadavg()]}}
        results["add20"] = add_twenty(cluster)
        print("add 20:", results["add20"], flush=True)
        results["throughput"] = throughput(cluster, args.replicas, args.rounds, args.seconds,
                                           args.connections)
        print("throughput:", results["throughput"], flush=True)
        results["node_stops"] = []
        for k in range(args.stops):
            results["node_stops"].append(node_stop(cluster, 1 + k % 2))
            print("node stop:", results["node_stops"][-1], flush=True)
    finally:
        cluster.close()
        cluster.make("cluster-down", timeout=300)
    results["meta"]["load_after"] = [round(x, 1) for x in os.getloadavg()]
    (HERE / "swarm-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "swarm-results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
