"""High availability end to end: real etcd members, balancers (gunicorn), supervisors and local
replicas (``lb.ha.HaStack``), killed and paused one at a time under load.

One stack serves the module (``ha``); each test starts by healing it (3 etcd members, 2
supervisors, 3 balancers, every replica ready with one process) and leaves it so. The maglev
agreement check runs on a stack of its own. Figures are printed (``pytest -s``) and recorded as
properties (``--junitxml``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
import pytest
import requests

from lb.backends.local import ENV_DEPLOYMENT, ENV_HOSTNAME, ENV_TOKEN
from lb.etcd import EtcdRegistry
from lb.ha import HaStack, free_port_run
from lb.registry import READY, REMOVING, RegistryError, Replica, State
from lb.routing import request_key
from lb.settings import Settings
from tests.conftest import unavailable
from tests.helpers_chaos import Load, processes_match_registry, wait_for
from tests.helpers_echo import processes_of

pytestmark = pytest.mark.system

HASH_KEY = "query:key"  # ?key=... picks the replica: the same key, the same replica
Check = Callable[[], "str | None"]


# -- ports, processes --------------------------------------------------------------------------
def stack_processes(deployment: str) -> list[psutil.Process]:
    """Every live process of the deployment: replicas (marked), balancers and supervisors (its
    settings in their environment), etcd members (its name in their data folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"], ad_value=None):
        if proc.pid == os.getpid():
            continue
        env = proc.info["environ"] or {}
        cmd = " ".join(proc.info["cmdline"] or [])
        if deployment in (env.get(ENV_DEPLOYMENT), env.get("LB_DEPLOYMENT")) or deployment in cmd:
            with suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
    return found


def sigkill_all(procs: list[psutil.Process], timeout: float = 5) -> None:
    """SIGKILL, then wait until each is gone or a zombie (whose parent may be paused: it
    stays one until that parent runs again)."""
    for p in procs:
        with suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in procs:
            with suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive:
            return
        time.sleep(0.02)


def kill_replica(handle: str) -> None:
    """SIGKILL every process of a local replica (master and worker)."""
    procs = processes_of(handle)
    assert procs, f"replica {handle} has no process to kill"
    sigkill_all(procs)


def replica_groups(deployment: str) -> dict[str, set[str]]:
    """Live replica processes by hostname: the instance tokens each name runs under."""
    groups: dict[str, set[str]] = {}
    for proc in psutil.process_iter(["environ"], ad_value=None):
        env = proc.info["environ"] or {}
        if env.get(ENV_DEPLOYMENT) != deployment:
            continue
        with suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                groups.setdefault(env.get(ENV_HOSTNAME, "?"), set()).add(env.get(ENV_TOKEN, "?"))
    return groups


# -- the stack ---------------------------------------------------------------------------------
@contextmanager
def ha_stack(folder: Path, **overrides: Any) -> Iterator[HaStack]:
    """A running HaStack of 3 etcd members, 2 supervisors and 3 balancers (one worker each)
    over N=3 local replicas; everything of it gone at the end, checked."""
    if shutil.which("etcd") is None:
        unavailable("etcd is not installed (Debian: apt-get install etcd-server)")
    deployment = f"tha{uuid.uuid4().hex[:10]}"
    etcd_port = free_port_run(13)  # clients from etcd_port, peers from etcd_port + 10
    port = etcd_port + 13
    values: dict[str, Any] = {
        "deployment": deployment, "port": port, "n": 3, "workers": 1, "leader_ttl": 2,
        "hash_key": HASH_KEY, "hash": "xxhash",  # keys spread over the replicas
        "backend": "local", "log_level": "info",  # the failover test reads the INFO lines
        # Who answers is what these tests read: a hedged GET may be answered by the next
        # replica (docs/robustness.md), which they would take for balancers that disagree.
        "hedge_share": 0,
    }
    values.update(overrides)
    for p in range(port, port + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free too (else the test errs at once, clearly)
    ha = HaStack(Settings.from_env(**values), balancers=3, supervisors=2, etcd_port=etcd_port,
                 logs=str(folder))
    try:
        ha.start()
        assert ha.wait_ready(), f"replicas not ready: see the logs in {folder}"
        wait_for(listening(ha), 60)
        yield ha
    finally:
        ha.stop()
        shutil.rmtree(os.path.dirname(ha.settings.registry_path), ignore_errors=True)
        left: list[psutil.Process] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            left = stack_processes(deployment)
            if not left:
                break
            time.sleep(0.2)
        sigkill_all(left)
        assert not left, f"processes of {deployment} outlived the stack: {left}"


def registry_of(ha: HaStack, deadline: float = 3.0) -> EtcdRegistry:
    """The stack's registry, read with a short deadline (etcd may be down)."""
    assert ha.settings.etcd is not None
    return EtcdRegistry(ha.settings.etcd, lock_timeout=deadline)


def listening(ha: HaStack) -> Check:
    def check() -> str | None:
        for url in ha.urls:
            try:
                reply = requests.get(url + "/rep", timeout=5)
            except requests.RequestException as exc:
                return f"{url}: {type(exc).__name__}"
            if reply.status_code != 200:
                return f"{url}: {reply.status_code} {reply.text[:200]}"
        return None
    return check


def settled(ha: HaStack, n: int | None = None) -> Check:
    """Every entry a ready member, one process each and no other process (and ``n`` of them)."""
    registry = registry_of(ha)

    def check() -> str | None:
        try:
            state = registry.read()
        except RegistryError as exc:
            return str(exc)
        members = state.members()
        odd = [(r.hostname, str(r.state)) for r in state.replicas if r.state != READY]
        if odd:
            return f"not ready: {odd}"
        if n is not None and len(members) != n:
            return f"{len(members)} members, not {n}"
        return processes_match_registry(state, ha.settings.deployment)
    return check


def heal(ha: HaStack, timeout: float = 90) -> State:
    """Whatever an earlier test left dead or paused, running again; then settled. (On this,
    the main thread: an etcd member dies with the thread that started it.)"""
    for i, member in enumerate(ha.cluster.members):
        if member is None or member.poll() is not None:
            ha.cluster.restart(i)
        else:
            ha.cluster.signal(i, signal.SIGCONT)
    ha.cluster.wait_writable(60)
    for i, proc in enumerate(ha.supervisors):
        if proc is None or proc.poll() is not None:
            ha.start_supervisor(i)
        else:
            proc.send_signal(signal.SIGCONT)
    for i, proc in enumerate(ha.balancers):
        if proc is None or proc.poll() is not None:
            ha.start_balancer(i)
    wait_for(listening(ha), 60)
    wait_for(settled(ha), timeout, interval=0.2)
    return registry_of(ha).read()


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaStack]:
    with ha_stack(tmp_path_factory.mktemp("ha")) as stack:
        yield stack


def note(record: Callable[[str, object], None], name: str, **figures: Any) -> None:
    """Print the figures (``-s``) and record them as the test's properties."""
    shown = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in figures.items())
    print(f"\n[ha] {name}: {shown}", flush=True)
    for k, v in figures.items():
        record(k, v)


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


# -- routing as a client sees it, and as the registry says -------------------------------------
def key_of(key: str) -> int:
    return request_key(HASH_KEY, lambda _name: None, lambda _name: key, None)


def owners(state: State, strategy: str, keys: list[str]) -> dict[str, str]:
    """The replica each key goes to, as a balancer on ``state`` routes it."""
    routable = state.routable()
    lookup = state.lookup(strategy, routable)
    names = {r.server_id: r.hostname for r in routable}
    return {k: names.get(lookup.lookup(key_of(k)) or 0, "?") for k in keys}


def served_by(session: requests.Session, url: str, key: str) -> str:
    reply = session.get(f"{url}/home", params={"key": key}, timeout=15)
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}"
    return reply.headers.get("X-Served-By", "?")


def route_all(urls: list[str], keys: list[str], threads: int = 8) -> dict[str, list[str]]:
    """Each key through each balancer: key -> the replicas that served it, in ``urls``' order."""
    local = threading.local()
    sessions: list[requests.Session] = []

    def one(item: tuple[str, str]) -> str:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.trust_env = False
            sessions.append(session)
        try:
            return served_by(session, *item)
        except requests.RequestException as exc:
            return type(exc).__name__

    items = [(url, key) for key in keys for url in urls]
    try:
        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(one, items))
    finally:
        for session in sessions:
            session.close()
    return {key: answers[i * len(urls):(i + 1) * len(urls)] for i, key in enumerate(keys)}


def routing_agrees(ha: HaStack, keys: list[str]) -> Check:
    """Every balancer routes every key to the replica the registry's state says."""
    registry = registry_of(ha)

    def check() -> str | None:
        try:
            expected = owners(registry.read(), ha.settings.strategy, keys)
        except RegistryError as exc:
            return str(exc)
        wrong = {k: (expected[k], got) for k, got in route_all(ha.urls, keys).items()
                 if set(got) != {expected[k]}}
        return f"{len(wrong)} keys routed otherwise, e.g. {list(wrong.items())[:3]}" if wrong \
            else None
    return check


def routable_ids(state: State) -> dict[int, str]:
    return {r.server_id: r.hostname for r in state.routable()}


def new_keys(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{tag}-{i}-{random.getrandbits(40):x}" for i in range(count)]


# -- admin calls -------------------------------------------------------------------------------
def admin(method: str, url: str, body: dict[str, Any], timeout: float = 90) -> tuple[int, Any]:
    """An admin call on a connection of its own; the status and the JSON body."""
    reply = requests.request(method, url, json=body, timeout=timeout,
                             headers={"Connection": "close"})
    try:
        return reply.status_code, reply.json()
    except ValueError:
        return reply.status_code, reply.text


def is_envelope(body: Any) -> bool:
    """The contract's error envelope ``{"message": "<Error> ...", "status": "failure"}``."""
    return (isinstance(body, dict) and set(body) == {"message", "status"}
            and body["status"] == "failure" and str(body["message"]).startswith("<Error> "))


def member_names(ha: HaStack) -> list[str]:
    return [r.hostname for r in registry_of(ha).read().members()]


# == agreement ===================================================================================
@pytest.fixture
def stack_for(ha: HaStack, tmp_path: Path) -> Iterator[Callable[[str], HaStack]]:
    """The module's stack for its strategy (ring), a stack of the test's own for another."""
    own: list[Any] = []

    def get(strategy: str) -> HaStack:
        if strategy == ha.settings.strategy:
            heal(ha)
            return ha
        manager = ha_stack(tmp_path, strategy=strategy)
        own.append(manager)
        return manager.__enter__()

    yield get
    for manager in own:
        manager.__exit__(None, None, None)


@pytest.mark.parametrize("strategy", ["ring", "maglev"])
def test_balancers_agree_on_every_key(stack_for: Callable[[str], HaStack], strategy: str,
                                      record_property: Callable[[str, object], None]) -> None:
    """Three balancers, 2,000 random sticky keys: each key goes to the same replica through
    every balancer, the one the shared registry says."""
    stack = stack_for(strategy)
    registry = registry_of(stack)
    keys = new_keys(2000)
    for _attempt in range(3):  # again if a replica's readiness changed during the sweep
        before = registry.read()
        began = time.monotonic()
        routes = route_all(stack.urls, keys)
        took = time.monotonic() - began
        after = registry.read()
        if routable_ids(before) == routable_ids(after):
            break
    expected = owners(after, strategy, keys)
    split = {k: got for k, got in routes.items() if len(set(got)) != 1}
    wrong = {k: (expected[k], got) for k, got in routes.items() if set(got) != {expected[k]}}
    spread = {name: sum(1 for k in keys if expected[k] == name) for name in set(expected.values())}
    note(record_property, f"agreement ({strategy})", keys=len(keys), balancers=len(stack.urls),
         disagreements=len(split), off_registry=len(wrong), spread=spread, seconds=took)
    assert not split, f"{len(split)} keys split between balancers: {list(split.items())[:5]}"
    assert not wrong, f"{len(wrong)} keys not where the registry says: {list(wrong.items())[:5]}"
    assert len(spread) == 3  # every replica has keys: the check covers them all


# == convergence =================================================================================
@dataclass
class Sampler:
    """A client asking one balancer, over and over, which replica serves each of ``keys``
    (which the test changes as it goes): (sent, answered, key, served by) for each request."""

    url: str
    keys: list[str] = field(default_factory=list)
    seen: list[tuple[float, float, str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        with requests.Session() as session:
            session.trust_env = False
            while not self._stop.is_set():
                keys = self.keys
                if not keys:
                    time.sleep(0.01)
                    continue
                key = keys[i % len(keys)]
                i += 1
                sent = time.monotonic()
                try:
                    who = served_by(session, self.url, key)
                except requests.RequestException as exc:
                    who = f"{type(exc).__name__}: {str(exc)[:100]}"
                if who.startswith("HTTP ") or ":" in who:
                    self.failures.append(who)
                self.seen.append((sent, time.monotonic(), key, who))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def switch(self, key: str, new: str, since: float,
               start: int = 0) -> tuple[float, float] | None:
        """When this balancer began sending ``key`` to ``new`` for good, as an interval
        (the last request that went elsewhere was sent, the first of the new ones answered);
        None while it has not (two answers from ``new`` in a row at least). Only requests
        from the ``start``-th and answered after ``since`` count."""
        seen = [(s, a, who) for s, a, k, who in self.seen[start:] if k == key and a >= since]
        last_other = max((i for i, (_, _, who) in enumerate(seen) if who != new), default=-1)
        after = seen[last_other + 1:]
        if len(after) < 2:
            return None
        lower = seen[last_other][0] if last_other >= 0 else since
        return lower, after[0][1]


def predicted(state: State, kind: str, name: str) -> State:
    """The state an /add of ``name`` (ready) or an /rm of it makes of ``state``, as lb.admin
    reserves it: the smallest free server id, its slots placed on the map as it is."""
    new = State.from_dict(state.to_dict())
    if kind == "add":
        server_id = next(new.free_server_ids())
        slots = new.hash_ring().add(server_id)
        new.replicas.append(Replica(name, server_id, list(slots), state=READY,
                                    address="http://predicted"))
    else:
        entry = new.find(name)
        assert entry is not None
        entry.state = REMOVING
    return new


def test_convergence_after_add_and_rm(ha: HaStack,
                                      record_property: Callable[[str, object], None]) -> None:
    """/add and /rm through balancer A, ten times: B and C list each change in /rep and route
    the keys it moves accordingly within 1 s of A's answer. Clients sample all three
    balancers all along; the window in which two of them disagree on a moved key is reported."""
    state = heal(ha)
    registry = registry_of(ha)
    strategy = ha.settings.strategy
    a, b, c = ha.urls
    keys = new_keys(3000)
    samplers = [Sampler(url).start() for url in ha.urls]
    tag = uuid.uuid4().hex[:4]
    added: list[str] = []
    plan = ["add", "add", "rm-first", "add", "rm", "add", "rm", "rm", "add", "rm"]
    rep_lag: list[float] = []
    converge: list[float] = []  # per change: the slower of B and C, from A's answer
    windows: list[float] = []  # per change and moved key: the disagreement window (upper bound)
    middles: list[float] = []  # the same, from the middle of each balancer's switch interval
    slowest = 0.0
    try:
        for step, kind in enumerate(plan):
            wait_for(settled(ha), 60, interval=0.2)  # the last removal finished: ids are stable
            state = registry.read()
            if kind == "add":
                name = f"cv{tag}-{step}"
            elif kind == "rm-first":  # a replica that was there from the start
                name = next(r.hostname for r in state.members() if r.hostname not in added)
                kind = "rm"
            else:
                name = added.pop(0)
            before = owners(state, strategy, keys)
            guess = owners(predicted(state, kind, name), strategy, keys)
            moving = [k for k in keys if before[k] != guess[k]][:3]
            for s in samplers:
                s.keys = moving + [k for k in keys[:1] if k not in moving]
            starts = [len(s.seen) for s in samplers]
            time.sleep(0.3)  # every balancer seen on the old routing first
            began = time.monotonic()
            if kind == "add":
                code, body = admin("POST", a + "/add", {"n": 1, "hostnames": [name]})
                added.append(name)
            else:
                code, body = admin("DELETE", a + "/rm", {"n": 1, "hostnames": [name]})
            answered = time.monotonic()
            assert code == 200, (kind, name, code, body)
            # B and C list it in /rep.
            for url in (b, c):
                def listed(url: str = url, name: str = name, kind: str = kind) -> str | None:
                    rep = requests.get(url + "/rep", timeout=5).json()["message"]
                    return None if (name in rep["replicas"]) == (kind == "add") else str(rep)
                wait_for(listed, 10, interval=0.01)
            rep_lag.append(time.monotonic() - answered)
            # They route the moved keys accordingly.
            after = owners(registry.read(), strategy, keys)
            moved = [k for k in moving if before[k] != after[k]]
            if not moved:  # the guess missed: measure from A's answer on keys that did move
                moved = [k for k in keys if before[k] != after[k]][:3]
                for s in samplers:
                    s.keys = moved
            assert moved, f"{kind} {name} moved none of {len(keys)} keys"
            deadline = time.monotonic() + 10
            switches: dict[str, list[tuple[float, float]]] = {}
            while time.monotonic() < deadline:
                found = {k: [s.switch(k, after[k], began - 0.3, i0)
                             for s, i0 in zip(samplers, starts)] for k in moved}
                if all(x is not None for seen in found.values() for x in seen):
                    switches = {k: [x for x in seen if x is not None] for k, seen in found.items()}
                    break
                time.sleep(0.02)
            assert switches, f"after {kind} {name}, not every balancer routes {moved} to " \
                             f"{[after[k] for k in moved]} within 10 s"
            # B's and C's (samplers 1 and 2): from A's answer to the first answer of the new
            # routing (0 when they had it before A answered).
            converge.append(max(max(0.0, seen[i][1] - answered)
                                for seen in switches.values() for i in (1, 2)))
            for seen in switches.values():
                windows.append(max(0.0, max(hi for _, hi in seen) - min(lo for lo, _ in seen)))
                mids = [(lo + hi) / 2 for lo, hi in seen]
                middles.append(max(mids) - min(mids))
            slowest = max(slowest, answered - began)
    finally:
        for s in samplers:
            s.stop()
    failed = [f for s in samplers for f in s.failures]
    note(record_property, "convergence", changes=len(plan), requests=sum(len(s.seen)
         for s in samplers), failed=len(failed), rep_lag_max=max(rep_lag),
         converge_p50=quantiles(converge)["p50"], converge_p99=quantiles(converge)["p99"],
         converge_max=quantiles(converge)["max"], window_p50=quantiles(windows)["p50"],
         window_p99=quantiles(windows)["p99"], window_max=quantiles(windows)["max"],
         window_mid_p50=quantiles(middles)["p50"], window_mid_max=quantiles(middles)["max"],
         slowest_call=slowest, converge_each=[round(x, 3) for x in converge])
    assert max(rep_lag) <= 1.0, rep_lag
    assert max(converge) <= 1.0, converge
    assert not failed, failed[:5]


# == concurrent admin ============================================================================
def test_concurrent_admin_through_every_balancer(
        ha: HaStack, record_property: Callable[[str, object], None]) -> None:
    """/add and /rm storms sent to the three balancers at once: no update lost (N is what the
    successful calls imply), no name twice (two calls want the same one: one gets it), and,
    once things settle, exactly one process for each registry entry and none besides."""
    start = len(heal(ha).members())
    a, b, c = ha.urls
    tag = uuid.uuid4().hex[:4]
    calls: list[tuple[str, str, str, dict[str, Any]]] = [
        (a, "POST", "/add", {"n": 1, "hostnames": [f"ca{tag}-a"]}),
        (b, "POST", "/add", {"n": 1, "hostnames": [f"ca{tag}-b"]}),
        (c, "POST", "/add", {"n": 2}),
        (a, "POST", "/add", {"n": 1, "hostnames": [f"ca{tag}-same"]}),
        (b, "POST", "/add", {"n": 1, "hostnames": [f"ca{tag}-same"]}),
        (c, "POST", "/add", {"n": 1}),
        (a, "DELETE", "/rm", {"n": 1}),
        (b, "DELETE", "/rm", {"n": 1}),
        (c, "DELETE", "/rm", {"n": 1}),
    ]
    random.shuffle(calls)
    began = time.monotonic()
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda call: admin(call[1], call[0] + call[2], call[3]), calls))
    took = time.monotonic() - began
    outcome = [(c[2], c[3], code, body) for c, (code, body) in zip(calls, results)]
    for path, _body, code, reply in outcome:
        if code == 200:
            assert isinstance(reply, dict) and reply["status"] == "successful", outcome
        else:
            # A name taken (409), an /rm finding only replicas still being added (409) or
            # a busy registry (503): in the envelope.
            assert code in (409, 503) and is_envelope(reply), outcome
    same = [code for path, body, code, _ in outcome if f"ca{tag}-same" in body.get("hostnames", [])]
    assert same.count(200) <= 1, outcome
    added = sum(body["n"] for path, body, code, _ in outcome if code == 200 and path == "/add")
    removed = sum(body["n"] for path, body, code, _ in outcome if code == 200 and path == "/rm")
    expected = start + added - removed
    settle_began = time.monotonic()
    wait_for(settled(ha, expected), 90, interval=0.2)
    settle = time.monotonic() - settle_began
    state = registry_of(ha).read()
    names = [r.hostname for r in state.replicas]
    ids = [r.server_id for r in state.replicas]
    slots = [s for r in state.replicas for s in r.slots]
    assert len(names) == len(set(names)) == expected, names
    assert len(ids) == len(set(ids)), ids
    assert len(slots) == len(set(slots)), "two replicas share a slot"
    for name in (f"ca{tag}-a", f"ca{tag}-b"):
        code = next(code for _p, body, code, _r in outcome if body.get("hostnames") == [name])
        assert (name in names) == (code == 200), (name, outcome)
    for url in ha.urls:
        rep = requests.get(url + "/rep", timeout=10).json()["message"]
        assert rep == state.rep(), (url, rep)
    groups = replica_groups(ha.settings.deployment)
    assert sorted(groups) == sorted(names) and all(len(t) == 1 for t in groups.values()), groups
    codes = sorted(code for *_, code, _r in outcome)
    note(record_property, "concurrent admin", calls=len(calls), codes=codes, start=start,
         added=added, removed=removed, final=expected, storm_seconds=took,
         settle_seconds=settle)


# == supervisor failover =========================================================================
def leader_pid(ha: HaStack, not_pid: int | None = None, timeout: float = 30) -> tuple[int, float]:
    """The pid of the leading supervisor (other than ``not_pid``), and when it was first seen."""
    registry = registry_of(ha)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with suppress(RegistryError):
            last = registry.leader()
            if last is not None:
                pid = int(last.rpartition(":")[2])
                if pid != not_pid:
                    return pid, time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"no new supervisor leads after {timeout}s (leader key: {last})")


def supervisor_index(ha: HaStack, pid: int) -> int:
    return next(i for i, p in enumerate(ha.supervisors) if p is not None and p.pid == pid)


def replaced(ha: HaStack, gone: str, n: int) -> Check:
    check_settled = settled(ha, n)

    def check() -> str | None:
        try:
            names = member_names(ha)
        except RegistryError as exc:
            return str(exc)
        return f"{gone} still listed: {names}" if gone in names else check_settled()
    return check


def acts(log: Path) -> list[str]:
    """The lines of a supervisor's log where it acted on a replica."""
    words = ("started replica", "adopting running replica", "stopping orphan",
             "finishing the removal", "is no longer wanted")
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if any(w in line for w in words)]


@dataclass
class DoubleWatch:
    """Watches the deployment's replica processes: a name running as two instances at once
    (a double start) is noted."""

    deployment: str
    doubles: list[dict[str, set[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            twice = {k: v for k, v in replica_groups(self.deployment).items() if len(v) > 1}
            if twice:
                self.doubles.append(twice)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def test_supervisor_failover_and_a_paused_leader(
        ha: HaStack, tmp_path_factory: pytest.TempPathFactory,
        record_property: Callable[[str, object], None]) -> None:
    """SIGKILL the leading supervisor, then a replica: the standby takes over and replaces it.
    SIGSTOP the new leader past its lease and SIGKILL a replica: the other leads and replaces
    it; SIGCONT the old leader: it acts no more (no double start, no replica lost)."""
    n = len(heal(ha).members())
    registry = registry_of(ha)
    logs = Path(ha.logs or "")
    with DoubleWatch(ha.settings.deployment) as watch:
        # 1. The leader is killed, then a replica.
        first, _ = leader_pid(ha)
        i = supervisor_index(ha, first)
        proc = ha.supervisors[i]
        assert proc is not None
        killed = time.monotonic()
        proc.kill()
        proc.wait()
        victim = registry.read().members()[0]
        assert victim.handle is not None
        kill_replica(victim.handle)
        second, seen = leader_pid(ha, not_pid=first)
        takeover = seen - killed
        wait_for(replaced(ha, victim.hostname, n), 60, interval=0.1)
        replace = time.monotonic() - killed
        restarted_log = logs / f"supervisor-{i + 1}.log"
        offset = restarted_log.stat().st_size
        ha.start_supervisor(i)  # two again, the restarted one standing by

        # 2. The new leader pauses past its lease; a replica dies meanwhile.
        j = supervisor_index(ha, second)
        paused = ha.supervisors[j]
        assert paused is not None

        def stands_by() -> str | None:
            with open(restarted_log, "rb") as fh:
                fh.seek(offset)
                said = fh.read().decode(errors="replace")
            return None if "standing by" in said else "the restarted supervisor does not stand by"
        wait_for(stands_by, 30)
        paused.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            third, seen = leader_pid(ha, not_pid=second)
            takeover2 = seen - stopped
            assert third == ha.supervisors[i].pid  # type: ignore[union-attr]
            victim2 = registry.read().members()[0]
            assert victim2.handle is not None
            t_kill = time.monotonic()
            kill_replica(victim2.handle)
            wait_for(replaced(ha, victim2.hostname, n), 60, interval=0.1)
            replace2 = time.monotonic() - t_kill
            before = acts(logs / f"supervisor-{j + 1}.log")
        finally:
            paused.send_signal(signal.SIGCONT)
        # 3. The old leader resumed: two lease terms later it has done nothing, and the
        # replica set is whole (every entry ready, one process each, none besides).
        time.sleep(2 * ha.settings.leader_ttl + 1)
        wait_for(settled(ha, n), 30, interval=0.2)
        assert paused.poll() is None, "the resumed supervisor exited"
        after = acts(logs / f"supervisor-{j + 1}.log")
        leads, _ = leader_pid(ha)
    assert after == before, f"the resumed old leader acted: {after[len(before):]}"
    assert leads == third, "the resumed old leader took the lead back"
    assert not watch.doubles, f"a replica ran twice: {watch.doubles[:3]}"
    note(record_property, "supervisor failover", takeover_after_sigkill=takeover,
         replaced_after_sigkill=replace, takeover_after_sigstop=takeover2,
         replaced_while_paused=replace2, leader_ttl=ha.settings.leader_ttl)


# == balancer loss ===============================================================================
def test_balancer_sigkill_fails_no_request_elsewhere(
        ha: HaStack, record_property: Callable[[str, object], None]) -> None:
    """SIGKILL one balancer's gunicorn master and its workers under load: the clients of the
    other two see no failed request."""
    heal(ha)
    loads = [Load(url, total=600, seconds=8, threads=3, limit=120).start() for url in ha.urls]
    time.sleep(2.5)
    master = ha.balancers[0]
    assert master is not None
    victims = [psutil.Process(master.pid), *psutil.Process(master.pid).children(recursive=True)]
    killed = time.monotonic()
    sigkill_all(victims)
    master.wait()
    for load in loads:
        load.wait()
    lost, *others = loads
    note(record_property, "balancer loss", killed_processes=len(victims),
         requests_elsewhere=sum(x.sent for x in others),
         failed_elsewhere=sum(len(x.failures) for x in others),
         failed_at_the_killed_one=len(lost.failures),
         killed_after_s=killed - lost.began)
    for load in others:
        assert load.failures == [], load.failures[:5]
        assert load.ok == load.sent == load.total
    ha.start_balancer(0)
    wait_for(listening(ha), 60)


# == etcd faults =================================================================================
def admin_round(ha: HaStack, name: str) -> list[tuple[str, int, Any]]:
    """/add of ``name`` through A, then /rm of it through B: each succeeds and shows in the
    registry, or is a 503 in the envelope that changed nothing."""
    a, b, _ = ha.urls
    done = []
    code, body = admin("POST", a + "/add", {"n": 1, "hostnames": [name]})
    done.append(("add", code, body))
    if code != 200:
        assert code == 503 and is_envelope(body), (code, body)
        # An /add refused half-way leaves its reservation until its lease runs out.
        wait_for(lambda: None if name not in member_names(ha) else f"{name} was added", 60)
        return done
    assert name in member_names(ha)
    code, body = admin("DELETE", b + "/rm", {"n": 1, "hostnames": [name]})
    done.append(("rm", code, body))
    if code != 200:
        assert code == 503 and is_envelope(body), (code, body)
        assert name in member_names(ha), f"a refused /rm removed {name}"
        code, body = admin("DELETE", b + "/rm", {"n": 1, "hostnames": [name]})
        assert code == 200, (code, body)  # the cluster has its quorum: it goes through
    assert name not in member_names(ha)
    return done


def raft_leader(ha: HaStack, timeout: float = 30) -> int:
    """The index of the etcd member leading the raft (waiting out an election)."""
    deadline = time.monotonic() + timeout
    while True:
        leader = ha.cluster.leader()
        if leader is not None:
            return leader
        assert time.monotonic() < deadline, f"no etcd member leads after {timeout}s"
        time.sleep(0.1)


def test_etcd_member_loss_and_quorum_loss_under_load(
        ha: HaStack, record_property: Callable[[str, object], None]) -> None:
    """Under load through every balancer (no routed GET may fail): an etcd follower is killed,
    then the raft leader; admin calls meanwhile succeed or are a 503 that changes nothing.
    Then two of three members (quorum lost): routing goes on, /add and /rm are a 503 in the
    envelope and change nothing, a replica killed is not replaced (no supervisor can act)
    until the members come back; then everything resumes by itself."""
    n = len(heal(ha).members())
    cluster = ha.cluster
    registry = registry_of(ha)
    tag = uuid.uuid4().hex[:4]
    loads = [Load(url, total=6000, seconds=400, threads=2, limit=400).start() for url in ha.urls]
    phases: dict[str, tuple[float, float]] = {}
    calls: list[tuple[str, int, Any]] = []
    try:
        # 1. A follower, then 2. the raft leader: one member down, the cluster goes on.
        for phase in ("follower", "leader"):
            began = time.monotonic()
            leader = raft_leader(ha)
            member = leader if phase == "leader" else (leader + 1) % cluster.size
            cluster.kill(member)
            calls += admin_round(ha, f"ef{tag}-{phase}")
            cluster.restart(member)
            cluster.wait_writable(60)
            phases[phase] = (began, time.monotonic())
            wait_for(settled(ha, n), 60, interval=0.2)

        # 3. Quorum lost: two members down.
        before = registry.read()
        leader = raft_leader(ha)
        down = [leader, (leader + 1) % cluster.size]
        began = time.monotonic()
        for member in down:
            cluster.kill(member)
        victim = before.members()[-1]
        assert victim.handle is not None
        tokens = set(replica_groups(ha.settings.deployment).get(victim.hostname, set()))
        running = {t for ts in replica_groups(ha.settings.deployment).values() for t in ts}
        kill_replica(victim.handle)
        a, b, _ = ha.urls
        new_processes: set[str] = set()
        with ThreadPoolExecutor(2) as pool:
            add = pool.submit(admin, "POST", a + "/add", {"n": 1, "hostnames": [f"q{tag}"]})
            rm = pool.submit(admin, "DELETE", b + "/rm", {"n": 1})
            while not (add.done() and rm.done()) or time.monotonic() - began < 6:
                now = {t for ts in replica_groups(ha.settings.deployment).values() for t in ts}
                new_processes |= now - running
                time.sleep(0.2)
        quorum_lost = time.monotonic() - began
        assert not new_processes, "a replica was started while etcd had no quorum"
        for what, future in (("add", add), ("rm", rm)):
            code, body = future.result()
            calls.append((f"{what} (no quorum)", code, body))
            assert code == 503 and is_envelope(body), (what, code, body)
        back = time.monotonic()
        for member in down:
            cluster.restart(member)
        cluster.wait_writable(60)
        phases["quorum"] = (began, time.monotonic())
        wait_for(replaced(ha, victim.hostname, n), 60, interval=0.1)
        replaced_after = time.monotonic() - back
        after = registry.read()
        # Nothing of the refused calls: the same server ids (the victim's replacement keeps
        # its id), no new name but the replacement's.
        assert sorted(r.server_id for r in after.members()) == \
            sorted(r.server_id for r in before.members())
        assert f"q{tag}" not in [r.hostname for r in after.replicas]
        assert tokens.isdisjoint(t for ts in replica_groups(ha.settings.deployment).values()
                                 for t in ts)
        # Everything resumes by itself: every balancer answers /rep from etcd, routes as the
        # registry says, and admin calls go through.
        resumed_began = time.monotonic()
        wait_for(routing_agrees(ha, new_keys(60)), 30, interval=0.2)
        resumed = time.monotonic() - resumed_began
        calls += admin_round(ha, f"ef{tag}-after")
        assert all(code == 200 for what, code, _ in calls[-2:]), calls[-2:]
    finally:
        for load in loads:
            load.wait(timeout=0)
    failed = {phase: sum(load.failures_between(*span) for load in loads)
              for phase, span in phases.items()}
    note(record_property, "etcd faults", requests=sum(load.sent for load in loads),
         failed=sum(len(load.failures) for load in loads), failed_by_phase=failed,
         admin=[(what, code) for what, code, _ in calls], quorum_lost_s=quorum_lost,
         replaced_after_quorum_s=replaced_after, routing_agrees_after_s=resumed)
    for load in loads:
        assert load.failures == [], load.failures[:5]
