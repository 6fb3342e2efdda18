"""``lb-analyze``: measure a balancer and write charts (PNG) and raw numbers (JSON, CSV, MD).

Against any balancer URL, or against local stacks it starts itself (``--spawn``, via lb-run).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from analysis import balance, experiments, weighted
from analysis.client import AnalysisError, trust
from analysis.explain import explain
from analysis.stacks import LocalStack

EPILOG = """\
experiments:
  a1       10,000 async GET /home on N=3: requests per replica (bar chart)
  a2       N = 2..6 through /add and /rm, 10,000 requests each: load spread per N
  a3       every endpoint, then the busiest replica SIGKILLed under load: timeline, recovery
  a4       a1 and a2 for each hash preset (seed, cs60002, xxhash; --variants adds ring160,
           maglev), side by side; --spawn starts one local stack per variant
  all      explain + balance + a1 + a2 + a3 + a4
  balance  offline: max/mean and key movement of every strategy for N = 2..10 (no balancer);
           with --hash SPEC: one hash on the ring (a preset, 'H=...; Phi=...' or module:name),
           the slots H reaches, where the virtual servers land, the shares (--chart: a PNG);
           with --weights 1,2,3: each strategy's share per replica against w / W
  explain  offline: why the spec's hash functions send ~97% / ~84% to one replica

examples:
  lb-analyze a1 --url http://127.0.0.1:5123
  lb-analyze a3 --url http://127.0.0.1:5123 --registry /tmp/mine/registry.json
  lb-analyze a3 --url http://127.0.0.1:5000 --kill-cmd 'docker kill {hostname}'
  lb-analyze a4 --spawn
  lb-analyze balance --hash 'H=3*i**2+7*i+11; Phi=i**2+j**2+2*j+25' --chart
  lb-analyze balance --weights 1,2,3
  lb-analyze a4 --target seed=http://127.0.0.1:5001 --target cs60002=http://127.0.0.1:5002 \\
                --target xxhash=http://127.0.0.1:5003
  lb-analyze all --spawn --variants seed,cs60002,xxhash,ring160,maglev
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lb-analyze", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["a1", "a2", "a3", "a4", "all", "balance",
                                               "explain"])
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the balancer")
    parser.add_argument("--out", default="analysis/results", help="results folder")
    parser.add_argument("--requests", type=int, default=10_000,
                        help="requests per run (A-1, each N of A-2); ids for balance")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--admin-token", default="", help="bearer token for /add and /rm")
    parser.add_argument("--cacert", metavar="FILE",
                        help="CA certificate(s), PEM, for an https --url (default: the system's)")
    parser.add_argument("--registry", help="registry file of a local-backend balancer (A-3 kill)")
    parser.add_argument("--kill-cmd",
                        help="command that kills a replica, e.g. 'docker kill {hostname}' "
                             "({hostname}, {server_id} are filled in); default: SIGKILL the "
                             "process group found through --registry")
    parser.add_argument("--spawn", action="store_true",
                        help="start local stacks (lb-run) instead of using --url")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="LB_* setting for spawned stacks, e.g. --set workers=2 (repeatable)")
    parser.add_argument("--variants", default=",".join(experiments.PRESETS),
                        help="A-4 variants: " + ", ".join(experiments.VARIANTS))
    parser.add_argument("--target", action="append", default=[], metavar="VARIANT=URL",
                        help="A-4 without --spawn: a balancer already started for the variant")
    parser.add_argument("--duration", type=float, default=30.0, help="A-3 load seconds (30)")
    parser.add_argument("--kill-at", type=float, default=8.0, help="A-3 kill time (s, 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    balance_group = parser.add_argument_group("balance")
    balance_group.add_argument("--seed", type=int, default=1)
    balance_group.add_argument("--repeats", type=int, default=20)
    balance_group.add_argument("--n-min", type=int, help="fewest replicas (2)")
    balance_group.add_argument("--n-max", type=int, help="most replicas (10)")
    balance_group.add_argument("--only", action="append", metavar="STRATEGY")
    balance.add_weights_argument(balance_group)
    balance.add_hash_arguments(balance_group)
    args = parser.parse_args(argv)
    if args.hash and args.experiment != "balance":
        parser.error("--hash goes with the balance experiment: lb-analyze balance --hash SPEC")
    if args.weights is not None and args.experiment != "balance":
        parser.error("--weights goes with the balance experiment: lb-analyze balance "
                     "--weights 1,2,3")
    try:
        weighted.settle(args)
    except AnalysisError as exc:
        parser.exit(2, f"lb-analyze: {exc}\n")  # a usage error, on one line
    return args


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AnalysisError(f"{what} must look like NAME=VALUE, not {item!r}")
        out[key.strip()] = value.strip()
    return out


@contextlib.contextmanager
def _target(args: argparse.Namespace, ctx: experiments.Context) -> Iterator[experiments.Context]:
    """The context to run a1..a3 in: the given URL, or a local stack started for the run."""
    if not args.spawn:
        yield ctx
        return
    settings = _pairs(args.set, "--set")
    print(f"starting a local stack ({settings or 'default settings'}) ...", file=sys.stderr)
    with LocalStack("main", settings) as stack:
        yield ctx.at(stack.url, ctx.out, stack.registry)


def run(args: argparse.Namespace) -> None:
    trust(args.cacert)
    if args.experiment == "balance" and args.weights:
        weighted.run(args.weights, args.out, args.requests, args.seed, args.only)
        return
    if args.experiment == "balance" and args.hash:
        balance.run_hash(args.hash, args.out, args.chart, args.slots, args.virtual,
                         args.probing, args.requests, args.seed, args.n_min, args.n_max,
                         args.repeats)
        return
    if args.experiment in ("balance", "all"):
        balance.run(args.out, args.requests, args.seed, args.n_min, args.n_max, args.only,
                    args.repeats)
    if args.experiment in ("explain", "all"):
        explain(args.out)
    ctx = experiments.Context(args.url, args.out, args.requests, args.concurrency, args.timeout,
                              not args.no_progress, args.admin_token, args.registry,
                              args.kill_cmd)
    if args.experiment in ("a1", "a2", "a3", "all"):
        with _target(args, ctx) as here:
            if args.experiment in ("a1", "all"):
                experiments.a1(here)
            if args.experiment in ("a2", "all"):
                experiments.a2(here)
            if args.experiment in ("a3", "all"):
                experiments.a3(here, args.duration, args.kill_at)
    if args.experiment in ("a4", "all"):
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        experiments.a4(ctx, variants, args.spawn, _pairs(args.target, "--target"),
                       settings=_pairs(args.set, "--set"))
    print(f"\nresults in {args.out}/", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except AnalysisError as exc:
        sys.exit(f"lb-analyze: {exc}")
    except KeyboardInterrupt:
        sys.exit("lb-analyze: interrupted")


if __name__ == "__main__":
    main()
