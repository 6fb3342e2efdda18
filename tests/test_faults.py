"""Faults other than a clean replica death: a hung replica, a slow one, the supervisor killed
in the middle of a replacement, balancer workers killed under load, /rm of a replica with
requests in flight, and SIGTERM to ``lb-run``.

Sizes: ``SUPERVISOR_KILLS`` (default 3) and ``WORKER_KILLS`` (default 3).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import psutil
import pytest
import requests

from lb.backends import STOP_TIMEOUT
from lb.leases import SUPERVISOR_HOLDER
from lb.registry import READY, Replica, State
from tests.conftest import RunningStack, deployment_processes
from tests.helpers_chaos import (
    Load,
    balancer_master_of,
    balancer_workers_of,
    env_int,
    processes_match_registry,
    report,
    supervisor_of,
    wait_for,
)
from tests.helpers_echo import processes_of, start_echo_replica

pytestmark = pytest.mark.system


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def busiest(stack: RunningStack) -> Replica:
    """The replica that owns the key of most requests (server id 1 under the seed's hash)."""
    return next(r for r in stack.state().members() if r.server_id == 1)


def keys_for(state: State, server_id: int, count: int) -> list[int]:
    """6-digit request keys that the current map sends to ``server_id`` first."""
    ring = state.hash_ring(state.routable())
    keys = [k for k in range(100000, 200000) if ring.lookup(k) == server_id][:count]
    assert len(keys) == count, f"server id {server_id} owns too few keys"
    return keys


def gone_and_replaced(stack: RunningStack, old: Replica) -> Callable[[], str | None]:
    def check() -> str | None:
        state = stack.state()
        members = state.members()
        if old.hostname in {r.hostname for r in state.replicas}:
            return f"{old.hostname} still registered"
        if any(r.state != READY for r in members) or len(members) != stack.settings.n:
            return f"members={[(r.hostname, r.state) for r in members]}"
        if processes_of(old.handle or "/"):
            return f"processes of {old.hostname} still run"
        return None
    return check


# -- a hung replica and a slow one --------------------------------------------------------------
def test_hung_replica_costs_no_request(make_stack: Callable[..., RunningStack]) -> None:
    """SIGSTOP every process of the busiest replica: its socket still accepts, nothing answers.

    Requests already sent to it wait for the upstream timeout and go to the next replica; the
    supervisor's heartbeat declares it down and replaces it, killing the stopped processes.
    """
    stack = make_stack(upstream_timeout=2.0)
    victim = busiest(stack)
    load = Load(stack.url, 1500, seconds=10, threads=8).start()
    time.sleep(2)
    signal_all(processes_of(victim.handle or "/"), signal.SIGSTOP)
    t0 = time.monotonic()
    wait_for(gone_and_replaced(stack, victim), timeout=60)
    replaced_after = time.monotonic() - t0
    load.wait()
    report("hung replica (SIGSTOP) under load", requests=load.sent, ok=load.ok,
           failures=len(load.failures), replaced_after_s=round(replaced_after, 2),
           duration_s=round(load.duration, 1))
    assert load.failures == [], load.failures[:5]
    assert load.ok == load.sent == 1500


def test_slow_replica_is_passed_over_then_replaced(make_stack: Callable[..., RunningStack]) -> None:
    """A replica slower than LB_UPSTREAM_TIMEOUT: its requests are served by the next one.

    While its heartbeat answers, the supervisor keeps it; once its heartbeat is slower than
    LB_HEARTBEAT_TIMEOUT too, the supervisor replaces it with a real replica.
    """
    stack = make_stack(hash_key="query:k", upstream_timeout=1.0, n=2)
    slow = start_echo_replica(stack.registry, stack.settings.deployment, "slow-echo",
                              ECHO_DELAY="3")
    keys = keys_for(stack.state(), slow.server_id, 12)
    served: dict[str, int] = {}
    results: list[tuple[int, str]] = []

    def one(k: int) -> None:
        reply = requests.get(f"{stack.url}/home?k={k}", timeout=30)
        results.append((reply.status_code, reply.headers.get("X-Served-By", "")))

    threads = [threading.Thread(target=one, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for status, by in results:
        served[by] = served.get(by, 0) + 1
    assert [s for s, _ in results] == [200] * len(keys)
    assert "slow-echo" not in served
    assert stack.state().find("slow-echo").state == READY  # its heartbeat is fine: kept

    stuck = start_echo_replica(stack.registry, stack.settings.deployment, "stuck-echo",
                               ECHO_HEARTBEAT_DELAY="5",
                               ECHO_HEARTBEAT_SLOW_AFTER="3")
    t0 = time.monotonic()
    wait_for(lambda: None if stack.state().find("stuck-echo") is None else "still there", 30)
    replaced_after = time.monotonic() - t0
    state = stack.wait_ready(4, timeout=60)
    wait_for(lambda: processes_match_registry(stack.state(), stack.settings.deployment), 30)
    report("slow replica", requests=len(keys), failures=len(keys) - len(results),
           served_by=served, heartbeat_slow_replaced_after_s=round(replaced_after, 2))
    assert not processes_of(stuck.handle or "/")
    assert stuck.server_id in {r.server_id for r in state.members()}  # same id, new process


# -- the supervisor killed during a replacement -----------------------------------------------
def test_supervisor_killed_mid_replacement_leaves_no_duplicate_or_orphan(
        make_stack: Callable[..., RunningStack]) -> None:
    """SIGKILL the supervisor at different points of a replacement; lb-run restarts it and the
    new one finishes the job: N replicas, one process group each, nothing else running."""
    rounds = env_int("SUPERVISOR_KILLS", 3)
    stack = make_stack()
    n = stack.settings.n
    load = Load(stack.url, 200 * rounds, seconds=8 * rounds, threads=4,
                limit=60 * rounds + 60).start()
    points = []
    for i in range(rounds):
        victim = next(r for r in stack.state().members() if r.server_id == i % n + 1)
        hung = i % 3 == 2  # every third round: a hung replica, stopped (not dead) when we strike
        sup = supervisor_of(stack.proc.pid)
        assert sup is not None
        signal_all(processes_of(victim.handle or "/"),
                   signal.SIGSTOP if hung else signal.SIGKILL)
        # Strike at a different moment each round: as soon as the replacement is reserved,
        # once its process is started, or while the old (hung) replica is being stopped.
        point = ("reserved", "started", "stopping-old")[i % 3]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            entry = next((r for r in stack.state().replicas
                          if r.server_id == victim.server_id), None)
            if entry is not None and entry.hostname != victim.hostname:
                if point != "started" and entry.leased_to(SUPERVISOR_HOLDER) \
                        and entry.handle is None:
                    break
                if point == "started" and entry.handle is not None:
                    break
            time.sleep(0.01)
        else:
            raise AssertionError(f"no replacement of {victim.hostname} seen: {stack.state()}")
        if point == "stopping-old":
            time.sleep(0.5)  # the old one gets 2 s to stop: we are inside that wait
        sup.kill()
        points.append(point)
        wait_for(lambda dead=sup.pid: None if (s := supervisor_of(stack.proc.pid))  # type: ignore[misc]
                 and s.pid != dead else "supervisor not restarted", 30)
        stack.wait_ready(n, timeout=60)
        wait_for(lambda: processes_match_registry(stack.state(), stack.settings.deployment),
                 timeout=60)
    load.wait()
    report("supervisor SIGKILL mid-replacement", rounds=rounds, kill_points=points,
           requests=load.sent, failures=len(load.failures))
    assert load.failures == [], load.failures[:5]
    assert len(stack.state().replicas) == n


# -- balancer workers killed under load ------------------------------------------------------
def test_balancer_worker_kills_under_load(make_stack: Callable[..., RunningStack]) -> None:
    """SIGKILL a gunicorn worker of the balancer under load; gunicorn starts a new one.

    The requests the killed worker held at that moment are lost to a client that does not
    retry (unavoidable: the process that read them is gone); a client that retries a GET once
    on a connection error sees no failure. Both are measured.
    """
    kills = env_int("WORKER_KILLS", 3)
    stack = make_stack()
    workers = stack.settings.workers
    per = 300 * (kills + 1)
    plain = Load(stack.url, per, seconds=2.5 * (kills + 1), threads=4).start()
    retrying = Load(stack.url, per, seconds=2.5 * (kills + 1), threads=4,
                    client_retries=1).start()
    killed = 0
    for i in range(kills):
        time.sleep(max(0.0, plain.began + (i + 0.5) * 2.5 - time.monotonic()))
        current = balancer_workers_of(stack.proc.pid)
        assert len(current) == workers, current
        current[i % workers].kill()
        killed += 1
        old = {p.pid for p in current}
        wait_for(lambda old=old: None  # type: ignore[misc]
                 if len(now := balancer_workers_of(stack.proc.pid)) == workers
                 and {p.pid for p in now} != old else "worker not restarted", 30)
    plain.wait()
    retrying.wait()
    master = balancer_master_of(stack.proc.pid)
    report("balancer worker SIGKILL under load", kills=killed,
           requests=plain.sent + retrying.sent,
           failures_no_client_retry=len(plain.failures), requests_no_client_retry=plain.sent,
           failures_one_client_retry=len(retrying.failures),
           rescued_by_client_retry=retrying.retried,
           failure_kinds=sorted({why[:60] for _, why in plain.failures + retrying.failures}))
    assert master is not None and len(balancer_workers_of(stack.proc.pid)) == workers
    # Only what a killed worker held can be lost: at most one request per client thread.
    assert len(plain.failures) <= plain.threads * killed, plain.failures[:5]
    assert retrying.failures == [], retrying.failures[:5]
    assert stack.get("/home").status_code == 200


# -- graceful removal and shutdown -------------------------------------------------------------
def test_rm_drains_in_flight_requests(make_stack: Callable[..., RunningStack]) -> None:
    """/rm of a replica with requests in flight: they finish (200), new ones go elsewhere."""
    # Hedging off: a 2 s request is slow by design here, and a hedge would go to Server1,
    # which has no /slow (replicas of one deployment serve the same paths; these do not).
    stack = make_stack(hash_key="query:k", n=1, hedge_share=0)
    echo = start_echo_replica(stack.registry, stack.settings.deployment, "drain-echo")
    keys = keys_for(stack.state(), echo.server_id, 6)
    results: list[tuple[int, str]] = []

    def slow(k: int) -> None:
        reply = requests.get(f"{stack.url}/slow?s=2&k={k}", timeout=60)
        results.append((reply.status_code, reply.json().get("echo", "")))

    threads = [threading.Thread(target=slow, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    time.sleep(0.7)  # all six are inside the echo replica now
    began = time.monotonic()
    removed = stack.delete("/rm", json={"n": 1, "hostnames": ["drain-echo"]})
    rm_took = time.monotonic() - began
    after = [stack.get(f"/home?k={k}") for k in keys]
    for t in threads:
        t.join(timeout=60)
    report("graceful /rm", in_flight=len(keys), in_flight_ok=sum(s == 200 for s, _ in results),
           rm_seconds=round(rm_took, 2))
    assert removed.status_code == 200, removed.text
    assert removed.json()["message"] == {"N": 1, "replicas": ["Server1"]}
    assert results == [(200, "drain-echo")] * len(keys)
    assert [r.status_code for r in after] == [200] * len(keys)
    assert {r.headers["X-Served-By"] for r in after} == {"Server1"}
    assert not processes_of(echo.handle or "/")
    # It left on its own once drained: /rm did not sit out the stop timeout to force-kill it
    # (it did, 12 s every time, while it waited on the zombie of a replica it had not started).
    assert rm_took < STOP_TIMEOUT, rm_took


def test_sigterm_stops_what_lb_run_started_and_nothing_else(
        make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack()
    other = make_stack(n=1)  # a second deployment on the same machine must survive
    stack.post("/add", json={"n": 1, "hostnames": ["Extra1"]}).raise_for_status()
    ours = [p.pid for p in deployment_processes(stack.settings.deployment)]
    children = [p.pid for p in psutil.Process(stack.proc.pid).children(recursive=True)]
    theirs = [p.pid for p in deployment_processes(other.settings.deployment)]
    assert len(ours) == 8  # 4 replicas, master + worker each
    stack.proc.send_signal(signal.SIGTERM)
    code = stack.proc.wait(timeout=60)
    left = [pid for pid in ours + children if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    report("SIGTERM to lb-run", exit_code=code, processes_stopped=len(set(ours + children)),
           left=len(left))
    assert code == 0
    assert left == []
    assert all(psutil.pid_exists(pid) for pid in theirs)
    assert other.get("/home").status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(stack.url + "/rep", timeout=5)


def test_balancer_worker_killed_during_add_leaves_no_orphan(
        make_stack: Callable[..., RunningStack]) -> None:
    """SIGKILL every balancer worker while an /add is starting replicas: the client gets a
    connection error; once the reservation expires the supervisor takes the entries over (it
    adopts what was started, starts what was not). No duplicate, no orphan, all ready."""
    stack = make_stack(start_timeout=5.0)
    results: list[object] = []

    def add() -> None:
        try:
            results.append(requests.post(stack.url + "/add", timeout=60,
                                         json={"n": 2, "hostnames": ["K1", "K2"]}).status_code)
        except requests.RequestException as exc:
            results.append(type(exc).__name__)

    caller = threading.Thread(target=add)
    caller.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            r.hostname == "K1" and r.handle for r in stack.state().replicas):
        time.sleep(0.005)  # until a replica of the /add is started and recorded
    for worker in balancer_workers_of(stack.proc.pid):
        worker.kill()
    caller.join(timeout=90)
    t0 = time.monotonic()
    wait_for(lambda: processes_match_registry(stack.state(), stack.settings.deployment)
             or (None if all(r.state == READY for r in stack.state().members())
                 else "not all ready"), timeout=90)
    state = stack.state()
    report("balancer workers SIGKILLed mid-/add", client_saw=results,
           settled_after_s=round(time.monotonic() - t0, 1),
           members=[r.hostname for r in state.members()])
    names = [r.hostname for r in state.members()]
    assert len(names) == len(set(names))
    assert {"K1", "K2"} <= set(names) or not {"K1", "K2"} & set(names)  # all or nothing
    assert stack.get("/home").status_code == 200
