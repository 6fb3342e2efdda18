"""No false kills, on real stacks (``lb-run``: gunicorn, supervisor, replica processes): a
replica that serves routed requests is not replaced because its heartbeat is late, and a dead
or hung one is still found (``lb.evidence``, ``supervisor.core``). Each runs once per worker.

- A replica whose ``/heartbeat`` answers after ``LB_HEARTBEAT_TIMEOUT`` (the misbehaving
  replica, told so) stays while the balancer routes to it, and is replaced once no request
  is routed to it: the balancers' answer counts are what keep it.
- 64 keep-alive clients as fast as they can for 60 s: no replica replaced, no request failed;
  then one replica SIGKILLed under the same load is replaced within the usual bound.
- A SIGSTOPped replica under load is declared down and replaced (figures printed).
- Over etcd, 3 balancers' answers together keep the replica with a late heartbeat (once).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

from lb.registry import READY, State
from tests.conftest import RunningStack
from tests.helpers_chaos import Load, report, wait_for
from tests.helpers_misbehave import start_misbehaving_replica
from tests.test_ha import ha_stack, registry_of, settled
from tests.test_metrics_stack import scrape, total

pytestmark = pytest.mark.system

StackMaker = Callable[..., RunningStack]


def entries(state: State) -> dict[int, tuple[str, str | None]]:
    """server id -> (hostname, handle): what a replacement changes."""
    return {r.server_id: (r.hostname, r.handle) for r in state.members()}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()``; fails after ``timeout``."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - began


def replaced(stack: RunningStack, server_id: int, hostname: str) -> Callable[[], bool]:
    """The replica ``server_id`` runs under another name now, ready."""
    def check() -> bool:
        entry = next((r for r in stack.state().members() if r.server_id == server_id), None)
        return entry is not None and entry.hostname != hostname and entry.state == READY
    return check


def test_a_late_heartbeat_is_forgiven_while_routed_answers_come_and_only_then(
        make_stack: StackMaker) -> None:
    stack = make_stack(n=2, strategy="maglev")  # maglev: every replica gets a share of keys
    slow = start_misbehaving_replica(stack.registry, stack.settings.deployment, "slowbeat")
    assert slow.address is not None
    requests.get(slow.address + "/_heartbeat-delay?seconds=1.5", timeout=5).raise_for_status()
    before = entries(stack.state())
    load = Load(stack.url, total=2000, seconds=8.0, threads=4, limit=20).start()
    load.wait()
    assert load.failures == [] and load.served_by["slowbeat"] > 100, load.served_by
    # Sixteen rounds with every heartbeat of slowbeat late: still there, still the same.
    assert entries(stack.state()) == before
    forgiven = total(scrape(stack), "lb_heartbeats_late_but_serving_total")
    assert forgiven >= 5, forgiven
    # No requests routed to it: nothing forgives its late heartbeats.
    gone = wait_until(replaced(stack, slow.server_id, "slowbeat"), 20,
                      "slowbeat replaced once no request is routed to it")
    report("late heartbeat, routed answers", worker=stack.settings.worker,
           served_by_slowbeat=load.served_by["slowbeat"], forgiven=forgiven,
           replaced_after_load_s=round(gone, 2))


def replica_pid(state: State, server_id: int) -> int:
    entry = next(r for r in state.members() if r.server_id == server_id)
    assert entry.handle is not None
    return int(entry.handle.split("/")[0])


def test_64_clients_flat_out_replace_nothing_and_a_killed_replica_is_replaced_in_time(
        make_stack: StackMaker) -> None:
    """The default heartbeat settings (0.5 s, 0.5 s, 2 misses) and 3 local replicas."""
    stack = make_stack()
    settings = stack.settings
    before = entries(stack.state())
    saturated, seconds = 60.0, 75.0  # 60 s flat out, then the kill under the same load
    load = Load(stack.url, total=10**7, seconds=1.0, threads=64, limit=seconds).start()
    time.sleep(saturated)
    during = entries(stack.state())
    victim = 1
    os.kill(replica_pid(stack.state(), victim), signal.SIGKILL)
    # As fast as without the evidence: a process gone is never forgiven.
    bound = settings.heartbeat_interval * (settings.heartbeat_failures + 2) + 10.0
    took = wait_until(replaced(stack, victim, before[victim][0]), bound,
                      "the killed replica replaced")
    load.wait()
    after = entries(stack.state())
    report("64 clients flat out", worker=settings.worker, requests=load.ok,
           failed=len(load.failures), seconds=round(load.duration, 1),
           replaced_before_kill=sum(during[i] != before[i] for i in before),
           kill_to_replaced_s=round(took, 2))
    assert during == before  # nothing replaced under load
    assert load.failures == [], load.failures[:5]
    assert {i: after[i] for i in after if i != victim} == {
        i: before[i] for i in before if i != victim}
    assert load.ok > 1000


def test_a_hung_replica_under_load_is_still_declared_down(make_stack: StackMaker) -> None:
    """SIGSTOP: its socket accepts, nothing answers, and the answers counted for it stop at
    once; detection takes at most about one heartbeat round more than without them."""
    stack = make_stack(strategy="maglev")
    settings = stack.settings
    before = entries(stack.state())
    load = Load(stack.url, total=3000, seconds=10.0, threads=8, limit=30).start()
    time.sleep(2.0)
    victim = 2
    proc = psutil.Process(replica_pid(stack.state(), victim))
    children = proc.children(recursive=True)
    for p in [proc, *children]:
        p.suspend()
    try:
        took = wait_until(lambda: stack.state().find(before[victim][0]) is None, 15,
                          "the hung replica declared down")
    finally:
        for p in [proc, *children]:
            try:
                p.resume()
            except psutil.Error:
                pass  # stopped by the supervisor already
    load.wait()
    # Without the evidence: heartbeat_failures rounds (each an interval plus a timeout).
    before_bound = settings.heartbeat_failures * (settings.heartbeat_interval
                                                  + settings.heartbeat_timeout)
    report("hung replica under load", worker=settings.worker, stop_to_down_s=round(took, 2),
           rounds_without_evidence_s=round(before_bound, 2), failed=len(load.failures))
    assert load.failures == [], load.failures[:5]


def test_over_etcd_the_answers_of_several_balancers_forgive_together(tmp_path: Path) -> None:
    """3 balancers (one worker each) and 2 supervisors over etcd: each balancer routes a third
    of the load and publishes its own counts under its own lease; the leading supervisor reads
    them all. The replica with a late heartbeat stays while they route, goes after."""
    with ha_stack(tmp_path) as ha:
        wait_for(settled(ha), 90, interval=0.2)
        registry = registry_of(ha, 5.0)
        slow = start_misbehaving_replica(registry, ha.settings.deployment,  # type: ignore[arg-type]
                                         "slowbeat")
        assert slow.address is not None
        requests.get(slow.address + "/_heartbeat-delay?seconds=1.5", timeout=5)
        before = entries(registry.read())
        loads = [Load(url, total=700, seconds=8.0, threads=2, limit=20).start()
                 for url in ha.urls]
        for load in loads:
            load.wait()
        assert all(load.failures == [] for load in loads), [ld.failures[:3] for ld in loads]
        served = [load.served_by["slowbeat"] for load in loads]
        assert all(n > 20 for n in served), served  # each balancer routed some of its share
        assert entries(registry.read()) == before
        published = registry.read_answers()
        assert len(published) == len(ha.urls)  # one key per balancer worker
        gone = wait_until(lambda: registry.read().find("slowbeat") is None, 30,
                          "slowbeat replaced once no request is routed to it")
        report("late heartbeat over etcd, 3 balancers", served_by_slowbeat=served,
               replaced_after_load_s=round(gone, 2))
