"""Overload, limits on and off: goodput and p99 at 2x and 4x the replicas' capacity.

3 echo replicas of 4 threads at ``--delay`` seconds a request (a capacity of 3 x 4 / delay
requests a second, whatever the machine), a real gunicorn balancer (2 workers) in front; a
closed loop measures the capacity, then an open loop offers 2x and 4x of it for
``--seconds``, each request on its own connection. Limits on: ``LB_REPLICA_MAXCONN``,
``LB_QUEUE_SIZE``, ``LB_QUEUE_TIMEOUT`` as given; off: ``LB_REPLICA_MAXCONN=0``.

    PYTHONPATH=. .venv/bin/python bench/overload.py [--workers async,threads] [--seconds 15]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.helpers_overload import closed_loop, echo_replicas, open_loop
from tests.helpers_scripted import threads_balancer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="async,threads")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--maxconn", type=int, default=4)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--queue-timeout", type=float, default=1.0)
    parser.add_argument("--factors", default="2,4")
    parser.add_argument("--lb-workers", type=int, default=2)
    parser.add_argument("--off", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure with limits off")
    args = parser.parse_args()
    for worker in args.workers.split(","):
        for maxconn in (args.maxconn, 0) if args.off else (args.maxconn,):
            # Fresh replicas each time: an overloaded replica goes on serving the requests its
            # backlog holds long after their clients left (the case limits are for).
            with echo_replicas(3, threads=4, delay=args.delay) as replicas, \
                    tempfile.TemporaryDirectory() as folder, threads_balancer(
                    Path(folder), replicas, worker=worker, workers=args.lb_workers, threads=64,
                    strategy="maglev", hash_key="query:id", replica_maxconn=maxconn,
                    queue_size=args.queue_size, queue_timeout=args.queue_timeout,
                    log_level="warning") as (url, _):
                capacity = closed_loop(url, clients=24, seconds=4.0)
                label = f"{worker:7} limits {'on ' if maxconn else 'off'}"
                print(f"{label} capacity: {capacity.line()}", flush=True)
                for factor in (float(f) for f in args.factors.split(",")):
                    shots = open_loop(url, factor * capacity.goodput, args.seconds)
                    share = shots.goodput / max(capacity.goodput, 1e-9)
                    print(f"{label} {factor:g}x: goodput {share:.0%} of capacity; "
                          f"{shots.line()}", flush=True)


if __name__ == "__main__":
    main()
