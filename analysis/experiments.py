"""The experiments A-1 to A-4 against a running balancer (or stacks the tool starts itself)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import requests

from analysis import charts
from analysis.client import Admin, AnalysisError, Result, load, run_load
from analysis.report import (
    markdown_table,
    percentile,
    summarize,
    text_table,
    write_csv,
    write_json,
    write_text,
)
from analysis.stacks import CommandKiller, Killer, LocalStack, RegistryKiller

# What A-4 compares: the spec's presets (as the issue asks), and this project's strategies.
VARIANTS: dict[str, dict[str, str]] = {
    "seed": {"hash": "seed"},
    "cs60002": {"hash": "cs60002"},
    "xxhash": {"hash": "xxhash"},
    "ring160": {"strategy": "ring160"},
    "maglev": {"strategy": "maglev"},
}
PRESETS = ["seed", "cs60002", "xxhash"]


@dataclass
class Context:
    url: str
    out: str
    requests: int = 10_000
    concurrency: int = 32
    timeout: float = 10.0
    progress: bool = True
    admin_token: str = ""
    registry: str | None = None
    kill_cmd: str | None = None
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def admin(self) -> Admin:
        return Admin(self.url, self.admin_token)

    def killer(self) -> Killer:
        if self.kill_cmd:
            return CommandKiller(self.kill_cmd)
        if self.registry:
            return RegistryKiller(self.registry)
        raise AnalysisError("A-3 needs --registry (local backend) or --kill-cmd (any backend)")

    def at(self, url: str, out: str, registry: str | None = None) -> Context:
        return Context(url, out, self.requests, self.concurrency, self.timeout, self.progress,
                       self.admin_token, registry, None, self.log)


# -- A-1 ---------------------------------------------------------------------------------------
def a1(ctx: Context, n: int = 3, label: str = "") -> dict[str, Any]:
    """``ctx.requests`` asynchronous GET /home on N replicas: requests per replica."""
    rep = ctx.admin.scale_to(n)
    results = run_load(ctx.url + "/home", ctx.requests, None, ctx.concurrency, ctx.timeout,
                       ctx.progress, f"A-1 N={n}")
    summary = {**summarize(results, rep["N"]), "replica_names": rep["replicas"]}
    write_json(ctx.out, "a1.json", summary)
    total = max(1, summary["ok"])
    rows = [(sid, ", ".join(summary["hostnames"].get(sid, [])), c, f"{100 * c / total:.1f}%")
            for sid, c in summary["per_server"].items()]
    write_csv(ctx.out, "a1.csv", ["server_id", "hostnames", "requests", "share"], rows)
    charts.a1_chart(summary, os.path.join(ctx.out, "a1.png"), label)
    headers = ["server id", "hostname", "requests", "share"]
    write_text(ctx.out, "a1.md", markdown_table(headers, rows))
    ctx.log(f"\nA-1{f' ({label})' if label else ''}: {summary['requests']:,} requests, N={n}, "
            f"{summary['errors']} errors, {summary['rps']} req/s, "
            f"p50 {summary['latency_ms_p50']} ms, p99 {summary['latency_ms_p99']} ms, "
            f"max/mean {summary['max_over_mean']}")
    ctx.log(text_table(headers, rows))
    return summary


# -- A-2 ---------------------------------------------------------------------------------------
def a2(ctx: Context, n_values: range = range(2, 7), label: str = "",
       restore: bool = True) -> list[dict[str, Any]]:
    """N from 2 to 6 through /add and /rm, ``ctx.requests`` requests each."""
    start_n = ctx.admin.rep()["N"]
    rows = []
    try:
        for n in n_values:
            rep = ctx.admin.scale_to(n)
            results = run_load(ctx.url + "/home", ctx.requests, None, ctx.concurrency,
                               ctx.timeout, ctx.progress, f"A-2 N={n}")
            rows.append({**summarize(results, rep["N"]), "replica_names": rep["replicas"]})
    finally:
        if restore:
            ctx.admin.scale_to(start_n)
    write_json(ctx.out, "a2.json", rows)
    write_csv(ctx.out, "a2.csv", ["N", "server_id", "requests"],
              [(r["replicas"], sid, c) for r in rows for sid, c in r["per_server"].items()])
    charts.a2_chart(rows, os.path.join(ctx.out, "a2.png"), label)
    headers = ["N", "mean", "min", "max", "std", "max/mean", "errors", "req/s"]
    table = [(r["replicas"], r["mean"], r["min"], r["max"], r["std"], r["max_over_mean"],
              r["errors"], r["rps"]) for r in rows]
    write_text(ctx.out, "a2.md", markdown_table(headers, table))
    ctx.log(f"\nA-2{f' ({label})' if label else ''}: {ctx.requests:,} requests per N")
    ctx.log(text_table(headers, table))
    return rows


# -- A-3 ---------------------------------------------------------------------------------------
NOT_FOUND = "<Error> '/other' endpoint does not exist in server replicas"
ADD_TOO_MANY = "<Error> Length of hostname list is more than newly added instances"
RM_TOO_MANY = "<Error> Length of hostname list is more than removable instances"


def _probe(session: requests.Session, url: str, method: str, path: str, body: Any,
           expect: int, check: Callable[[Any], bool]) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        reply = session.request(method, url + path, json=body, timeout=90)
    except requests.RequestException as exc:
        return {"call": f"{method} {path}", "status": 0, "ok": False, "detail": str(exc)}
    ms = 1000 * (time.perf_counter() - began)
    try:
        data: Any = reply.json()
    except ValueError:
        data = reply.text
    good = reply.status_code == expect and check(data)
    return {"call": f"{method} {path}" + (f" {body}" if body is not None else ""),
            "expected": expect, "status": reply.status_code, "ok": good, "ms": round(ms, 1),
            "reply": data if isinstance(data, dict) else str(data)[:80]}


def exercise_endpoints(ctx: Context) -> list[dict[str, Any]]:
    """Every endpoint of the contract once, each checked against the contract's reply."""
    session = requests.Session()
    session.trust_env = False
    if ctx.admin_token:
        session.headers["Authorization"] = f"Bearer {ctx.admin_token}"
    n0 = ctx.admin.rep()["N"]
    name = f"a3probe{int(time.time()) % 100000}"

    def msg(data: Any) -> Any:
        return data.get("message") if isinstance(data, dict) else None

    calls: list[tuple[str, str, Any, int, Callable[[Any], bool]]] = [
        ("GET", "/rep", None, 200, lambda d: msg(d)["N"] == n0),
        ("GET", "/home", None, 200, lambda d: str(msg(d)).startswith("Hello from Server: ")),
        ("GET", "/heartbeat", None, 200, lambda d: True),
        ("GET", "/other", None, 400, lambda d: msg(d) == NOT_FOUND),
        ("POST", "/add", {"n": 1, "hostnames": [name]}, 200,
         lambda d: msg(d)["N"] == n0 + 1 and name in msg(d)["replicas"]),
        ("POST", "/add", {"n": 1, "hostnames": ["x1", "x2"]}, 400,
         lambda d: msg(d) == ADD_TOO_MANY),
        ("POST", "/add", {"n": 0}, 400, lambda d: d.get("status") == "failure"),
        ("DELETE", "/rm", {"n": 1, "hostnames": [name]}, 200,
         lambda d: msg(d)["N"] == n0 and name not in msg(d)["replicas"]),
        ("DELETE", "/rm", {"n": 1, "hostnames": ["x1", "x2"]}, 400,
         lambda d: msg(d) == RM_TOO_MANY),
    ]
    out = []
    for method, path, body, expect, check in calls:
        try:
            out.append(_probe(session, ctx.url, method, path, body, expect, check))
        except (KeyError, TypeError, AttributeError) as exc:
            out.append({"call": f"{method} {path}", "status": -1, "ok": False,
                        "detail": f"unexpected reply shape: {exc!r}"})
    return out


async def _kill_under_load(ctx: Context, duration: float, kill_at: float,
                           killer: Killer) -> dict[str, Any]:
    t0 = time.perf_counter()
    results: list[Result] = []
    events: dict[str, Any] = {}
    rep_log: list[tuple[float, list[str]]] = []

    async def watch_rep(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() - t0 < duration:
            try:
                async with session.get(ctx.url + "/rep") as reply:
                    rep_log.append((time.perf_counter() - t0,
                                    (await reply.json())["message"]["replicas"]))
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.1)

    async def kill() -> None:
        await asyncio.sleep(kill_at)
        served = [r for r in results if r.ok and r.served_by]
        by_name: dict[tuple[str, int], int] = {}
        for r in served:
            key = (r.served_by or "", r.server_id or 0)
            by_name[key] = by_name.get(key, 0) + 1
        if not by_name:
            raise AnalysisError("no successful request before the kill")
        (victim, victim_id), _ = max(by_name.items(), key=lambda kv: kv[1])
        events.update(victim=victim, victim_id=victim_id)
        done = await asyncio.to_thread(killer.kill, victim, victim_id)
        events["kill"] = time.perf_counter() - t0
        events["how"] = done

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        loader = asyncio.create_task(load(ctx.url + "/home", None, duration, ctx.concurrency,
                                          ctx.timeout, results.append, t0))
        await asyncio.gather(kill(), watch_rep(session))
        await loader
    events["rep_log"] = rep_log
    events["results"] = results
    return events


def _timeline(events: dict[str, Any], duration: float, step: float = 0.5) -> dict[str, Any]:
    results: list[Result] = events["results"]
    victim, victim_id, kill_t = events["victim"], events["victim_id"], events["kill"]
    bins = int(duration / step)  # requests still in flight at the deadline fall outside
    ok = [0] * bins
    err = [0] * bins
    vic = [0] * bins
    lat: list[list[float]] = [[] for _ in range(bins)]
    for r in results:
        b = int(r.end / step)
        if b >= bins:
            continue
        if r.ok:
            ok[b] += 1
            lat[b].append(r.latency)
            vic[b] += r.server_id == victim_id
        else:
            err[b] += 1
    detected = next((t for t, names in events["rep_log"] if t > kill_t and victim not in names),
                    None)
    serving = min((r.end for r in results if r.ok and r.start > kill_t
                   and r.server_id == victim_id and r.served_by != victim), default=None)
    after = [r for r in results if r.end > kill_t]
    window = [r for r in after if serving is None or r.end <= serving]
    return {
        "t": [round(i * step, 2) for i in range(bins)],
        "ok_rps": [x / step for x in ok],
        "error_rps": [x / step for x in err],
        "victim_rps": [x / step for x in vic],
        "p99_ms": [percentile(x, 99) if x else 0.0 for x in lat],
        "victim": victim,
        "victim_id": victim_id,
        "kill": round(kill_t, 3),
        "how": events["how"],
        "detected": round(detected, 3) if detected is not None else None,
        "serving": round(serving, 3) if serving is not None else None,
        "detection_s": round(detected - kill_t, 3) if detected is not None else None,
        "recovery_s": round(serving - kill_t, 3) if serving is not None else None,
        "requests": len(results),
        "errors": sum(not r.ok for r in results),
        "errors_during_recovery": sum(not r.ok for r in window),
        "requests_during_recovery": len(window),
        "p99_ms_before_kill": round(1000 * percentile(
            [r.latency for r in results if r.ok and r.end < kill_t], 99), 2),
        "p99_ms_during_recovery": round(1000 * percentile(
            [r.latency for r in window if r.ok], 99), 2),
    }


def a3(ctx: Context, duration: float = 30.0, kill_at: float = 8.0) -> dict[str, Any]:
    """Every endpoint, then the busiest replica killed under load: the timeline around it."""
    killer = ctx.killer()
    checks = exercise_endpoints(ctx)
    headers = ["call", "expected", "got", "ok", "ms"]
    rows = [(c["call"], c.get("expected", ""), c["status"], "yes" if c["ok"] else "NO",
             c.get("ms", "")) for c in checks]
    ctx.log("\nA-3: every endpoint")
    ctx.log(text_table(headers, rows))
    ctx.log(f"A-3: load for {duration:.0f} s at concurrency {ctx.concurrency}; "
            f"killing the busiest replica at t={kill_at:.0f} s ...")
    events = asyncio.run(_kill_under_load(ctx, duration, kill_at, killer))
    timeline = _timeline(events, duration)
    data = {"endpoints": checks, "timeline": timeline}
    write_json(ctx.out, "a3.json", data)
    charts.a3_chart(timeline, os.path.join(ctx.out, "a3.png"))
    facts = [
        ("replica killed", (f"{timeline['victim']} (server id {timeline['victim_id']}) "
                           f"at t={timeline['kill']} s: {timeline['how']}")),
        ("gone from /rep (replacement reserved)", _secs(timeline["detection_s"])),
        ("replacement serves (recovery time)", _secs(timeline["recovery_s"])),
        ("requests / errors (whole run)", f"{timeline['requests']} / {timeline['errors']}"),
        ("requests / errors (kill .. replacement serves)",
         f"{timeline['requests_during_recovery']} / {timeline['errors_during_recovery']}"),
        ("p99 latency before the kill / during recovery",
         f"{timeline['p99_ms_before_kill']} ms / {timeline['p99_ms_during_recovery']} ms"),
    ]
    write_text(ctx.out, "a3.md", markdown_table(headers, rows) + "\n\n"
               + markdown_table(["what", "measured"], facts))
    ctx.log(text_table(["what", "measured"], facts))
    ctx.log(f"recovery time: {_secs(timeline['recovery_s'])}")
    return data


def _secs(x: float | None) -> str:
    return "not within the run" if x is None else f"{x:.2f} s"


# -- A-4 ---------------------------------------------------------------------------------------
def a4(ctx: Context, variants: list[str], spawn: bool, targets: dict[str, str],
       n_values: range = range(2, 7), settings: dict[str, str] | None = None) -> dict[str, Any]:
    """A-1 and A-2 for each variant (hash preset or strategy), side by side."""
    collected: dict[str, dict[str, Any]] = {}
    for name in variants:
        folder = os.path.join(ctx.out, "a4", name)
        ctx.log(f"\n== A-4: {name} ==")
        if spawn:
            if name not in VARIANTS:
                raise AnalysisError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
            with LocalStack(name, {**(settings or {}), **VARIANTS[name]}) as stack:
                sub = ctx.at(stack.url, folder, stack.registry)
                collected[name] = {"a1": a1(sub, 3, name), "a2": a2(sub, n_values, name)}
        else:
            if name not in targets:
                raise AnalysisError(f"no --target {name}=URL given (or use --spawn)")
            sub = ctx.at(targets[name], folder)
            collected[name] = {"a1": a1(sub, 3, name), "a2": a2(sub, n_values, name)}
    write_json(ctx.out, "a4.json", collected)
    charts.a4_chart(collected, os.path.join(ctx.out, "a4.png"))
    ns = [r["replicas"] for r in next(iter(collected.values()))["a2"]]
    headers = ["variant", "A-1 shares (N=3)", *(f"max/mean N={n}" for n in ns)]
    rows = []
    for name, v in collected.items():
        total = max(1, v["a1"]["ok"])
        shares = " / ".join(f"{100 * c / total:.1f}%" for c in v["a1"]["per_server"].values())
        rows.append((name, shares, *(r["max_over_mean"] for r in v["a2"])))
    write_text(ctx.out, "a4.md", markdown_table(headers, rows))
    ctx.log("\nA-4: side by side")
    ctx.log(text_table(headers, rows))
    return collected
