"""Where the balancer's CPU goes: cProfile with a CPU clock, in-process.

py-spy on the gunicorn workers samples wall time, and a worker thread that waits in
``send``/``recv`` for a replica looks busy to it; so this profile runs the balancer's app
in-process instead (``create_app`` on a running stack's registry, its replicas real), sends
requests through Flask's test client, and charges *CPU time* (``time.process_time``) to each
function. The app's CPU (everything under ``Flask.wsgi_app``, which is what gunicorn calls) is
split by the inclusive time of the balancer's steps; the test client, standing in for
gunicorn's HTTP parsing, stays outside it.

``python bench/cpu_profile.py --registry <path> [--requests 3000]``
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
import time
from collections import Counter


def profile_app(registry: str, requests: int = 3000, top: int = 20,
                env: dict[str, str] | None = None) -> str:
    """Profile ``requests`` GETs; ``env``: the stack's ``LB_*`` settings (strategy, hash key)."""
    os.environ.update({k: v for k, v in (env or {}).items() if k.startswith("LB_")})
    os.environ.update(LB_REGISTRY=registry, LB_LOG_LEVEL="warning")
    from lb.app import create_app
    from lb.balancer import Balancer

    app = create_app()
    client = app.test_client()
    settings = Balancer.of(app).settings
    rng = random.Random(3)
    ids = [rng.randint(100000, 999999) for _ in range(requests + 300)]
    query = settings.hash_key.startswith("query:")

    def url(i: int) -> str:
        return f"/home?{settings.hash_key[6:]}={i}" if query else "/home"

    for i in ids[:300]:  # warm: pools, caches, the lookup table
        client.get(url(i))
    cpu0 = time.process_time()
    for i in ids[300: 300 + requests // 2]:
        client.get(url(i))
    plain_us = 1e6 * (time.process_time() - cpu0) / (requests // 2)
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for i in ids[300:300 + requests]:
        client.get(url(i))
    prof.disable()
    stats = pstats.Stats(prof)
    entries = stats.stats  # type: ignore[attr-defined]

    def inclusive(path_end: str, *names: str) -> float:
        return sum(v[3] for (f, _l, n), v in entries.items()
                   if f.endswith(path_end) and n in names)

    app_total = inclusive("flask/app.py", "wsgi_app")  # what gunicorn calls: all but HTTP I/O
    parts = [
        ("forwarding to the replica: http.client (Forwarder.forward)",
         inclusive("lb/threads/forward.py", "forward")),
        ("choosing the replica: registry check + lookup + walk (Router.candidates)",
         inclusive("lb/routing.py", "candidates")),
        ("request id (request_key)", inclusive("lb/routing.py", "request_key")),
        ("headers and target to forward (app._forward_headers, app._target)",
         inclusive("lb/app.py", "_forward_headers", "_target")),
        ("ops hooks: request ids, access log, metrics (lb/ops)",
         sum(v[3] for (f, _l, n), v in entries.items()
             if "lb/ops/" in f and n in ("_begin", "_finish"))),
    ]
    rest = app_total - sum(t for _, t in parts)
    parts.append(("Flask/werkzeug: request and response objects, dispatch, contexts", rest))
    n = requests
    lines = [
        (f"{requests} requests through the app in-process (its replicas real); CPU per request "
        f"without the profiler: {plain_us:.0f} µs, of which Flask's test client (standing in "
        f"for gunicorn's HTTP parsing) is a part. Inside the app (Flask.wsgi_app, "
        f"{1e6 * app_total / n:.0f} µs per request with the profiler on):"),
    ]
    lines += [f"  {100 * t / app_total:5.1f}%  {1e6 * t / n:6.0f} µs  {name}"
              for name, t in sorted(parts, key=lambda p: -p[1])]
    funcs: Counter[str] = Counter()
    for (filename, line, name), v in entries.items():
        funcs[f"{os.path.basename(filename)}:{line}:{name}"] += v[2]
    total = sum(funcs.values())
    lines += ["", (f"top {top} functions by own CPU time (share of all profiled CPU, test "
              "client included):")]
    lines += [f"  {100 * t / total:5.1f}%  {f}" for f, t in funcs.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True, help="registry.json of a running stack")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(profile_app(args.registry, args.requests))


if __name__ == "__main__":
    main()
