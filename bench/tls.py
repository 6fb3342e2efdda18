"""The data path's cost over HTTPS: the async balancer terminating TLS against HAProxy
terminating TLS (``bind ... ssl crt``), both in front of the same local replicas, in one run;
the balancer's plain HTTP port on the same stack as a reference.

    python bench/tls.py [--duration 10] [--rounds 2] [--connections 24]

A self-signed certificate (P-256) is made for the run. wrk keeps its connections alive, so
this measures TLS's per-request cost (record encryption), not handshakes. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from analysis.stacks import LocalStack, free_port
from bench.bench import (
    HAPROXY_CFG,
    WRK_LUA,
    _process,
    balancer_processes,
    measured,
    replica_processes,
    wrk,
)


def certificate(folder: str) -> str:
    """A self-signed certificate and its key in one PEM file (what HAProxy's crt takes)."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    both = os.path.join(folder, "both.pem")
    with open(both, "wb") as out:
        for part in (cert, key):
            with open(part, "rb") as fh:
                out.write(fh.read())
    return both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (2)")
    parser.add_argument("--connections", type=int, default=24, help="wrk connections (24)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="lb-bench-tls-")
    lua = os.path.join(work, "ids.lua")
    with open(lua, "w", encoding="utf-8") as fh:
        fh.write(WRK_LUA)
    pem = certificate(work)
    tls_port = free_port()
    settings = {"hash_key": "query:id", "strategy": "maglev", "log_level": "warning",
                "workers": "2", "threads": "8", "worker": "async", "heartbeat_timeout": "2.0",
                "heartbeat_failures": "4", "tls_cert": pem, "tls_port": str(tls_port)}
    with LocalStack("bench-tls", settings, os.path.join(work, "stack")) as stack:
        addresses, replicas = replica_processes(stack.registry)
        hport = free_port()
        servers = "\n".join(f"    server s{i} {a.split('//')[1]}"
                            for i, a in enumerate(addresses, 1))
        cfg = os.path.join(work, "haproxy.cfg")
        text = HAPROXY_CFG.format(port=hport, servers=servers)
        text = text.replace(f"bind 127.0.0.1:{hport}", f"bind 127.0.0.1:{hport} ssl crt {pem}")
        with open(cfg, "w", encoding="utf-8") as fh:
            fh.write(text.replace("X-Forwarded-Proto http", "X-Forwarded-Proto https"))
        with _process(["haproxy", "-f", cfg, "-db"], hport, "haproxy",
                      os.path.join(work, "haproxy.log")) as hproc:
            lb = balancer_processes(stack)
            targets: dict[str, dict[str, Any]] = {
                "async https": {"urls": [f"https://127.0.0.1:{tls_port}"], "procs": lb},
                "haproxy https": {"urls": [f"https://127.0.0.1:{hport}"], "procs": [hproc]},
                "async http": {"urls": [stack.url], "procs": lb},
            }
            for t in targets.values():
                wrk(t["urls"], args.connections, 2, lua)  # warm up
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for r in range(args.rounds):
                for name, t in targets.items():
                    print(f"round {r + 1}: {name} ...", file=sys.stderr)
                    runs[name].append(measured(t, args.connections, args.duration, lua,
                                               replicas))
    summary = {name: {k: round(statistics.median(x[k] for x in rs), 1)
                      for k in ("rps", "p50_ms", "p99_ms", "proxy_cpu_us", "replica_cpu_us",
                                "errors", "non2xx")}
               for name, rs in runs.items()}
    ours, theirs = summary["async https"], summary["haproxy https"]
    summary["ratio"] = {
        "rps_async_over_haproxy": round(ours["rps"] / theirs["rps"], 2),
        "cpu_per_request_async_over_haproxy": round(ours["proxy_cpu_us"]
                                                     / max(0.1, theirs["proxy_cpu_us"]), 2),
        "tls_cost_async_cpu_us": round(ours["proxy_cpu_us"]
                                       - summary["async http"]["proxy_cpu_us"], 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
