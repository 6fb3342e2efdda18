"""The benchmark: the same 3 replicas behind this balancer's two workers, HAProxy and nginx,
and directly.

One run, one machine, loopback only, every load bounded in time (wrk ``-d``):

1. ``lb-run`` starts the balancer (``LB_WORKER=async``), its supervisor and 3 local replicas
   (hash key ``query:id``, the settings below); a second balancer with ``LB_WORKER=threads``
   serves the same registry on another port; HAProxy (``balance url_param id`` + ``hash-type
   consistent``) and nginx (``hash $arg_id consistent``) are started on the *same* 3 replicas,
   both told to add the headers the balancer adds (``X-Forwarded-For``, ``-Host``, ``-Proto``,
   ``X-Request-ID``), so every replica parses the same requests whoever sent them.
2. **Saturation**: wrk with a fixed number of keep-alive connections, each request
   ``GET /home?id=<random 6-digit>``, against each target in turn, ``--rounds`` times
   (interleaved, so a burst of outside load hits every target alike). *direct* is one wrk per
   replica at the same time with a third of the connections each; its p99 is the largest of the
   three (an upper bound of the combined p99) and its p50 the request-weighted mean.
3. **Half load**: few connections at a constant rate, half of the balancer's saturation rate,
   the same for every target: wrk2 is not in Debian, so wrk's Lua ``delay()`` gives each
   request the next slot of a schedule 1/rate apart (LuaJIT's ffi reads the clock).
   ``--half-rounds`` interleaved rounds (a burst of outside load hits every target alike); the
   balancer-added p99 is its p99 minus the direct p99 of the same round, median over rounds.
4. CPU per request of each proxy and of the replicas (``psutil`` CPU times over each run).
5. **Slow clients**: ``bench/slowloris.py`` against each worker: ``--slow-attackers``
   connections trickling headers or admin bodies (reconnecting when dropped) for
   ``--slow-seconds``, beside a normal client's GETs (2 s timeout); its success rate and
   latency, and the balancer's memory (RSS of its processes) before and at the peak.
6. The micro-benchmark (``bench/micro.py``) and, with ``--profile``, py-spy on the balancer's
   workers under saturation (``bench/profile.txt``).

Writes ``bench/results.md`` and ``bench/results.json``. Run it with ``bash bench/run.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from analysis.stacks import LocalStack, free_port
from bench import micro

WRK_LUA = """
math.randomseed(tonumber(os.getenv("WRK_SEED") or "1") + os.time())
local rate = tonumber(os.getenv("WRK_RATE") or "0")
request = function()
  return wrk.format("GET", "/home?id=" .. math.random(100000, 999999))
end
if rate > 0 then
  -- A constant rate (wrk2 is not in Debian): each request takes the next slot of a schedule
  -- 1/rate apart, read on the monotonic clock through LuaJIT's ffi. A late reply delays its
  -- connection's next request; the schedule does not catch up in a burst afterwards.
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  local interval, slot = 1000 / rate, 0
  delay = function()
    ffi.C.clock_gettime(1, ts)
    local now = tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    slot = math.max(slot + interval, now)
    return slot - now
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"us\\": %d, \\"p50\\": %d, \\"p90\\": %d, \\"p99\\": %d, "
    .. "\\"errors\\": %d, \\"non2xx\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""

HAPROXY_CFG = """
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    # The headers this balancer sends its replicas, so each replica parses the same request.
    option forwardfor
    unique-id-format %{{+X}}o%ci%cp%fi%fp%Ts%rt
    http-request set-header X-Request-ID %[unique-id]
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Forwarded-Proto http
    default_backend replicas
backend replicas
    balance url_param id
    hash-type consistent
{servers}
"""

NGINX_CONF = """
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream replicas {{
        hash $arg_id consistent;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The headers this balancer sends its replicas, so each replica parses the same.
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-ID $request_id;
        }}
    }}
}}
"""


# -- the other proxies -------------------------------------------------------------------------
def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


@contextlib.contextmanager
def _process(cmd: list[str], port: int, what: str, log: str, env: dict[str, str] | None = None,
             timeout: float = 10, cwd: str = ROOT) -> Iterator[psutil.Process]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
    try:
        _wait_port(port, proc, what, timeout)
        yield psutil.Process(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def haproxy(replicas: list[str], folder: str) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    servers = "\n".join(f"    server s{i} {a.split('//')[1]}" for i, a in enumerate(replicas, 1))
    cfg = os.path.join(folder, "haproxy.cfg")
    with open(cfg, "w", encoding="utf-8") as fh:
        fh.write(HAPROXY_CFG.format(port=port, servers=servers))
    with _process(["haproxy", "-f", cfg, "-db"], port, "haproxy",
                  os.path.join(folder, "haproxy.log")) as proc:
        yield f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def nginx(replicas: list[str], folder: str, workers: int) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    prefix = os.path.join(folder, "nginx")
    os.makedirs(prefix, exist_ok=True)
    servers = "\n".join(f"        server {a.split('//')[1]};" for a in replicas)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(NGINX_CONF.format(port=port, servers=servers, dir=prefix, workers=workers))
    with _process(["nginx", "-p", prefix, "-c", conf], port, "nginx",
                  os.path.join(folder, "nginx.log")) as proc:
        yield f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def threads_balancer(stack: LocalStack, folder: str) -> Iterator[tuple[str, psutil.Process]]:
    """A second balancer, ``LB_WORKER=threads``, on the stack's registry and replicas."""
    port = free_port()
    env = {**stack.env, "LB_WORKER": "threads", "LB_PORT": str(port),
           "LB_REGISTRY": stack.registry}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # its own counters, not the stack's
    with _process([sys.executable, "-m", "gunicorn", "-c", "python:lb.gunicorn_conf"], port,
                  "the threads balancer", os.path.join(folder, "threads.log"), env,
                  timeout=60) as proc:
        yield f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def baseline_balancer(stack: LocalStack, folder: str,
                      rev: str) -> Iterator[tuple[str, psutil.Process]]:
    """The async worker of another commit (``rev``, checked out in ``folder``) on the stack's
    registry and replicas: the code before a change, measured beside the code after it."""
    port = free_port()
    with tree_of(rev, folder) as tree:
        env = {**stack.env, "LB_WORKER": "async", "LB_PORT": str(port),
               "LB_REGISTRY": stack.registry, "PYTHONPATH": tree}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # its own counters, not the stack's
        with _process([sys.executable, "-m", "gunicorn", "-c", "python:lb.gunicorn_conf"], port,
                      f"the balancer at {rev}", os.path.join(folder, "baseline.log"), env,
                      timeout=60, cwd=tree) as proc:
            yield f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def tree_of(rev: str | None, folder: str) -> Iterator[str]:
    """A checkout of ``rev`` (a temporary git worktree in ``folder``), or this one for None."""
    if rev is None:
        yield ROOT
        return
    tree = os.path.join(folder, f"tree-{rev[:12]}")
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", tree, rev], cwd=ROOT,
                   check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=False)


def slow_clients(url: str, procs: list[psutil.Process], attackers: int,
                 seconds: float) -> dict[str, Any]:
    """The slow-client attack against ``url``, and the memory of ``procs`` (RSS, MiB) before
    it and at its peak."""
    from bench.slowloris import attack

    def rss() -> float:
        total = 0
        for proc in (q for p in procs for q in _tree(p)):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total / 2**20

    before, peak = rss(), [0.0]
    stop = time.monotonic() + seconds + 5

    def watch() -> None:
        while time.monotonic() < stop:
            peak[0] = max(peak[0], rss())
            time.sleep(0.5)

    import threading
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcome = attack(url, attackers=attackers, seconds=seconds)
    stop = time.monotonic()
    watcher.join()
    return {**outcome.summary(), "rss_before_mib": round(before, 1),
            "rss_peak_mib": round(peak[0], 1)}


# -- measuring ---------------------------------------------------------------------------------
def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _tree(p: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [p, *p.children(recursive=True)]
    return []


def wrk(urls: list[str], connections: int, seconds: float, lua: str,
        rate: float = 0.0) -> dict[str, Any]:
    """One wrk per URL at the same time, ``connections`` and ``rate`` (requests per second
    in all; 0: as fast as they answer) split between them; merged."""
    per = max(1, connections // len(urls))
    env = {**os.environ, "WRK_RATE": f"{rate / len(urls):.3f}"}
    procs = []
    for k, url in enumerate(urls):
        env_k = {**env, "WRK_SEED": str(k)}
        procs.append(subprocess.Popen(
            ["wrk", "-t1", f"-c{per}", f"-d{seconds:.0f}s", "--timeout", "5s", "-s", lua, url],
            env=env_k, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    parts = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no summary:\n{out}")
        parts.append(json.loads(line[8:]))
    requests = sum(x["requests"] for x in parts)
    secs = max(x["us"] for x in parts) / 1e6
    return {
        "requests": requests,
        "rps": requests / secs,
        "p50_ms": sum(x["p50"] * x["requests"] for x in parts) / max(1, requests) / 1000,
        "p90_ms": max(x["p90"] for x in parts) / 1000,
        "p99_ms": max(x["p99"] for x in parts) / 1000,
        "errors": sum(x["errors"] for x in parts),
        "non2xx": sum(x["non2xx"] for x in parts),
        "connections": per * len(urls),
    }


def measured(target: dict[str, Any], connections: int, seconds: float, lua: str,
             replicas: list[psutil.Process], rate: float = 0.0) -> dict[str, Any]:
    proxy = [q for p in target["procs"] for q in _tree(p)]
    before_proxy, before_rep = _cpu(proxy), _cpu(replicas)
    result = wrk(target["urls"], connections, seconds, lua, rate)
    n = max(1, result["requests"])
    result["proxy_cpu_us"] = 1e6 * (_cpu(proxy) - before_proxy) / n if proxy else 0.0
    result["replica_cpu_us"] = 1e6 * (_cpu(replicas) - before_rep) / n
    return result


def paced(target: dict[str, Any], rate: float, connections: int, seconds: float, lua: str,
          replicas: list[psutil.Process]) -> dict[str, Any]:
    """wrk offering ``rate`` requests per second over ``connections``."""
    result = measured(target, connections, seconds, lua, replicas, rate)
    if abs(result["rps"] - rate) > 0.1 * rate:
        # Behind its schedule (a burst of other load, or a target that cannot keep up):
        # targets compared at different rates say nothing about latency; once more.
        result = measured(target, connections, seconds, lua, replicas, rate)
    result["offered_rps"] = rate
    return result


def half_summary(runs: list[dict[str, Any]],
                 direct: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A target's half-load rounds: median figures, and its added p99 against the direct run
    of the same round (median and each round's), unless it is the direct target."""
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in runs)
                               for k in ("rps", "p50_ms", "p90_ms", "p99_ms")}
    summary["offered_rps"] = runs[0]["offered_rps"]
    summary["rounds"] = runs
    if direct is not None and runs is not direct:
        added = [r["p99_ms"] - d["p99_ms"] for r, d in zip(runs, direct, strict=True)]
        summary["added_p99_ms"] = statistics.median(added)
        summary["added_p99_rounds_ms"] = added
    return summary


# -- the run -------------------------------------------------------------------------------------
def same_replicas(registry_path: str, addresses: list[str]) -> None:
    """Raise if the registry's replicas are no longer those at ``addresses``: the supervisor
    replaced one, so the direct runs, HAProxy and nginx point at one that is gone."""
    now = [e["address"] for e in registry_entries(registry_path)]
    if now != addresses:
        raise RuntimeError(f"a replica was replaced during the run ({addresses} -> {now}; "
                           "lb-run.log says why): the figures no longer compare, run it again")


def registry_entries(registry_path: str) -> list[dict[str, Any]]:
    """The registry's replica entries, by server id."""
    with open(registry_path, encoding="utf-8") as fh:
        return sorted(json.load(fh)["replicas"], key=lambda e: e["server_id"])


def replica_processes(registry_path: str) -> tuple[list[str], list[psutil.Process]]:
    entries = registry_entries(registry_path)
    addresses = [e["address"] for e in entries]
    procs = []
    for e in entries:
        with contextlib.suppress(psutil.Error, ValueError):
            procs += _tree(psutil.Process(int(e["handle"].split("/")[0])))
    return addresses, procs


def balancer_processes(stack: LocalStack) -> list[psutil.Process]:
    """lb-run's gunicorn (master and workers); the supervisor is counted apart."""
    assert stack.proc is not None
    root = psutil.Process(stack.proc.pid)
    return [p for p in root.children() if "gunicorn" in " ".join(p.cmdline())]


def profile(pids: list[int], seconds: float, out_raw: str) -> None:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise RuntimeError("py-spy is not installed (bash bench/run.sh --profile installs it)")
    procs = [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                               "--rate", "250", "--nonblocking", "--format", "raw",
                               "--output", f"{out_raw}.{pid}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for pid in pids]
    for p in procs:
        p.wait(timeout=seconds + 60)
    with open(out_raw, "w", encoding="utf-8") as fh:
        for pid in pids:
            with contextlib.suppress(FileNotFoundError), open(f"{out_raw}.{pid}") as part:
                fh.write(part.read())


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="lb-bench-")
    lua = os.path.join(work, "ids.lua")
    with open(lua, "w", encoding="utf-8") as fh:
        fh.write(WRK_LUA)
    # Saturated replicas answer their heartbeat late too: 2 s (not 0.5) and 4 misses in a row
    # (not 2) keep the supervisor from replacing a replica for being busy in the middle of a
    # measurement (2 misses did, in a run of 2026-12-04 and one of 2026-12-06: every later
    # round then failed). A replacement all the same stops the run (same_replicas).
    settings = {"hash_key": "query:id", "strategy": args.strategy, "log_level": "warning",
                "workers": str(args.lb_workers), "threads": str(args.lb_threads),
                "worker": "async", "heartbeat_timeout": "2.0", "heartbeat_failures": "4"}
    meta: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "balancer_settings": {f"LB_{k.upper()}": v for k, v in settings.items()},
        "versions": _versions(),
        "args": vars(args),
    }
    print(f"starting the stack ({meta['balancer_settings']}) ...", file=sys.stderr)
    with LocalStack("bench", settings, os.path.join(work, "stack")) as stack:
        addresses, replicas = replica_processes(stack.registry)
        lb_procs = balancer_processes(stack)
        with haproxy(addresses, work) as (hurl, hproc), \
                nginx(addresses, work, args.nginx_workers) as (nurl, nproc), \
                threads_balancer(stack, work) as (turl, tproc), \
                (baseline_balancer(stack, work, args.baseline) if args.baseline
                 else contextlib.nullcontext(("", None))) as (burl, bproc):
            targets: dict[str, dict[str, Any]] = {
                "async": {"urls": [stack.url], "procs": lb_procs},
                "baseline": {"urls": [burl], "procs": [bproc]},
                "threads": {"urls": [turl], "procs": [tproc]},
                "haproxy": {"urls": [hurl], "procs": [hproc]},
                "nginx": {"urls": [nurl], "procs": [nproc]},
                "direct": {"urls": addresses, "procs": []},
            }
            chosen = args.targets.split(",") + (["baseline"] if args.baseline else [])
            targets = {k: v for k, v in targets.items() if k in chosen}
            for name, t in targets.items():  # warm up: connections, pools, caches
                print(f"warming up {name} ...", file=sys.stderr)
                wrk(t["urls"], args.connections, 2, lua)
            saturation: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for r in range(args.rounds):
                for name, t in targets.items():
                    print(f"round {r + 1}/{args.rounds}: {name}, {args.connections} connections, "
                          f"{args.duration:.0f} s ...", file=sys.stderr)
                    same_replicas(stack.registry, addresses)
                    saturation[name].append(measured(t, args.connections, args.duration, lua,
                                                     replicas))
            # Half load: each worker at half its own saturation rate, beside the replicas
            # directly at the same rate; HAProxy and nginx at the async worker's. Interleaved
            # rounds, each proxy compared with the direct run of its own round.
            half: dict[str, dict[str, Any]] = {}
            for worker in [w for w in ("async", "threads") if w in targets and not args.quick]:
                rate = statistics.median(x["rps"] for x in saturation[worker]) / 2
                others = ["haproxy", "nginx"] if worker == "async" else []
                names = [n for n in [worker, *others, "direct"] if n in targets]
                runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
                for r in range(args.half_rounds):
                    for name in names:
                        print(f"half load, round {r + 1}/{args.half_rounds}: {name} at "
                              f"{rate:.0f} req/s ...", file=sys.stderr)
                        same_replicas(stack.registry, addresses)
                        runs[name].append(paced(targets[name], rate, args.paced_connections,
                                                args.duration, lua, replicas))
                for name in names:
                    key = name if name != "direct" else f"direct@{worker}"
                    half[key] = half_summary(runs[name], runs.get("direct"))
            single: dict[str, dict[str, Any]] = {}
            for name, t in targets.items() if not args.quick else ():
                print(f"one connection: {name} ...", file=sys.stderr)
                one = {**t, "urls": t["urls"][:1]}  # direct: one replica (they are identical)
                single[name] = measured(one, 1, args.duration, lua, replicas)
            slow: dict[str, dict[str, Any]] = {}
            for name in [w for w in ("async", "threads") if w in targets and not args.quick]:
                print(f"slow clients: {args.slow_attackers} against {name} for "
                      f"{args.slow_seconds:.0f} s ...", file=sys.stderr)
                slow[name] = slow_clients(targets[name]["urls"][0], targets[name]["procs"],
                                          args.slow_attackers, args.slow_seconds)
                time.sleep(3)  # let the dropped attackers' connections drain
            prof = cpu_prof = None
            if args.profile:
                print("profiling the balancer under saturation (py-spy) ...", file=sys.stderr)
                raw = os.path.join(work, "profile.raw")
                loader = subprocess.Popen(
                    ["wrk", "-t1", f"-c{args.connections}", f"-d{int(args.profile_seconds) + 2}s",
                     "-s", lua, stack.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
                workers = [c.pid for m in lb_procs for c in m.children()]
                profile(workers, args.profile_seconds, raw)
                loader.wait(timeout=args.profile_seconds + 60)
                from bench.profile_summary import summarize
                with open(raw, encoding="utf-8") as fh:
                    prof = summarize(fh.readlines())
                print("CPU profile in-process (cProfile, CPU clock) ...", file=sys.stderr)
                from bench.cpu_profile import profile_app
                cpu_prof = profile_app(stack.registry, 3000, env=stack.env)
    print("micro-benchmark ...", file=sys.stderr)
    micro_rows = micro.run() if not args.quick else []
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(work, ignore_errors=True)
    return {"meta": meta, "saturation": saturation, "half_load": half, "micro": micro_rows,
            "profile": prof, "cpu_profile": cpu_prof, "one_connection": single,
            "slow_clients": slow}


def baseline_line(data: dict[str, Any]) -> str:
    """This checkout's async worker against the baseline's, round by round (same targets,
    interleaved: a burst of outside load hits both alike)."""
    sat, rev = data["saturation"], data["meta"]["args"]["baseline"]
    ratios = [a["rps"] / b["rps"] for a, b in zip(sat["async"], sat["baseline"], strict=True)]
    cpu = _median(sat["async"], "proxy_cpu_us") / _median(sat["baseline"], "proxy_cpu_us")
    return (f"this checkout / {rev}: requests/s {statistics.median(ratios):.3f} (median of "
            f"rounds: {', '.join(f'{r:.3f}' for r in ratios)}); CPU per request {cpu:.3f}")


def _versions() -> dict[str, str]:
    out = {}
    for cmd, args in (("haproxy", ["-v"]), ("nginx", ["-v"]), ("wrk", ["-v"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([cmd, *args], capture_output=True, text=True, check=False,
                                  timeout=10).stdout
            text += subprocess.run([cmd, *args], capture_output=True, text=True, check=False,
                                   timeout=10).stderr
            out[cmd] = text.strip().splitlines()[0] if text.strip() else "?"
    out["python"] = platform.python_version()
    return out


# -- the report ----------------------------------------------------------------------------------
def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(data: dict[str, Any]) -> str:
    sat, half, meta = data["saturation"], data["half_load"], data["meta"]
    names = [n for n in ("async", "baseline", "threads", "haproxy", "nginx", "direct")
             if n in sat]
    label = {"async": "(a) this balancer, LB_WORKER=async",
             "baseline": f"(a') the same at {meta['args'].get('baseline')}, LB_WORKER=async",
             "threads": "(b) this balancer, LB_WORKER=threads",
             "haproxy": "(c) HAProxy, hash-type consistent",
             "nginx": "(d) nginx, hash $arg_id consistent", "direct": "(e) replicas directly"}
    h = {k: _median(sat["haproxy"], k) for k in ("rps", "p50_ms", "p99_ms")}
    lines = [
        "# Benchmark: this balancer, HAProxy, nginx and the replicas directly",
        "",
        (f"{meta['when']}; {meta['machine']}; load average before {meta['load_before']}, after "
        f"{meta['load_after']} (wrk, the replicas and the proxy under test share the machine's "
        "cores, with whatever else runs on it: figures move between runs, ratios measured "
        "side by side hold better)."),
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        (f"Balancer settings: {', '.join(f'{k}={v}' for k, v in meta['balancer_settings'].items())}"
        f"; 3 local replicas (gunicorn gthread, 1 worker each)."),
        "",
        ("What was tuned and what holds the balancer back: [tuning.md](tuning.md); every run's "
         "headline figures: [history.md](history.md)."),
        "",
        (f"## Saturation: wrk, {meta['args']['connections']} keep-alive connections, "
        f"{meta['args']['duration']:.0f} s per run, median of {meta['args']['rounds']} "
        "interleaved rounds"),
        "",
        ("| target | requests/s | p50 | p99 | rps / HAProxy | p50 / HAProxy | p99 / HAProxy | "
        "proxy CPU per request | replica CPU per request | errors | all rounds (req/s) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rows = sat[n]
        rps, p50, p99 = (_median(rows, k) for k in ("rps", "p50_ms", "p99_ms"))
        proxy = _median(rows, "proxy_cpu_us")
        lines.append(
            f"| {label[n]} | {rps:.0f} | {p50:.2f} ms | {p99:.2f} ms | {rps / h['rps']:.2f} | "
            f"{p50 / h['p50_ms']:.2f} | {p99 / h['p99_ms']:.2f} | "
            f"{'-' if n == 'direct' else f'{proxy:.0f} µs'} | "
            f"{_median(rows, 'replica_cpu_us'):.0f} µs | "
            f"{sum(r['errors'] + r['non2xx'] for r in rows)} | "
            f"{', '.join(str(round(r['rps'])) for r in rows)} |")
    if "baseline" in sat:
        lines += ["", baseline_line(data)]
    lines += [
        "",
        (f"## Half load: each worker at half its own saturation rate, wrk at that constant rate over "
         f"{meta['args']['paced_connections']} connections, {meta['args']['duration']:.0f} s; "
         f"the replicas directly at the same rate; median of "
         f"{meta['args'].get('half_rounds', 1)} interleaved rounds"),
        "",
        ("| target | offered req/s | achieved req/s | p50 | p90 | p99 | added p99 vs direct "
         "(median) | added p99, each round | proxy CPU per request |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for worker in ("async", "threads"):
        direct = half.get(f"direct@{worker}")
        for n in [worker, *(("haproxy", "nginx") if worker == "async" else ()), "direct"]:
            r = half.get(n) if n != "direct" else direct
            if r is None:
                continue
            added = each = "-"
            if "added_p99_ms" in r:
                added = f"{r['added_p99_ms']:+.2f} ms"
                each = ", ".join(f"{x:+.2f}" for x in r["added_p99_rounds_ms"]) + " ms"
            cpu = "-" if n == "direct" else \
                f"{statistics.median(x['proxy_cpu_us'] for x in r['rounds']):.0f} µs"
            lines.append(f"| {label[n]} | {r['offered_rps']:.0f} | {r['rps']:.0f} | "
                         f"{r['p50_ms']:.2f} ms | {r['p90_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
                         f"{added} | {each} | {cpu} |")
    if data.get("slow_clients"):
        args = meta["args"]
        lines += ["", (f"## Slow clients: {args['slow_attackers']} connections trickling headers "
                       f"or admin bodies (a byte every 1-2 s, reconnecting when dropped) for "
                       f"{args['slow_seconds']:.0f} s, beside a normal client's GET /home every "
                       "0.25 s with a 2 s timeout"), "",
                  ("| worker | normal GETs answered | p50 | p95 | attacker connections | "
                   "dropped by the balancer | balancer memory before / peak |"),
                  "|---|---|---|---|---|---|---|"]
        for n, r in data["slow_clients"].items():
            lines.append(
                f"| {label[n]} | {r['normal_ok']} of {r['normal_sent']} "
                f"({100 * r['success_rate']:.1f} %) | {r['p50_ms']} ms | {r['p95_ms']} ms | "
                f"{r['attack_connections']} | {r['attack_dropped']} | "
                f"{r['rss_before_mib']} / {r['rss_peak_mib']} MiB |")
    if data.get("one_connection"):
        one = data["one_connection"]
        lines += ["", (f"## One connection (closed loop: no queueing), {meta['args']['duration']:.0f} s"
                  " (direct: one replica)"), "",
                  "| target | req/s | p50 | p99 | added p50 / p99 vs direct |", "|---|---|---|---|---|"]
        for n in names:
            r = one[n]
            added = ("-" if n == "direct" else f"{r['p50_ms'] - one['direct']['p50_ms']:+.2f} ms /"
                     f" {r['p99_ms'] - one['direct']['p99_ms']:+.2f} ms")
            lines.append(f"| {label[n]} | {r['rps']:.0f} | {r['p50_ms']:.2f} ms | "
                         f"{r['p99_ms']:.2f} ms | {added} |")
    lines += ["", ("## Micro-benchmark: the balancer's own work per request (best of 5 x 20,000 "
              "calls)"), "", micro.table(data["micro"])]
    if data.get("cpu_profile"):
        lines += ["", ("## Where the balancer's CPU goes (cProfile with a CPU clock, in-process; "
                  "bench/cpu_profile.py)"), "", "```", data["cpu_profile"], "```"]
    if data.get("profile"):
        lines += ["", ("## Profile of the balancer's workers under saturation (py-spy, wall "
                  "time of non-idle threads: waits in send/recv count as busy)"), "", "```",
                  data["profile"], "```"]
    return "\n".join(lines) + "\n"


HISTORY_HEAD = """# Benchmark runs, one line each (newest last)

Every `bash bench/run.sh` appends its headline figures here, so a re-run confirms (or not)
the previous ones. Same machine (2 cores, shared with other engineers' test runs).

| when | load avg before | balancer req/s | HAProxy req/s | ratio | nginx ratio | balancer-added p99 at half load | added p50 / p99, one connection | candidates() worst |
|---|---|---|---|---|---|---|---|---|
"""
# Since both workers are measured: the first columns are the async worker's, then the threads'.
HISTORY_BOTH = """
| when | load avg before | async req/s | threads req/s | HAProxy req/s | async ratio | threads ratio | nginx ratio | async CPU per request | threads CPU per request | async-added p99 at half load | normal GETs answered under slow clients (async / threads) |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def append_history(data: dict[str, Any], path: str) -> None:
    sat, half, slow = data["saturation"], data["half_load"], data.get("slow_clients") or {}
    if not {"async", "threads", "haproxy", "nginx"} <= set(sat) or "async" not in half:
        return  # a partial run (--targets, --quick): no headline figures to compare
    rps = {n: _median(rows, "rps") for n, rows in sat.items()}
    cpu = {n: _median(rows, "proxy_cpu_us") for n, rows in sat.items()}
    hp = rps["haproxy"]
    added = half["async"]["added_p99_ms"]
    answered = " / ".join(f"{100 * slow[n]['success_rate']:.1f} %" if n in slow else "-"
                          for n in ("async", "threads"))
    row = (f"| {data['meta']['when']} | {data['meta']['load_before'][0]} | {rps['async']:.0f} | "
           f"{rps['threads']:.0f} | {hp:.0f} | {rps['async'] / hp:.2f} | "
           f"{rps['threads'] / hp:.2f} | {rps['nginx'] / hp:.2f} | {cpu['async']:.0f} µs | "
           f"{cpu['threads']:.0f} µs | {added:+.2f} ms | {answered} |\n")
    text = HISTORY_HEAD
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text if "| async req/s |" in text else text.rstrip("\n") + "\n" + HISTORY_BOTH)
        fh.write(row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=int, default=24, help="saturation (24)")
    parser.add_argument("--paced-connections", type=int, default=6, help="half load (6)")
    # Five, not three: a p99 over 10 s moves with any burst of outside load, and one such round
    # in three moved the median by several milliseconds (bench/history.md, 2026-12-04).
    parser.add_argument("--half-rounds", type=int, default=5,
                        help="half-load rounds, interleaved (5)")
    parser.add_argument("--rounds", type=int, default=2, help="saturation rounds (2)")
    parser.add_argument("--strategy", default="maglev", help="LB_STRATEGY for the balancer")
    parser.add_argument("--lb-workers", type=int, default=2, help="LB_WORKERS (2)")
    parser.add_argument("--lb-threads", type=int, default=8, help="LB_THREADS (8)")
    parser.add_argument("--nginx-workers", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="py-spy the balancer's workers")
    parser.add_argument("--profile-seconds", type=float, default=8)
    parser.add_argument("--targets", default="async,threads,haproxy,nginx,direct")
    parser.add_argument("--slow-attackers", type=int, default=200)
    parser.add_argument("--slow-seconds", type=float, default=30)
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure the async worker of git commit REV, interleaved "
                             "with this checkout's (a change's before and after, in one run)")
    parser.add_argument("--quick", action="store_true",
                        help="saturation only (for tuning): no half load, no micro-benchmark")
    parser.add_argument("--out", default=os.path.join(HERE, "results.md"))
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args(argv)
    for tool in ("wrk", "haproxy", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing; bash bench/run.sh installs it")
    data = run(args)
    if args.quick:
        for name, rows in data["saturation"].items():
            print(name, [(round(r["rps"]), round(r["p99_ms"], 1), round(r["proxy_cpu_us"]))
                         for r in rows])
        if "baseline" in data["saturation"]:
            print(baseline_line(data))
        if data["profile"]:
            print(data["profile"])
        return
    report = render(data)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(report)
    append_history(data, os.path.join(os.path.dirname(args.out), "history.md"))
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    print(report)
    print(f"written: {args.out}, {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
