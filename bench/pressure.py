"""Under pressure: saturation, a hung replica and overload, before and after, beside HAProxy.

Three scenarios, each run on this checkout (*after*) and on a commit given with ``--base``
(*before*: the whole stack, balancer and supervisor, checked out from that commit into a
temporary git worktree), in one run on one machine, loopback only, every load bounded in time:

1. **Saturation.** A stack of 3 local replicas with the default settings; ``--sat-clients``
   keep-alive clients as fast as they can for ``--sat-seconds`` through the balancer, then the
   same with a second load of as many clients sent to the replicas directly (as ``make bench``
   does): how many replicas the supervisor replaced, and how many requests failed.
2. **Hang.** 32 keep-alive clients through the balancer; one replica's processes are SIGSTOPped
   for 8 s, then SIGCONTed: requests slower than 1 s, the slowest, the failures; *after* with
   its defaults and with hedging off (``LB_HEDGE_SHARE=0``).
3. **Overload.** 3 replicas of 4 threads that take ``--service`` seconds per request (the test
   suite's echo replicas, ``tests/helpers_overload.py``), capacity measured in the same run by a
   closed loop. An open loop (a new connection per request, as independent clients) offers 2x
   and 4x that through this balancer with its limits (``LB_REPLICA_MAXCONN`` 2 per worker, 4
   per replica in all, ``LB_QUEUE_TIMEOUT`` 1 s), the same with limits off, on each worker of
   ``--workers`` (default async), and HAProxy with ``maxconn 4`` per server and ``timeout queue
   1s`` on the same replicas: goodput and its share of capacity, the served requests' p99, 503s
   (with ``Retry-After``), requests unanswered. ``--only overload --workers async,threads``
   compares the two data paths (the threads worker with ``LB_QUEUE_SIZE`` 8: a queued request
   holds one of its threads).

Clients: ``tests/helpers_chaos.py`` ``Load`` (keep-alive sessions) for 1 and 2,
``tests/helpers_overload.py`` for 3: the same clients the suite's tests use.

Writes ``bench/results-pressure.md`` (and ``.json``). ``make bench-pressure``; ``--quick`` for a
shorter run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from analysis.stacks import LocalStack, free_port
from bench.bench import HAPROXY_CFG, _process, tree_of
from tests.helpers_chaos import Load
from tests.helpers_overload import Shots, closed_loop, echo_replicas, open_loop
from tests.helpers_scripted import threads_balancer

HANG_CLIENTS = 32
HANG_STOP_AT, HANG_STOPPED, HANG_AFTER = 3.0, 8.0, 4.0
EVEN = {"strategy": "maglev"}  # keys spread evenly: "one replica of three" means a third
OVERLOAD_THREADS, OVERLOAD_MAXCONN, OVERLOAD_QUEUE_TIMEOUT = 4, 2, 1.0
OVERLOAD_THREADS_QUEUE = 8  # LB_QUEUE_SIZE of the threads worker's runs


# -- stacks of either commit --------------------------------------------------------------------
class TreeStack(LocalStack):
    """``lb-run`` of the code in ``tree``: balancer, supervisor and replicas all from it."""

    def __init__(self, label: str, settings: dict[str, str], tree: str, folder: str) -> None:
        super().__init__(label, settings, os.path.join(folder, label))
        self.tree = tree
        self.env["PYTHONPATH"] = tree

    def __enter__(self) -> Self:
        cwd = os.getcwd()
        os.chdir(self.tree)  # python -m lb imports from the working directory first
        try:
            return super().__enter__()
        finally:
            os.chdir(cwd)

    def entries(self) -> list[dict[str, Any]]:
        with open(self.registry, encoding="utf-8") as fh:
            return json.load(fh)["replicas"]  # type: ignore[no-any-return]

    def handles(self) -> set[str]:
        return {e.get("handle") or "" for e in self.entries()}

    def replaced_since(self, handles: set[str]) -> int:
        """Replicas started since ``handles`` were read (a replacement gets a new handle)."""
        return len(self.handles() - handles)

    def replica_urls(self) -> list[str]:
        return [e["address"] for e in self.entries() if e.get("address")]


def keep_alive_clients(url: str, clients: int, seconds: float) -> Load:
    """``clients`` keep-alive clients as fast as they can for ``seconds`` (bounded in time)."""
    return Load(url, total=10**7, seconds=1.0, threads=clients, limit=seconds).start()


def summary(load: Load, late: float = 1.0) -> dict[str, Any]:
    took = sorted(seconds for _, seconds in load.timings)
    return {"requests": load.sent, "failed": len(load.failures),
            "failure_kinds": sorted({why[:60] for _, why in load.failures})[:3],
            "p99_ms": round(took[int(len(took) * 0.99)] * 1000, 1) if took else None,
            f"over_{late:g}s": sum(t > late for t in took),
            "slowest_ms": round(took[-1] * 1000, 1) if took else None}


# -- 1. saturation ------------------------------------------------------------------------------
def saturation(tree: str, label: str, folder: str, clients: int,
               seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with TreeStack(f"sat-{label}", {}, tree, folder) as stack:
        for mode in ("balancer", "balancer+direct"):
            before = stack.handles()
            direct = []
            if mode == "balancer+direct":  # as many clients again, on the replicas themselves
                direct = [subprocess.Popen(
                    ["wrk", "-t1", f"-c{max(1, clients // 3)}", f"-d{seconds:.0f}s",
                     "--timeout", "5s", url + "/home"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for url in stack.replica_urls()]
            load = keep_alive_clients(stack.url, clients, seconds).wait()
            for p in direct:
                p.wait(timeout=seconds + 60)
            time.sleep(2.0)  # a replica declared down late is replaced by now
            out[mode] = {"replaced": stack.replaced_since(before), **summary(load)}
    return out


# -- 2. a hung replica --------------------------------------------------------------------------
def hang(tree: str, label: str, folder: str, settings: dict[str, str]) -> dict[str, Any]:
    with TreeStack(f"hang-{label}", {**EVEN, **settings}, tree, folder) as stack:
        before = stack.handles()
        pid = int(stack.entries()[0]["handle"].split("/")[0])
        load = keep_alive_clients(stack.url, HANG_CLIENTS,
                                  HANG_STOP_AT + HANG_STOPPED + HANG_AFTER)
        time.sleep(HANG_STOP_AT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGSTOP)  # the replica's gunicorn master and worker
        time.sleep(HANG_STOPPED)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
        load.wait()
        return {"replaced": stack.replaced_since(before), **summary(load)}


# -- 3. overload --------------------------------------------------------------------------------
@contextlib.contextmanager
def haproxy_limited(replicas: list[str], folder: str, maxconn: int,
                    queue_timeout: float) -> Iterator[str]:
    port = free_port()
    servers = "\n".join(f"    server s{i} {a.split('//')[1]} maxconn {maxconn}"
                        for i, a in enumerate(replicas, 1))
    cfg = os.path.join(folder, "haproxy-limited.cfg")
    text = HAPROXY_CFG.format(port=port, servers=servers).replace(
        "    timeout server 30s\n",
        f"    timeout server 30s\n    timeout queue {queue_timeout:g}s\n")
    with open(cfg, "w", encoding="utf-8") as fh:
        fh.write(text)
    with _process(["haproxy", "-f", cfg, "-db"], port, "haproxy",
                  os.path.join(folder, "haproxy-limited.log")):
        yield f"http://127.0.0.1:{port}"


def shots_summary(shots: Shots, capacity: float) -> dict[str, Any]:
    return {"goodput_rps": round(shots.goodput, 1),
            "goodput_share": round(shots.goodput / capacity, 3),
            "served_p99_ms": round(shots.p(0.99) * 1000), "statuses": shots.statuses,
            "refused_p99_ms": round(shots.p(0.99, shots.shed) * 1000),
            "retry_after": sorted(shots.retry_after), "bad_503": len(shots.bad_503),
            "unanswered": shots.timeouts, "errors": len(shots.errors)}


def overload(folder: str, service: float, seconds: float, factors: list[float],
             workers: list[str]) -> dict[str, Any]:
    """Fresh echo replicas for every target and load: an overloaded replica goes on serving
    its backlog long after the clients left, which the next target must not inherit."""
    out: dict[str, Any] = {}
    limits: dict[str, Any] = {"replica_maxconn": OVERLOAD_MAXCONN,
                              "queue_timeout": OVERLOAD_QUEUE_TIMEOUT}
    targets: dict[str, dict[str, Any] | None] = {}
    for worker in workers:
        # The name says which worker once there are two: one table, the same rows as before.
        label = f"{worker}, " if len(workers) > 1 else ""
        # A queued request holds one of the threads worker's threads: its queues must leave
        # threads to take new connections (3 replicas x 8 queued < 64 threads).
        queue = {"queue_size": OVERLOAD_THREADS_QUEUE} if worker == "threads" else {}
        targets[f"{label}limits on"] = {"worker": worker, **limits, **queue}
        targets[f"{label}limits off"] = {"worker": worker, "replica_maxconn": 0}
    targets["haproxy"] = None
    for factor in factors:
        for name, config in targets.items():
            with echo_replicas(3, threads=OVERLOAD_THREADS, delay=service) as replicas, \
                    tempfile.TemporaryDirectory(dir=folder) as here, (
                    haproxy_limited(replicas, here, OVERLOAD_THREADS, OVERLOAD_QUEUE_TIMEOUT)
                    if config is None else _balancer(Path(here), replicas, config)) as url:
                capacity = closed_loop(replicas[0], clients=2 * OVERLOAD_THREADS,
                                       seconds=3.0).goodput * len(replicas)
                shots = open_loop(url, factor * capacity, seconds)
                out[f"{name} x{factor:g}"] = {"capacity_rps": round(capacity, 1),
                                              **shots_summary(shots, capacity)}
                print(name, factor, out[f"{name} x{factor:g}"], flush=True)
    return out


@contextlib.contextmanager
def _balancer(folder: Path, replicas: list[str], config: dict[str, Any]) -> Iterator[str]:
    """This checkout's balancer (2 workers of ``config["worker"]``) over ``replicas``, no
    supervisor. 64 threads: under the threads worker a queued request holds one."""
    with threads_balancer(folder, replicas, workers=2, threads=64, strategy="maglev",
                          hash_key="query:id", log_level="warning", **config) as (url, _):
        yield url


# -- report -------------------------------------------------------------------------------------
def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [f"# Under pressure ({meta['when']}, base {meta['base']})", "",
             f"`bench/pressure.py {' '.join(meta['argv'])}`", ""]
    if data["saturation"]:
        lines += ["## Saturation", "",
                  (f"{meta['sat_clients']} keep-alive clients as fast as they can, "
                   f"{meta['sat_seconds']:g} s, default settings, 3 local replicas; "
                   "*+direct*: as many more clients (wrk) on the replicas themselves."), "",
                  "| commit | load | replicas replaced | requests | failed | p99 ms |",
                  "|---|---|---|---|---|---|"]
        for label, modes in data["saturation"].items():
            for mode, r in modes.items():
                lines.append(f"| {label} | {mode} | {r['replaced']} | {r['requests']} | "
                             f"{r['failed']} | {r['p99_ms']} |")
    if data["hang"]:
        lines += ["", (f"## Hang: one of 3 replicas SIGSTOPped {HANG_STOPPED:g} s under "
                       f"{HANG_CLIENTS} keep-alive clients (maglev)"), "",
                  "| run | requests | over 1 s | slowest ms | failed | replaced |",
                  "|---|---|---|---|---|---|"]
        for label, r in data["hang"].items():
            lines.append(f"| {label} | {r['requests']} | {r['over_1s']} | {r['slowest_ms']} | "
                         f"{r['failed']} | {r['replaced']} |")
    if data["overload"]:
        lines += ["", (f"## Overload: 3 replicas x {OVERLOAD_THREADS} threads, "
                       f"{meta['service']} s a request; open loop, a connection per request"),
                  "",
                  ("| target x offered | capacity req/s | goodput req/s | of capacity | "
                   "served p99 ms | statuses | 503 p99 ms | unanswered |"),
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in data["overload"].items():
            lines.append(f"| {name} | {r['capacity_rps']} | {r['goodput_rps']} | "
                         f"{r['goodput_share']} | {r['served_p99_ms']} | {r['statuses']} | "
                         f"{r['refused_p99_ms']} | {r['unanswered']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--base", help="the commit measured as 'before'")
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--sat-clients", type=int, default=64)
    parser.add_argument("--sat-seconds", type=float, default=60.0)
    parser.add_argument("--service", type=float, default=0.2)
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--only", default="saturation,hang,overload")
    parser.add_argument("--workers", default="async",
                        help="the data paths the overload runs: async, threads or both")
    parser.add_argument("--keep", help="a folder to keep logs and configs in (default: none)")
    parser.add_argument("--out", default=os.path.join(HERE, "results-pressure.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sat_seconds, args.overload_seconds = 15.0, 8.0
    only = set(args.only.split(","))
    data: dict[str, Any] = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M"),
                                     "base": args.base, "service": args.service,
                                     "sat_clients": args.sat_clients,
                                     "sat_seconds": args.sat_seconds,
                                     "argv": argv if argv is not None else sys.argv[1:]},
                            "saturation": {}, "hang": {}, "overload": {}}
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="lb-pressure-")) as folder, \
            tree_of(args.base, folder) as base:
        trees = {"after": ROOT, **({"before": base} if args.base else {})}
        if "saturation" in only:
            for label, tree in trees.items():
                data["saturation"][label] = saturation(tree, label, folder, args.sat_clients,
                                                       args.sat_seconds)
                print(label, json.dumps(data["saturation"][label]), flush=True)
        if "hang" in only:
            runs = {"after": (ROOT, {}), "after, hedging off": (ROOT, {"hedge_share": "0"})}
            if args.base:
                runs["before"] = (base, {})
            for label, (tree, settings) in runs.items():
                data["hang"][label] = hang(tree, label.replace(", ", "-").replace(" ", "-"),
                                           folder, settings)
                print(label, json.dumps(data["hang"][label]), flush=True)
        if "overload" in only:
            data["overload"] = overload(folder, args.service, args.overload_seconds,
                                        [2.0, 4.0], args.workers.split(","))
    text = render(data)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)


if __name__ == "__main__":
    main()
