"""The highly available stack's benchmark: figures, not assertions (``make -f bench/bench.mk
bench-ha``; ``--quick`` in under ~3 minutes).

Everything runs on this machine, on loopback, on free ports, under a deployment name of its own
(other people's tests share the machine); every load is bounded in time (wrk ``-d``) and every
wait in count or time. The stacks are ``lb.ha.HaStack`` (real etcd members, supervisors and
balancers as processes, local replicas), each stopped at the end whatever happens.

1. **Throughput, etcd store vs file store**: stack A, one balancer on the etcd registry (one
   supervisor, 3 replicas), and a second balancer with the *same settings* on a registry file
   that mirrors the etcd state (a thread here rewrites the file through the file store each
   time the state key changes, so both balancers route to the *same 3 replicas* and see the
   same writes at the same pace). wrk (bench.py's machinery), saturation, interleaved rounds.
2. **Convergence** (stack B: 3 etcd members, 2 supervisors, 3 balancers): /add and /rm of one
   named replica through each balancer in turn. Before each change, one kept-alive connection
   per balancer *worker* (mapped to its worker with psutil, so every worker is polled); they
   are polled for ``/_lb/readyz``, whose ``registry_version`` is the state the worker routes
   with (what its watch thread applied). The change's version is the first registry version
   (replayed from etcd's history) in which the new replica is routable (/add) or the removed
   one is not (/rm). Convergence of a balancer = the time its *last* worker first answered a
   version >= that one, minus the time the /add or /rm reply reached the client (negative:
   applied before the client had the reply).
3. **Supervisor takeover**: SIGKILL (then SIGSTOP) the leading supervisor (the leader key's
   ``host:pid``) and SIGKILL a replica's process group right after; time until the leader key
   names the standby, and until the replica's server id is READY again with a new process.
   After SIGSTOP the old leader gets SIGCONT once the standby leads; over the next seconds its
   log must show no start or stop and every replica process must belong to a registry entry.
4. **Failed requests through faults**: wrk at a constant rate through each balancer at once
   (one wrk per balancer: non-2xx answers and connection errors per balancer), a window with
   no fault, then one per fault (kill an etcd follower, the etcd raft leader, 2 of 3 members
   then restart them, SIGKILL a balancer, SIGKILL the leading supervisor); what was killed is
   restarted after its window and the stack checked READY before the next.

Writes ``bench/results-ha.md`` (with ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.bench import WRK_LUA, measured
from lb.etcd import EtcdUnreachable
from lb.ha import HaStack, free_port_run
from lb.ops.metrics import ENV_DIR, prepare_multiprocess_dir
from lb.registry import READY, Registry, RegistryError, State
from lb.settings import Settings

# The benchmark's own settings (bench/bench.py): saturated replicas answer heartbeats late, so
# 2 s and 4 misses keep the supervisor from replacing a busy one mid-measurement.
BENCH_SETTINGS = {"hash_key": "query:id", "strategy": "maglev", "log_level": "warning",
                  "workers": 2, "threads": 8, "worker": "async", "heartbeat_timeout": 2.0,
                  "heartbeat_failures": 4}
# Stack B: the defaults (heartbeats, leader lease) but for the hash key and the log level.
HA_SETTINGS = {"hash_key": "query:id", "strategy": "maglev", "log_level": "info"}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- ports and the stack ----------------------------------------------------------------------
def make_stack(label: str, overrides: dict[str, Any], balancers: int, supervisors: int,
               logs: str) -> HaStack:
    deployment = f"bench-ha-{label}-{uuid.uuid4().hex[:8]}"
    etcd_port = free_port_run(13)  # clients +0..2, peers +10..12
    port = free_port_run(balancers)
    settings = Settings.from_env({}, deployment=deployment, host="127.0.0.1", port=port,
                                 **overrides)
    os.makedirs(logs, exist_ok=True)
    return HaStack(settings, balancers=balancers, supervisors=supervisors,
                   etcd_port=etcd_port, logs=logs, ready_timeout=90)


@contextlib.contextmanager
def running(stack: HaStack, keep_logs: bool = False) -> Iterator[HaStack]:
    try:
        say(f"starting {stack.settings.deployment}: etcd on "
            f"{stack.cluster.client_ports[0]}.., balancers on {stack.ports}")
        stack.start()
        if not stack.wait_ready():
            raise RuntimeError(f"{stack.settings.deployment}: replicas not ready in time")
        for url in stack.urls:
            wait_http(url + "/_lb/readyz", 60)
        yield stack
    finally:
        say(f"stopping {stack.settings.deployment}")
        stack.stop()
        if not keep_logs:  # the replicas' logs (the local backend's folder, left by stop())
            shutil.rmtree(os.path.dirname(stack.settings.registry_path), ignore_errors=True)


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 in {timeout:.0f}s")
        time.sleep(0.1)


def read_state(stack: HaStack) -> State:
    return stack.registry().read()


def wait_all_ready(stack: HaStack, n: int, timeout: float = 60) -> float:
    """Until the registry has ``n`` members, all READY (and every balancer answers); seconds."""
    began = time.monotonic()
    registry = stack.registry()
    while True:
        try:
            members = registry.read().members()
            if len(members) == n and all(r.state == READY and r.lease is None for r in members):
                break
        except RegistryError:
            pass
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"the stack was not back to {n} ready replicas in {timeout:.0f}s")
        time.sleep(0.1)
    for url in stack.urls:
        wait_http(url + "/_lb/readyz", timeout)
    return time.monotonic() - began


def replica_procs(state: State) -> list[psutil.Process]:
    procs = []
    for r in state.members():
        pid = (r.handle or "").partition("/")[0]
        if pid.isdigit():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(int(pid))
                procs += [p, *p.children(recursive=True)]
    return procs


def restart_supervisor(stack: HaStack, index: int, logs: str, timeout: float = 30) -> float:
    """Start supervisor ``index`` again and wait until its log says it stands by (a standby
    still importing its modules would make the next takeover look slower); seconds."""
    path = os.path.join(logs, f"supervisor-{index + 1}.log")
    offset = os.path.getsize(path) if os.path.exists(path) else 0
    began = time.monotonic()
    stack.start_supervisor(index)
    while time.monotonic() - began < timeout:
        with open(path, encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            text = fh.read()
        if "standing by" in text or "leading the supervisors" in text:
            return time.monotonic() - began
        time.sleep(0.05)
    raise RuntimeError(f"supervisor {index + 1} did not stand by within {timeout:.0f}s")


def leader_index(stack: HaStack) -> tuple[int, str]:
    who = stack.registry().leader()
    if who is None:
        raise RuntimeError("no supervisor leads")
    pid = int(who.rpartition(":")[2])
    for i, p in enumerate(stack.supervisors):
        if p is not None and p.pid == pid:
            return i, who
    raise RuntimeError(f"the leader {who} is none of this stack's supervisors")


def wait_leader(stack: HaStack, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RegistryError):
            who = stack.registry().leader()
            if who is not None:
                return who
        time.sleep(0.1)
    raise RuntimeError("no supervisor leads")


# -- 1. throughput: the etcd store against the file store -----------------------------------
class LeaderWatch:
    """The leader key, read every 0.1 s through a window: how often it changed hands, how many
    new terms began (its create revision changed: a supervisor that stepped down and won again
    counts too), how long it named nobody, how long it could not be read (no quorum)."""

    def __init__(self, stack: HaStack) -> None:
        self.registry = stack.registry()
        self.seen: list[tuple[float, str | None]] = []  # "?": unreadable
        self.terms: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.registry.etcd.get(self.registry.leader_key, deadline=0.5)
                who = value.data
                self.seen.append((time.monotonic(), None if who is None else who.decode()))
                if who is not None:
                    self.terms.add(value.create_revision)
            except EtcdUnreachable:
                self.seen.append((time.monotonic(), "?"))
            self._stop.wait(0.1)

    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=5)
        changes, nobody, unknown = 0, 0.0, 0.0
        last = None
        for (t, who), (t2, _) in zip(self.seen, self.seen[1:]):
            if who is None:
                nobody += t2 - t
            elif who == "?":
                unknown += t2 - t
            elif last is not None and who != last:
                changes += 1
            if who not in (None, "?"):
                last = who
        return {"leader_changes": changes, "new_terms": max(0, len(self.terms) - 1),
                "no_leader_s": nobody, "unreadable_s": unknown}


class Mirror:
    """Keeps a registry file equal to the etcd state: each change of the state key rewritten
    through the file store (so the file balancer sees the same writes, at the same pace)."""

    def __init__(self, stack: HaStack, path: str) -> None:
        self.stack = stack
        self.file = Registry(path)
        self.file.create(read_state(stack), replace=True)
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mirror", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        registry = self.stack.registry()
        while not self._stop.is_set():
            try:
                value = registry.get()
                self._copy(value.data)
                for change in registry.etcd.watch(registry.state_key, value.revision + 1, 1.0):
                    self._copy(change.data)
                    if self._stop.is_set():
                        return
            except (EtcdUnreachable, RegistryError):
                self._stop.wait(0.2)

    def _copy(self, data: bytes | None) -> None:
        if data is None:
            return
        state = self.stack.registry().parse(data)
        with self.file.update() as mine:
            mine.replicas = state.replicas
        self.writes += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def file_balancer(stack: HaStack, path: str, logs: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A balancer with the stack's settings on the registry file ``path``."""
    port = free_port_run(1)
    metrics = prepare_multiprocess_dir(os.path.join(stack.folder, "file-balancer", "r.json"))
    env = {**stack.env, "LB_REGISTRY": path, "LB_PORT": str(port), ENV_DIR: metrics}
    with open(os.path.join(logs, "file-balancer.log"), "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                                 "python:lb.gunicorn_conf"], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/_lb/readyz", 60)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def throughput(args: argparse.Namespace, lua: str, logs: str) -> dict[str, Any]:
    stack = make_stack("tput", BENCH_SETTINGS, balancers=1, supervisors=1, logs=logs)
    with running(stack, args.keep_logs):
        state = read_state(stack)
        mirror = Mirror(stack, os.path.join(stack.folder, "file-registry.json"))
        try:
            with file_balancer(stack, mirror.file.path, logs) as (furl, fproc):
                replicas = replica_procs(state)
                balancer = stack.balancers[0]
                assert balancer is not None
                targets = {
                    "etcd": {"urls": [stack.urls[0]], "procs": [psutil.Process(balancer.pid)]},
                    "file": {"urls": [furl], "procs": [psutil.Process(fproc.pid)]},
                }
                for name, t in targets.items():
                    say(f"throughput: warming up {name}")
                    measured(t, args.connections, 2, lua, replicas)
                rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in targets}
                writes_before = mirror.writes
                for r in range(args.rounds):
                    order = list(targets) if r % 2 == 0 else list(reversed(targets))
                    for name in order:
                        say(f"throughput round {r + 1}/{args.rounds}: {name}, "
                            f"{args.connections} connections, {args.duration:.0f} s")
                        rounds[name].append(measured(targets[name], args.connections,
                                                     args.duration, lua, replicas))
                after = read_state(stack)
                same = sorted(x.handle or "" for x in after.members()) == \
                    sorted(x.handle or "" for x in state.members())
                return {"rounds": rounds, "writes": mirror.writes - writes_before,
                        "same_replicas": same}
        finally:
            mirror.close()


# -- 2. convergence -----------------------------------------------------------------------
class Poller:
    """One kept-alive connection per worker of each balancer, polled for ``/_lb/readyz``;
    every answer's (receipt time, registry version) kept per (balancer, worker)."""

    REQUEST = b"GET /_lb/readyz HTTP/1.1\r\nHost: bench\r\n\r\n"
    VERSION = re.compile(rb'"registry_version":\s*(\d+)')

    def __init__(self, stack: HaStack) -> None:
        self.conns: list[tuple[int, int, socket.socket]] = []  # (balancer, worker pid, socket)
        for b, (proc, port) in enumerate(zip(stack.balancers, stack.ports)):
            assert proc is not None
            workers = {c.pid for c in psutil.Process(proc.pid).children()}
            self._connect(b, port, workers)
        self.samples: dict[tuple[int, int], list[tuple[float, int]]] = {
            (b, w): [] for b, w, _ in self.conns}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cycles = 0

    def _connect(self, b: int, port: int, workers: set[int]) -> None:
        """Connections until each worker holds one (the kernel picks who accepts)."""
        spare: list[socket.socket] = []
        held: dict[int, socket.socket] = {}
        for _ in range(64):
            if len(held) == len(workers):
                break
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            self._ask(s)  # answered: accepted and owned by a worker now
            local = s.getsockname()[1]
            owner = next((w for w in workers - set(held) if any(
                c.raddr and c.raddr.port == local and c.laddr.port == port
                for c in psutil.Process(w).net_connections("tcp"))), None)
            if owner is None:
                spare.append(s)
            else:
                held[owner] = s
        for s in spare:
            s.close()
        if len(held) != len(workers):
            raise RuntimeError(f"balancer :{port}: no connection reached {len(workers)} workers")
        self.conns += [(b, w, s) for w, s in held.items()]

    def _read_answer(self, s: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            body += chunk
        return body

    def _ask(self, s: socket.socket) -> int:
        s.sendall(self.REQUEST)
        match = self.VERSION.search(self._read_answer(s))
        return int(match.group(1)) if match else -1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for _b, _w, s in self.conns:
                s.sendall(self.REQUEST)
            for b, w, s in self.conns:
                match = self.VERSION.search(self._read_answer(s))
                self.samples[(b, w)].append((time.monotonic(), int(match.group(1))
                                             if match else -1))
            self.cycles += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for _b, _w, s in self.conns:
            s.close()

    def first_at_least(self, key: tuple[int, int], version: int) -> float | None:
        return next((t for t, v in self.samples[key] if v >= version), None)

    def last_below(self, key: tuple[int, int], version: int) -> float | None:
        """The last answer before the first >= ``version``: the change came after it."""
        before = None
        for t, v in self.samples[key]:
            if v >= version:
                return before
            before = t
        return before


def admin_call(url: str, path: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    method = "POST" if path == "/add" else "DELETE"
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def change_version(stack: HaStack, since: int, name: str, added: bool,
                   timeout: float = 10) -> int:
    """The first registry version after etcd revision ``since`` in which ``name`` is routable
    (``added``) or is not."""
    registry = stack.registry()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for value in registry.etcd.watch(registry.state_key, since + 1, 1.0):
            if value.data is None:
                continue
            state = registry.parse(value.data)
            routable = name in {r.hostname for r in state.routable()}
            if routable == added:
                return state.version
    raise RuntimeError(f"no version found where {name} is {'in' if added else 'out'}")


def convergence(stack: HaStack, changes: int) -> dict[str, Any]:
    rows = []
    for k in range(changes):
        via = (k // 2) % len(stack.urls)
        added = k % 2 == 0
        if added:
            name = f"cv{uuid.uuid4().hex[:8]}"
        poller = Poller(stack)
        since = stack.registry().get().revision
        poller.start()
        time.sleep(0.05)
        sent = time.monotonic()
        try:
            admin_call(stack.urls[via], "/add" if added else "/rm",
                       {"n": 1, "hostnames": [name]})
            replied = time.monotonic()
            version = change_version(stack, since, name, added)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                    poller.first_at_least(key, version) is None for key in poller.samples):
                time.sleep(0.01)
        finally:
            poller.stop()
        per_balancer: dict[int, float | None] = {}
        gaps = []  # how long each worker's new answer came after its last old one
        for b in range(len(stack.urls)):
            keys = [key for key in poller.samples if key[0] == b]
            seen = [poller.first_at_least(key, version) for key in keys]
            per_balancer[b] = None if None in seen else max(t for t in seen if t is not None) \
                - replied
            for key, first in zip(keys, seen):
                last = poller.last_below(key, version)
                if first is not None and last is not None:
                    gaps.append(first - last)
        cycle = (time.monotonic() - sent) / max(1, poller.cycles)
        rows.append({"change": "/add" if added else "/rm", "via": via, "version": version,
                     "call_s": replied - sent, "balancers": per_balancer,
                     "workers": len(poller.samples), "poll_cycle_ms": 1000 * cycle,
                     "gap_ms": 1000 * max(gaps, default=0.0)})
        say(f"convergence {k + 1}/{changes}: {rows[-1]['change']} {name} via balancer "
            f"{via + 1} ({rows[-1]['call_s']:.2f} s): " + ", ".join(
                f"b{b + 1} {'-' if v is None else f'{1000 * v:+.1f} ms'}"
                for b, v in per_balancer.items()))
        if added:
            wait_all_ready(stack, stack.settings.n + 1)
        else:
            wait_all_ready(stack, stack.settings.n)
    return {"rows": rows}


# -- 3. takeover ---------------------------------------------------------------------------
def kill_replica(state: State) -> tuple[int, str]:
    """SIGKILL one ready replica's process group; its server id and old handle."""
    victim = random.choice([r for r in state.members() if r.state == READY and r.handle])
    assert victim.handle is not None
    pid = int(victim.handle.partition("/")[0])
    os.killpg(pid, signal.SIGKILL)
    return victim.server_id, victim.handle


def takeover(stack: HaStack, how: str, reps: int, logs: str) -> list[dict[str, Any]]:
    rows = []
    for k in range(reps):
        wait_all_ready(stack, stack.settings.n)
        index, old = leader_index(stack)
        proc = stack.supervisors[index]
        assert proc is not None
        state = read_state(stack)
        sig = signal.SIGKILL if how == "SIGKILL" else signal.SIGSTOP
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        server_id, old_handle = kill_replica(state)
        registry = stack.registry()
        led = replaced = None
        while time.monotonic() - t0 < 60 and (led is None or replaced is None):
            now = time.monotonic()
            try:
                if led is None:
                    who = registry.leader()
                    if who is not None and who != old:
                        led = now - t0
                if replaced is None:
                    entry = next((r for r in registry.read().replicas
                                  if r.server_id == server_id), None)
                    if entry and entry.state == READY and entry.handle != old_handle \
                            and entry.lease is None:
                        replaced = now - t0
            except RegistryError:
                pass
            time.sleep(0.02)
        row: dict[str, Any] = {"how": how, "leader_s": led, "replaced_s": replaced}
        if how == "SIGKILL":
            proc.wait()
        else:
            row.update(fencing_check(stack, index, logs))
            proc.send_signal(signal.SIGKILL)  # replaced below, as after a SIGKILL
            proc.wait()
        row["standby_start_s"] = restart_supervisor(stack, index, logs)  # the new standby
        rows.append(row)
        say(f"takeover {how} {k + 1}/{reps}: standby leads after "
            f"{_s(led)}, replica replaced after {_s(replaced)}"
            + (f"; old leader after SIGCONT: {row['acted']}" if "acted" in row else ""))
    wait_all_ready(stack, stack.settings.n)
    return rows


ACTS = re.compile(r"started replica|stopping|stopped|replacing|restor|leading the supervisors",
                  re.IGNORECASE)


def fencing_check(stack: HaStack, index: int, logs: str, watch: float = 5.0) -> dict[str, Any]:
    """SIGCONT the paused old leader; for ``watch`` seconds, what it says it does, and whether
    every replica process of the deployment belongs to a registry entry."""
    path = os.path.join(logs, f"supervisor-{index + 1}.log")
    offset = os.path.getsize(path)
    proc = stack.supervisors[index]
    assert proc is not None
    proc.send_signal(signal.SIGCONT)
    leader_before = stack.registry().leader()
    time.sleep(watch)
    with open(path, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        lines = fh.read().splitlines()
    acts = [line for line in lines if ACTS.search(line)]
    from lb.backends import create_backend
    running_handles = {i.handle for i in create_backend(stack.settings).list()}
    known = {r.handle for r in read_state(stack).replicas if r.handle}
    return {"acted": "no" if not acts else f"{len(acts)} log lines: {acts[0][:120]}",
            "stood_by": any("standing by" in line for line in lines),
            "orphans": len(running_handles - known),
            "leader_kept": stack.registry().leader() == leader_before}


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


# -- 4. faults under load ---------------------------------------------------------------------
def paced_load(urls: list[str], rate: float, seconds: float, lua: str,
               connections: int) -> list[subprocess.Popen[str]]:
    """One wrk per URL at ``rate`` requests per second, from now, for ``seconds``."""
    env = {**os.environ, "WRK_RATE": f"{rate:.3f}"}
    return [subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "5s", "-s", lua,
         url], env={**env, "WRK_SEED": str(k)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for k, url in enumerate(urls)]


def collect(procs: list[subprocess.Popen[str]], seconds: float) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=seconds + 60)
        line = next((x for x in text.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            out.append({"requests": 0, "errors": -1, "non2xx": -1, "raw": text[-300:]})
        else:
            out.append(json.loads(line[8:]))
    return out


def faults(stack: HaStack, args: argparse.Namespace, lua: str,
           logs: str) -> list[dict[str, Any]]:
    cluster = stack.cluster
    n = stack.settings.n
    at = 2.0  # seconds into the window the fault comes
    rows = []

    def follower() -> list[int]:
        leader = cluster.leader()
        return [next(i for i in range(cluster.size) if i != leader)]

    def raft_leader() -> list[int]:
        leader = cluster.leader()
        if leader is None:
            raise RuntimeError("etcd has no leader")
        return [leader]

    plans = ["none", "etcd follower killed", "etcd raft leader killed",
             "quorum lost (2 of 3 killed), restored after {q:.0f} s",
             "balancer 1 SIGKILLed", "leading supervisor SIGKILLed"]
    for plan in plans:
        wait_all_ready(stack, n)
        label = plan.format(q=args.quorum_seconds)
        say(f"fault window ({args.window:.0f} s at {args.rate:.0f} req/s per balancer): {label}")
        load = paced_load(stack.urls, args.rate, args.window, lua, args.fault_connections)
        leaders = LeaderWatch(stack)
        time.sleep(at)
        note = ""
        killed: list[int] = []
        t_fault = time.monotonic()
        if plan.startswith("etcd follower"):
            killed = follower()
        elif plan.startswith("etcd raft"):
            killed = raft_leader()
        elif plan.startswith("quorum"):
            leader = cluster.leader()
            killed = [i for i in range(cluster.size) if i != leader][:1] + \
                ([leader] if leader is not None else [1])
        for i in killed:
            cluster.kill(i)
        if killed:
            note = f"members {', '.join(f'e{i}' for i in killed)} killed"
        if plan.startswith("quorum"):
            time.sleep(args.quorum_seconds)
            for i in killed:
                cluster.restart(i)
            t_back = time.monotonic()
            try:
                cluster.wait_writable(30)
                note += (f"; restarted after {args.quorum_seconds:.0f} s, writable again "
                         f"{time.monotonic() - t_back:.2f} s after the restart")
            except EtcdUnreachable:
                note += "; not writable 30 s after the restart"
            killed = []
        if plan.startswith("balancer"):
            proc = stack.balancers[0]
            assert proc is not None
            proc.kill()
            proc.wait()
            note = f"balancer :{stack.ports[0]} (pid {proc.pid}) SIGKILLed"
        if plan.startswith("leading supervisor"):
            index, who = leader_index(stack)
            proc = stack.supervisors[index]
            assert proc is not None
            proc.kill()
            proc.wait()
            new = None
            while time.monotonic() - t_fault < 30:
                new = stack.registry().leader()
                if new is not None and new != who:
                    break
                time.sleep(0.05)
            note = (f"supervisor {who} SIGKILLed; the standby led after "
                    f"{time.monotonic() - t_fault:.2f} s")
        results = collect(load, args.window)
        led = leaders.close()
        # Back to whole before the next window.
        for i in killed:
            cluster.restart(i)
        if killed:
            cluster.wait_writable(30)
        if plan.startswith("balancer"):
            stack.start_balancer(0)
            wait_http(stack.urls[0] + "/_lb/readyz", 60)
        if plan.startswith("leading supervisor"):
            restart_supervisor(stack, index, logs)
        rows.append({"fault": label, "note": note, "per_balancer": results, **led})
        say(f"  {note or 'no fault'}: " + "; ".join(
            f"b{b + 1} {r['requests']} requests, {r['non2xx']} non-2xx, {r['errors']} errors"
            for b, r in enumerate(results)))
    return rows


# -- the report ----------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    a = meta["args"]
    lines = [
        "# Benchmark: the highly available stack (registry in etcd)",
        "",
        (f"{meta['when']}; {meta['machine']}; load average before {meta['load_before']}, after "
         f"{meta['load_after']}; run time {meta['seconds']:.0f} s{' (--quick)' if a['quick'] else ''}. "
         "Everything on one machine on loopback: 3 etcd members (Debian's etcd-server "
         f"{meta['etcd']}), supervisors, balancers, local replicas and the load generators share "
         "its cores with whatever else runs on it."),
        f"Command: `{meta['command']}`.",
        "",
    ]
    t = data.get("throughput")
    if t:
        lines += [
            (f"## 1. Throughput through one balancer: etcd store vs file store "
             f"(wrk, {a['connections']} keep-alive connections, {a['duration']:.0f} s per run, "
             f"{a['rounds']} interleaved rounds)"),
            "",
            ("Same settings (" + ", ".join(f"LB_{k.upper()}={v}" for k, v in
                                           BENCH_SETTINGS.items()) +
             "), same 3 replicas: the file balancer's registry is a mirror of the etcd state, "
             f"rewritten through the file store on each change ({t['writes']} writes during "
             "the rounds, the supervisor's heartbeat records). Replicas unchanged through the "
             f"rounds: {'yes' if t['same_replicas'] else 'NO'}. Each round runs both "
             "back to back, the order alternating; under outside load the ratio within a "
             "round says more than either figure."),
            "",
            ("| store | requests/s (median) | p50 | p99 | balancer CPU per request | errors + "
             "non-2xx | each round (req/s) |"),
            "|---|---|---|---|---|---|---|",
        ]
        med = {}
        for name, rows in t["rounds"].items():
            med[name] = statistics.median(r["rps"] for r in rows)
            lines.append(
                f"| {name} | {med[name]:.0f} | "
                f"{statistics.median(r['p50_ms'] for r in rows):.2f} ms | "
                f"{statistics.median(r['p99_ms'] for r in rows):.2f} ms | "
                f"{statistics.median(r['proxy_cpu_us'] for r in rows):.0f} µs | "
                f"{sum(r['errors'] + r['non2xx'] for r in rows)} | "
                f"{', '.join(str(round(r['rps'])) for r in rows)} |")
        if {"etcd", "file"} <= set(med):
            spread = [abs(x["rps"] - y["rps"]) / max(1.0, y["rps"]) for x, y in
                      zip(t["rounds"]["file"], t["rounds"]["file"][1:])]
            ratios = [x["rps"] / max(1.0, y["rps"]) for x, y in
                      zip(t["rounds"]["etcd"], t["rounds"]["file"])]
            lines += ["", (f"etcd / file, each round (its two runs back to back): "
                           f"{', '.join(f'{r:.2f}' for r in ratios)}; median "
                           f"{statistics.median(ratios):.3f}, middle half "
                           f"{pct(ratios, 0.25):.2f}-{pct(ratios, 0.75):.2f} (ratio of the medians "
                           f"{med['etcd'] / med['file']:.3f}). Largest change of the file "
                           "store alone from one round to the next: "
                           f"{'-' if not spread else f'{100 * max(spread):.1f} %'}.")]
    c = data.get("convergence")
    if c:
        rows = c["rows"]
        other = [1000 * v for r in rows for b, v in r["balancers"].items()
                 if int(b) != r["via"] and v is not None]
        took = [1000 * v for r in rows for b, v in r["balancers"].items()
                if int(b) == r["via"] and v is not None]
        missing = sum(1 for r in rows for v in r["balancers"].values() if v is None)
        calls = {ch: [r["call_s"] for r in rows if r["change"] == ch] for ch in ("/add", "/rm")}
        cycle = statistics.median(r["poll_cycle_ms"] for r in rows)
        gap = statistics.median(r["gap_ms"] for r in rows)
        lines += [
            "",
            (f"## 2. Convergence of a change across 3 balancers ({len(rows)} changes, /add and "
             "/rm of one named replica in turn, through balancer 1, 2, 3 in turn)"),
            "",
            ("Convergence of a balancer = when the *last* of its workers first answered "
             "`/_lb/readyz` with a `registry_version` >= the change's version (the first "
             "version in etcd's history in which the added replica is routable, or the removed "
             "one no longer is), minus when the /add or /rm reply reached the client. One "
             "kept-alive connection per worker (each mapped to its worker pid), polled every "
             f"{cycle:.1f} ms (median poll cycle; the widest gap between a worker's last "
             f"old answer and its first new one: median {gap:.1f} ms over changes, at most "
             f"{max(r['gap_ms'] for r in rows):.1f} ms, a machine busy elsewhere stalls the "
             "poller too): an upper bound by that much. Negative: applied before the client "
             f"had the reply. {rows[0]['workers']} workers polled in all; p99 is "
             "nearest-rank (with a few dozen samples, the largest or next to it)."),
            "",
            "| balancers | samples | p50 | p99 | min | max |",
            "|---|---|---|---|---|---|",
        ]
        for label, vals in (("the two others (not the one called)", other),
                            ("the one that took the call", took)):
            if vals:
                lines.append(f"| {label} | {len(vals)} | {pct(vals, 0.5):+.1f} ms | "
                             f"{pct(vals, 0.99):+.1f} ms | {min(vals):+.1f} ms | "
                             f"{max(vals):+.1f} ms |")
        lines += ["", "| change | calls | call p50 | call max |", "|---|---|---|---|"]
        for ch, vals in calls.items():
            if vals:
                lines.append(f"| {ch} | {len(vals)} | {statistics.median(vals):.2f} s | "
                             f"{max(vals):.2f} s |")
        if missing:
            lines += ["", f"Not converged within 10 s: {missing} (balancer, change) pairs."]
        lines += ["", "Each change (ms, balancers 1, 2, 3; * = the one called): " + "; ".join(
            f"{r['change']} " + " ".join(
                ("*" if int(b) == r["via"] else "") + ("-" if v is None else f"{1000 * v:+.0f}")
                for b, v in r["balancers"].items()) for r in rows) + "."]
    tk = data.get("takeover")
    if tk:
        lines += [
            "",
            ("## 3. Supervisor takeover (2 supervisors, LB_LEADER_TTL="
             f"{meta['ha_settings']['LB_LEADER_TTL']} s, LB_HEARTBEAT_INTERVAL="
             f"{meta['ha_settings']['LB_HEARTBEAT_INTERVAL']} s)"),
            "",
            ("The leading supervisor (the leader key's host:pid) gets the signal, and a ready "
             "replica's process group SIGKILL right after. *Standby leads*: until the leader key "
             "names the other supervisor. *Replica replaced*: until the dead replica's server id "
             "is READY again with a new process (a new hostname, the same slots). Both from the "
             "signal, polled every 20 ms. After SIGSTOP, once the standby leads and the replica "
             "is replaced, the old leader gets SIGCONT and is watched for 5 s: what its log says "
             "it did, and replica processes no registry entry knows (orphans)."),
            "",
            ("| signal | run | standby leads | replica replaced | old leader after SIGCONT: "
             "acted? | said standing by | orphans | leader key kept |"),
            "|---|---|---|---|---|---|---|---|",
        ]
        for how in ("SIGKILL", "SIGSTOP"):
            rows = [r for r in tk if r["how"] == how]
            for i, r in enumerate(rows, 1):
                extra = ("| - | - | - | - |" if how == "SIGKILL" else
                         f"| {r['acted']} | {'yes' if r['stood_by'] else 'no'} | {r['orphans']} "
                         f"| {'yes' if r['leader_kept'] else 'NO'} |")
                lines.append(f"| {how} | {i} | {_s(r['leader_s'])} | {_s(r['replaced_s'])} "
                             + extra)
            led = [r["leader_s"] for r in rows if r["leader_s"] is not None]
            rep = [r["replaced_s"] for r in rows if r["replaced_s"] is not None]
            if rows:
                lines.append(f"| {how} | **median** | "
                             f"**{_s(statistics.median(led) if led else None)}** | "
                             f"**{_s(statistics.median(rep) if rep else None)}** | | | | |")
    f = data.get("faults")
    if f:
        lines += [
            "",
            (f"## 4. Failed requests through each fault (wrk at {a['rate']:.0f} req/s through "
             f"each of the 3 balancers at once, {a['fault_connections']} connections each, "
             f"{a['window']:.0f} s windows, the fault 2 s in)"),
            "",
            ("Per balancer: requests answered / non-2xx answers / connection errors (wrk: "
             "connect, read, write, timeout 5 s). Whatever was killed is restarted after its "
             "window, and the stack is READY again before the next. The killed balancer's own "
             "clients count each refused reconnect as an error (wrk retries at once), so that "
             "one cell counts attempts, not requests; the others' cells are the figure asked "
             "for."),
            "",
            ("The leader key was read every 0.1 s through each window: how many times it "
             "changed hands, how many new terms began (a new create revision: a leader that "
             "stepped down and won again counts), how long it named nobody, and how long it "
             "could not be read."),
            "",
            ("| fault | balancer 1 | balancer 2 | balancer 3 | supervisor leader: changes / "
             "new terms / none / unreadable | what happened |"),
            "|---|---|---|---|---|---|",
        ]
        for row in f:
            cells = [f"{r['requests']} / {r['non2xx']} / {r['errors']}"
                     for r in row["per_balancer"]]
            lines.append(f"| {row['fault']} | {' | '.join(cells)} | {row['leader_changes']} / "
                         f"{row['new_terms']} / {row['no_leader_s']:.1f} s / "
                         f"{row['unreadable_s']:.1f} s | "
                         f"{row['note'] or '-'} |")
    lines += ["", "Settings of stack B (sections 2-4): " + ", ".join(
        f"{k}={v}" for k, v in meta["ha_settings"].items()) + "."]
    return "\n".join(lines) + "\n"


def _etcd_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                              timeout=10, check=False).stdout
        match = re.search(r"etcd Version:\s*(\S+)", text)
        if match:
            return match.group(1)
    return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (< ~3 min)")
    parser.add_argument("--parts", default="throughput,convergence,takeover,faults")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (5; quick 4)")
    parser.add_argument("--rounds", type=int, help="throughput rounds (12; quick 2)")
    parser.add_argument("--connections", type=int, default=24, help="saturation (24)")
    parser.add_argument("--changes", type=int, help="convergence changes (20; quick 6)")
    parser.add_argument("--takeovers", type=int, help="repetitions of each signal (5; quick 1)")
    parser.add_argument("--window", type=float, help="seconds of load per fault (20; quick 8)")
    parser.add_argument("--quorum-seconds", type=float, help="quorum lost this long (8; quick 3)")
    parser.add_argument("--rate", type=float, default=100, help="req/s per balancer (100)")
    parser.add_argument("--fault-connections", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(HERE, "results-ha.md"))
    parser.add_argument("--json", default=os.path.join(HERE, "results-ha.json"))
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, short in (("duration", 5.0, 4.0), ("rounds", 12, 2), ("changes", 20, 6),
                              ("takeovers", 5, 1), ("window", 20.0, 8.0),
                              ("quorum_seconds", 8.0, 3.0)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    for tool in ("wrk", "etcd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench-ha: {tool} is missing (wrk: bash bench/run.sh installs it; etcd: "
                     "apt-get install etcd-server)")
    parts = set(args.parts.split(","))
    # Every process started here imports this tree's lb, whatever the venv has installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    began = time.monotonic()
    work = tempfile.mkdtemp(prefix="lb-bench-ha-")
    lua = os.path.join(work, "ids.lua")
    with open(lua, "w", encoding="utf-8") as fh:
        fh.write(WRK_LUA)
    ha = Settings.from_env({}, **HA_SETTINGS)
    data: dict[str, Any] = {"meta": {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "etcd": _etcd_version(),
        "command": " ".join(["python bench/ha.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "ha_settings": {f"LB_{k.upper()}": getattr(ha, k) for k in
                        ("hash_key", "strategy", "workers", "worker", "heartbeat_interval",
                         "heartbeat_timeout", "heartbeat_failures", "leader_ttl", "n")},
    }}
    say(f"logs under {work}")
    try:
        if "throughput" in parts:
            data["throughput"] = throughput(args, lua, os.path.join(work, "a"))
        if parts & {"convergence", "takeover", "faults"}:
            stack = make_stack("ha", HA_SETTINGS, balancers=3, supervisors=2,
                               logs=os.path.join(work, "b"))
            with running(stack, args.keep_logs):
                wait_leader(stack)
                if "convergence" in parts:
                    data["convergence"] = convergence(stack, args.changes)
                if "takeover" in parts:
                    data["takeover"] = (takeover(stack, "SIGKILL", args.takeovers,
                                                 os.path.join(work, "b"))
                                        + takeover(stack, "SIGSTOP", args.takeovers,
                                                   os.path.join(work, "b")))
                if "faults" in parts:
                    data["faults"] = faults(stack, args, lua, os.path.join(work, "b"))
    finally:
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    data["meta"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    data["meta"]["seconds"] = time.monotonic() - began
    report = render(data)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)
    print(report)
    say(f"written: {args.out} ({data['meta']['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
