"""``lbctl``: the balancer's command-line client.

    lbctl rep                      the replicas (N and hostnames)
    lbctl add 2 --name S5          start 2 replicas, one named S5 (--weight W: their weight)
    lbctl rm 1                     remove 1 replica (random), or --name to choose
    lbctl weight S1=2 S3=0         change replicas' weights at once (0 drains); alone: list them
    lbctl status                   replicas with state, ring share, rates, heartbeats
    lbctl watch                    status, redrawn every --interval seconds until Ctrl-C

Readable tables by default; ``--json`` prints the balancer's reply as it is, for scripts.
Exit codes: 0 ok, 1 the balancer answered with a failure, 2 usage, 3 cannot connect,
4 a reply that is not the balancer's (not JSON, or not its envelope).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import requests

OK, FAILURE, USAGE, UNREACHABLE, BAD_REPLY = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:5000"
STATUS_PATH = "/_lb/status.json"
WEIGHT_ARG = re.compile(r"(?P<name>[^=]+)=(?P<weight>-?[0-9]+)\Z")


class CtlError(Exception):
    """Ends the command with ``code`` after printing ``message`` to stderr."""

    def __init__(self, code: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.body = body


class Client:
    """The balancer's HTTP API, replies checked for the contract's envelope."""

    def __init__(self, url: str, token: str | None, timeout: float,
                 cacert: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # the balancer is where --url says, never via a proxy
        if cacert:  # an https URL whose certificate this file vouches for (else the system's)
            self.session.verify = cacert
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The reply's JSON envelope; ``CtlError`` for a failure, no answer or a foreign reply."""
        try:
            reply = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.ConnectionError as exc:
            raise CtlError(UNREACHABLE, f"cannot connect to {self.url}: {_reason(exc)}") from exc
        except requests.Timeout as exc:
            raise CtlError(UNREACHABLE, f"no reply from {self.url} in {self.timeout:g}s") from exc
        except requests.RequestException as exc:
            raise CtlError(UNREACHABLE, f"request to {self.url} failed: {exc}") from exc
        try:
            data = reply.json()
        except ValueError as exc:
            raise CtlError(BAD_REPLY, f"{method} {path}: HTTP {reply.status_code}, not JSON: "
                                      f"{reply.text[:200]!r}") from exc
        if not isinstance(data, dict) or data.get("status") not in ("successful", "failure"):
            raise CtlError(BAD_REPLY, f"{method} {path}: HTTP {reply.status_code}, not the "
                                      f"balancer's reply: {str(data)[:200]}")
        if data["status"] == "failure" or reply.status_code >= 400:
            raise CtlError(FAILURE, f"{method} {path}: HTTP {reply.status_code}: "
                                    f"{data.get('message')}", body=data)
        return data


def _reason(exc: Exception) -> str:
    """The innermost cause of a connection error, e.g. 'Connection refused'."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc)
    return text.split("] ", 1)[-1] if "] " in text else text


# -- tables -------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if right[i] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def show_rep(message: dict[str, Any]) -> str:
    names = message["replicas"]
    return f"N={message['N']}" + ("".join(f"\n  {name}" for name in names) if names else "")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s"


def show_weights(message: dict[str, Any]) -> str:
    """``/weight``'s reply: N, then each replica's weight and share of the key space."""
    rows = [(name, message["weights"].get(name), f"{message['shares'].get(name, 0.0) * 100:.1f}%")
            for name in message["replicas"]]
    return f"N={message['N']}\n" + table(["REPLICA", "WEIGHT", "SHARE"], rows,
                                          [False, True, True])


def _weight(r: dict[str, Any]) -> str:
    """A status row's weight, and how far its slow start has gone while it ramps up (a
    balancer older than weights has neither: 1)."""
    ramp = r.get("ramp")
    return f"{r.get('weight', 1)}" + ("" if ramp is None else f" ramp {ramp * 100:.0f}%")


def show_status(s: dict[str, Any]) -> str:
    h = s["hash_map"]
    by = s["replicas_by_state"]
    head = (f"{s['deployment']}: N={s['replicas_desired']}  ready={by['ready']}  "
            f"down={by['down']}  starting={by['starting']}  requests={s['totals']['requests']}  "
            f"errors={s['totals']['errors']}\n"
            f"hash map: {h['preset']}, M={h['slots']}, K={h['virtual']}, {h['probing']}, "
            f"strategy {h['strategy']}, key {h['hash_key']}")
    rows: list[tuple[Any, ...]] = [
        (r["hostname"], r["server_id"], r["state"], _weight(r), r["slots_owned"],
         f"{r['share'] * 100:.1f}%", _rate(r["request_rate"]), _rate(r["error_rate"]),
         r["requests"], r["errors"], _age(r["heartbeat_age"]), r["failures"])
        for r in s["replicas"]]
    heads = ["REPLICA", "ID", "STATE", "WEIGHT", "SLOTS", "SHARE", "REQ/S", "ERR/S", "REQUESTS",
             "ERRORS", "HEARTBEAT", "MISSED"]
    right = [False, True, False, True, True, True, True, True, True, True, True, True]
    # Failure domains (Swarm nodes), when known; a balancer older than them has no such key.
    if any(r.get("domain") for r in s["replicas"]):
        rows = [(*row, r.get("domain") or "-") for row, r in zip(rows, s["replicas"], strict=True)]
        heads, right = [*heads, "DOMAIN"], [*right, False]
    body = table(heads, rows, right)
    return f"{head}\n\n{body}"


# -- commands -----------------------------------------------------------------------------------
def _print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data) + "\n")


def _emit(data: dict[str, Any], args: argparse.Namespace, render: Callable[[Any], str],
          out: TextIO) -> int:
    """The reply as it is (``--json``) or ``render`` of its message."""
    if args.json:
        _print_json(data, out)
    else:
        out.write(render(data["message"]) + "\n")
    return OK


def cmd_rep(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _emit(client.call("GET", "/rep"), args, show_rep, out)


def _scale(method: str, path: str) -> Callable[[Client, argparse.Namespace, TextIO], int]:
    def run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
        body: dict[str, Any] = {"n": args.n, "hostnames": args.names or []}
        if getattr(args, "weight", None) is not None:  # sent only when given: the contract's body
            body["weight"] = args.weight
        return _emit(client.call(method, path, body), args, show_rep, out)
    return run


def parse_weights(items: Sequence[str]) -> dict[str, int]:
    """``NAME=W`` arguments -> {name: w}; a ``CtlError`` (usage) for one that is not that.
    Only the form is checked here: the balancer says which weights it takes."""
    weights: dict[str, int] = {}
    for item in items:
        match = WEIGHT_ARG.match(item)
        if match is None:
            raise CtlError(USAGE, f"weight: {item!r} is not NAME=W with W an integer "
                                  "(e.g. Server1=2)")
        name = match["name"]
        if name in weights:
            raise CtlError(USAGE, f"weight: {name!r} is named twice")
        weights[name] = int(match["weight"])
    return weights


def cmd_weight(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """POST /weight with the weights given; with none, the same call lists them. A bad
    argument is a usage error before any call."""
    body = {"weights": parse_weights(args.pairs)}
    return _emit(client.call("POST", "/weight", body), args, show_weights, out)


def cmd_status(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _emit(client.call("GET", STATUS_PATH), args, show_status, out)


def cmd_watch(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Redraw the status every ``--interval`` seconds, ``--count`` times or until Ctrl-C.

    On a terminal the screen is cleared between frames; otherwise frames follow each other
    (with ``--json``, one JSON object per line). A balancer that stops answering is shown,
    not fatal: the view keeps trying.
    """
    clear = out.isatty() and not args.json
    frame = 0
    try:
        while args.count is None or frame < args.count:
            if frame:
                time.sleep(args.interval)
            frame += 1
            try:
                data = client.call("GET", STATUS_PATH)
                text = json.dumps(data) if args.json else show_status(data["message"])
            except CtlError as exc:
                if args.json:
                    raise
                text = f"lbctl: {exc.message} (retrying every {args.interval:g}s)"
            stamp = time.strftime("%H:%M:%S")
            if clear:
                out.write("\x1b[H\x1b[2J")
            if args.json:
                out.write(text + "\n")
            else:
                out.write(f"{client.url}  {stamp}  (Ctrl-C to stop)\n{text}\n\n")
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
    return OK


# -- the command line ---------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the subcommand it wins, absent it leaves the main parser's value.
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the balancer (default: $LB_URL or " + DEFAULT_URL + ")")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="admin token for add/rm/weight (default: $LB_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the balancer's JSON reply instead of a table")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds to wait for a reply (default 60: add waits for replicas)")
    common.add_argument("--cacert", metavar="FILE", default=argparse.SUPPRESS,
                        help="CA certificate(s), PEM, to check an https balancer's against")

    main = argparse.ArgumentParser(
        prog="lbctl", description="Drive and inspect the hashlb load balancer.",
        epilog="exit codes: 0 ok, 1 the balancer answered with a failure, 2 usage, "
               "3 cannot connect, 4 a reply that is not the balancer's",
    )
    main.add_argument("--url", default=os.environ.get("LB_URL") or DEFAULT_URL,
                      help="the balancer (default: $LB_URL or " + DEFAULT_URL + ")")
    main.add_argument("--token", default=os.environ.get("LB_ADMIN_TOKEN") or None,
                      help="admin token for add/rm/weight (default: $LB_ADMIN_TOKEN)")
    main.add_argument("--json", action="store_true", help="print the balancer's JSON reply")
    main.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for a reply (default 60)")
    main.add_argument("--cacert", metavar="FILE", default=os.environ.get("LB_CACERT") or None,
                      help="CA certificate(s), PEM, to check an https balancer's against "
                           "(default: $LB_CACERT, else the system's)")
    sub = main.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("rep", parents=[common], help="list the replicas (GET /rep)",
                       description="N and the replicas' hostnames (GET /rep).")
    p.set_defaults(run=cmd_rep)
    for name, method, path, verb in (("add", "POST", "/add", "start"),
                                     ("rm", "DELETE", "/rm", "remove")):
        p = sub.add_parser(name, parents=[common], help=f"{verb} N replicas ({method} {path})",
                           description=f"{verb.capitalize()} N replicas ({method} {path}); "
                                       f"--name picks some of them, the rest are random.")
        p.add_argument("n", type=_positive, metavar="N", help="how many")
        p.add_argument("--name", dest="names", action="extend", nargs="+", metavar="HOSTNAME",
                       help="hostname(s) to " + verb + " (repeat or list; at most N)")
        if name == "add":
            p.add_argument("--weight", type=_positive, metavar="W",
                           help="the weight of each new replica (default 1; at most 256)")
        p.set_defaults(run=_scale(method, path))
    p = sub.add_parser("weight", parents=[common],
                       help="change replicas' weights (POST /weight); alone: list them",
                       description="Change the weights of the replicas named, all at once or "
                                   "none (POST /weight): W from 0 (drain: routed nothing "
                                   "new) to 256. With no NAME=W, list every replica's weight "
                                   "and share.")
    p.add_argument("pairs", nargs="*", metavar="NAME=W", help="a replica and its new weight")
    p.set_defaults(run=cmd_weight)
    p = sub.add_parser("status", parents=[common], help="replicas, ring shares, rates",
                       description=f"Replicas with state, server id, ring share, recent rates "
                                   f"and heartbeats (GET {STATUS_PATH}).")
    p.set_defaults(run=cmd_status)
    p = sub.add_parser("watch", parents=[common], help="status, refreshed until Ctrl-C",
                       description="The status, redrawn every --interval seconds until Ctrl-C "
                                   "(or --count frames).")
    p.add_argument("--interval", type=_positive_float, default=2.0,
                   help="seconds between frames (default 2)")
    p.add_argument("--count", type=_positive, default=None,
                   help="stop after this many frames (default: until Ctrl-C)")
    p.set_defaults(run=cmd_watch)
    return main


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text}")
    return value


def run(argv: Sequence[str] | None = None, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """The exit code of ``lbctl argv`` (argparse's own usage errors exit 2 by SystemExit)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parser().parse_args(argv)
    client = Client(args.url, args.token, args.timeout, args.cacert)
    try:
        code: int = args.run(client, args, out)
        return code
    except CtlError as exc:
        if args.json and exc.body is not None:
            _print_json(exc.body, out)  # a script still gets the balancer's reply
        err.write(f"lbctl: {exc.message}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130


def main() -> NoReturn:
    sys.exit(run())


if __name__ == "__main__":
    main()
