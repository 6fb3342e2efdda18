"""The Swarm deployment on a real cluster: a manager and two workers, each a container running its
own engine (``make cluster-up``), the stack deployed, the balancer reached on a loopback port.

The contract holds through the balancer; replicas spread over the nodes; ``/add`` and ``/rm``
agree with ``docker service ls``; a replica killed on a worker, a worker drained and a worker
stopped outright each end with replacements on the nodes left and no failed client request;
``make swarm-down`` removes the stack and every replica service;
``make cluster-down`` leaves nothing. The tests run in file order on one cluster (the last one
takes it down) and print their figures (``[hard-to-break] swarm-...`` lines).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import docker
import pytest

from lb.backends.docker import LABEL_ROLE
from tests.helpers_chaos import Load, report
from tests.helpers_swarm import (
    CLUSTER_LABEL,
    NODE_IMAGE,
    TEST_CLUSTER_PREFIX,
    Cluster,
    http_session,
    remains_of,
    remove_abandoned_clusters,
)

# Each test's limit includes building the cluster when it is the first to use it.
pytestmark = [pytest.mark.docker, pytest.mark.swarm, pytest.mark.timeout(900)]

RECOVERY_TIMEOUT = 90.0  # seconds; a replacement normally serves within a few


def error(message: str) -> dict[str, str]:
    return {"message": f"<Error> {message}", "status": "failure"}


def wait_until(what: str, check: Callable[[], Any], timeout: float = RECOVERY_TIMEOUT) -> Any:
    """Poll ``check`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


def settled(cluster: Cluster, n: int, gone: frozenset[str] | set[str] = frozenset(),
            off: str | None = None) -> Callable[[], dict[str, str] | None]:
    """A check: ``n`` replicas in ``/rep``, none of ``gone``, each with a running task (none on
    node ``off``), and ``docker service ls`` showing exactly those. The placement, when so."""
    session = http_session()

    def check() -> dict[str, str] | None:
        names = cluster.rep(session)["replicas"]
        if len(names) != n or gone & set(names):
            return None
        where = cluster.placement()
        if set(where) != set(names) or set(cluster.replica_services()) != set(names):
            return None
        if off is not None and off in where.values():
            return None
        return where
    return check


def test_contract_through_the_balancer(swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    assert cluster.rep(session) == {"N": 3, "replicas": ["Server1", "Server2", "Server3"]}
    for _ in range(30):
        reply = session.get(cluster.url + "/home", timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "successful"
        assert body["message"] in {f"Hello from Server: {i}" for i in (1, 2, 3)}
        assert reply.headers["X-Served-By"] in {"Server1", "Server2", "Server3"}
    reply = session.get(cluster.url + "/other", timeout=30)
    assert (reply.status_code, reply.json()) == (
        400, error("'/other' endpoint does not exist in server replicas"))
    reply = session.post(cluster.url + "/add", json={"n": 1, "hostnames": ["A", "B"]}, timeout=30)
    assert (reply.status_code, reply.json()) == (
        400, error("Length of hostname list is more than newly added instances"))
    reply = session.delete(cluster.url + "/rm", json={"n": 1, "hostnames": ["S1", "S2"]},
                           timeout=30)
    assert (reply.status_code, reply.json()) == (
        400, error("Length of hostname list is more than removable instances"))
    reply = session.post(cluster.url + "/add", json={"n": 1, "hostnames": ["Server2"]}, timeout=30)
    assert reply.status_code == 409 and reply.json()["status"] == "failure"

    where = wait_until("3 replica services running", settled(cluster, 3))
    assert set(where) == {"Server1", "Server2", "Server3"}
    assert len(set(where.values())) >= 2, f"replicas not spread over nodes: {where}"


def test_add_and_rm_ten_across_nodes(swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    # Two names Swarm takes as no service name ('.', a trailing '_') are mapped, not refused.
    names = [f"S{i}" for i in range(10, 18)] + ["S.18", "S19_"]
    reply = session.post(cluster.url + "/add", json={"n": 10, "hostnames": names}, timeout=120)
    assert reply.status_code == 200, reply.text
    added = reply.json()["message"]
    assert added == {"N": 13, "replicas": ["Server1", "Server2", "Server3", *names]}
    assert set(cluster.replica_services()) == set(added["replicas"])  # docker service ls agrees
    where = wait_until("13 replica services running", settled(cluster, 13))
    assert set(where.values()) == {"manager", "worker1", "worker2"}, where
    assert cluster.serving(session, 300) == set(added["replicas"])  # every one answers

    reply = session.delete(cluster.url + "/rm", json={"n": 10, "hostnames": names[:5]},
                           timeout=120)
    assert reply.status_code == 200, reply.text
    left = reply.json()["message"]
    assert left["N"] == 3 and not set(names[:5]) & set(left["replicas"])
    assert set(cluster.replica_services()) == set(left["replicas"])
    assert cluster.rep(session) == left


def no_failures(cluster: Cluster, load: Load) -> None:
    """None of ``load``'s requests failed; if some did, the balancer's warnings and errors
    since the load began (tracebacks included) go into the message with the first few."""
    if load.failures:
        said = cluster.balancer_trouble(time.time() - (time.monotonic() - load.began))
        pytest.fail(f"{len(load.failures)} failed: {load.failures[:5]}\nthe balancer's log "
                    "since the load began, WARNING and above:\n"
                    + ("\n".join(said[-60:]) if said else "(nothing)"))


def _a_replica_on_a_worker(cluster: Cluster) -> tuple[str, str]:
    where = wait_until("replicas running", settled(cluster, 3))
    on_workers = sorted((node, name) for name, node in where.items() if node != "manager")
    assert on_workers, f"no replica on a worker: {where}"
    node, name = on_workers[0]
    return name, node


def test_killed_replica_container_is_replaced_without_failed_requests(
        swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    victim, node = _a_replica_on_a_worker(cluster)
    before = set(cluster.rep(session)["replicas"])
    load = Load(cluster.url, total=1200, seconds=15, threads=6).start()
    time.sleep(2)
    began = time.monotonic()
    cluster.replica_container(victim, node).kill()
    listed = wait_until(f"{victim} replaced in /rep",
                        lambda: victim not in (rep := cluster.rep(session))["replicas"]
                        and rep["N"] == 3 and rep)
    detected = time.monotonic() - began
    (new,) = set(listed["replicas"]) - before
    wait_until(f"{new} serving", lambda: new in cluster.serving(session, 30))
    serving = time.monotonic() - began
    load.wait()
    where = wait_until("3 replicas running", settled(cluster, 3, gone={victim}))
    report("swarm-kill-container", node=node, detected_s=detected, serving_s=serving,
           requests=load.sent, failed=len(load.failures), replacement_on=where[new])
    no_failures(cluster, load)
    assert load.ok == load.sent


def _set_availability(cluster: Cluster, node: str, availability: str) -> None:
    api = cluster.client().api
    node_id = cluster.node_id(node)
    info = api.inspect_node(node_id)
    spec = {**info["Spec"], "Availability": availability}
    api.update_node(node_id, info["Version"]["Index"], spec)


def test_drained_worker_hands_its_replicas_to_the_others(swarm_cluster: Cluster) -> None:
    cluster = swarm_cluster
    _, node = _a_replica_on_a_worker(cluster)
    before = cluster.placement()
    leaving = {name for name, where in before.items() if where == node}
    load = Load(cluster.url, total=1200, seconds=15, threads=6).start()
    time.sleep(2)
    began = time.monotonic()
    _set_availability(cluster, node, "drain")
    try:
        where = wait_until(f"replicas off drained {node}",
                           settled(cluster, 3, gone=leaving, off=node))
        moved = time.monotonic() - began
        new = set(where) - set(before)
        session = http_session()
        wait_until(f"{new} serving", lambda: new <= cluster.serving(session, 60))
        serving = time.monotonic() - began
        load.wait()
    finally:
        _set_availability(cluster, node, "active")
    report("swarm-drain", node=node, replicas_moved=len(leaving), moved_s=moved,
           serving_s=serving, requests=load.sent, failed=len(load.failures))
    assert len(new) == len(leaving)
    no_failures(cluster, load)


def test_stopped_worker_is_replaced_on_the_remaining_nodes(swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    wait_until("replicas running", settled(cluster, 3))
    before = cluster.placement()
    for _ in range(3):
        if len(set(before.values())) > 1:
            break
        # All on one node (the drain before moved them there): a new replica goes where Swarm
        # runs the fewest tasks, so one is replaced until they are on two nodes at least.
        moved = min(before)
        reply = session.delete(cluster.url + "/rm", json={"n": 1, "hostnames": [moved]},
                               timeout=120)
        assert reply.status_code == 200, reply.text
        reply = session.post(cluster.url + "/add", json={"n": 1}, timeout=120)
        assert reply.status_code == 200, reply.text
        wait_until("replicas running", settled(cluster, 3))
        before = cluster.placement()
    # The worker with the most replicas (the drained one may have none now).
    node = max(("worker1", "worker2"),
               key=lambda w: sum(1 for where in before.values() if where == w))
    leaving = {name for name, where in before.items() if where == node}
    assert leaving, f"no replica on a worker: {before}"
    # A request fails only when every replica it may try (1 + LB_RETRIES) is on the lost node.
    assert set(before) - leaving, f"every replica is on {node}: {before}"
    node_id = cluster.node_id(node)
    host = docker.from_env(timeout=60)
    load = Load(cluster.url, total=1500, seconds=20, threads=6).start()
    time.sleep(2)
    began = time.monotonic()
    host.containers.get(f"{cluster.name}-{node}").stop(timeout=0)
    try:
        rep = wait_until(f"replicas of stopped {node} replaced in /rep",
                         lambda: not leaving & set((r := cluster.rep(session))["replicas"])
                         and r["N"] == 3 and r)
        detected = time.monotonic() - began
        new = set(rep["replicas"]) - set(before)
        wait_until(f"{new} serving", lambda: new <= cluster.serving(session, 60))
        serving = time.monotonic() - began
        wait_until(f"{node} down for the manager",
                   lambda: cluster.client().api.inspect_node(node_id)["Status"]["State"]
                   == "down")
        node_down = time.monotonic() - began
        where = wait_until("3 replicas running elsewhere",
                           settled(cluster, 3, gone=leaving, off=node))
        load.wait()
    finally:
        host.containers.get(f"{cluster.name}-{node}").start()  # it rejoins the swarm
        host.close()
    report("swarm-stop-node", node=node, replicas_lost=len(leaving), detected_s=detected,
           serving_s=serving, manager_saw_down_by_s=node_down, requests=load.sent,
           failed=len(load.failures), now_on=sorted(set(where.values())))
    no_failures(cluster, load)


def test_swarm_down_removes_the_stack_and_every_replica(swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    reply = session.post(cluster.url + "/add", json={"n": 2}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert len(cluster.replica_services()) == 5
    proc = cluster.make("swarm-down", timeout=400,  # past SWARM_WAIT: its own message first
                        env={"DOCKER_HOST": cluster.socket("manager")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = cluster.client().api
    assert api.services() == []  # the stack's two and every replica
    assert api.networks(names=["net1"]) == []
    assert [v["Name"] for v in api.volumes()["Volumes"] or []
            if v["Name"] == f"{cluster.stack}_registry"] == []


def test_a_cluster_left_by_a_killed_run_is_removed_and_a_live_one_is_not(
        swarm_cluster: Cluster) -> None:
    """What a run killed before its teardown leaves (node containers no longer running, their
    volume, the network) is removed before the next run starts its cluster."""
    name = f"{TEST_CLUSTER_PREFIX}dead{uuid.uuid4().hex[:4]}"
    labels = {CLUSTER_LABEL: name, LABEL_ROLE: "node"}
    host = docker.from_env(timeout=60)
    try:
        host.volumes.create(f"{name}-manager", labels={CLUSTER_LABEL: name})
        host.networks.create(f"{name}-net", labels={CLUSTER_LABEL: name})
        host.containers.create(NODE_IMAGE, name=f"{name}-manager", labels=labels)
    finally:
        host.close()
    assert len(remains_of(name)) == 3
    assert name in remove_abandoned_clusters()
    assert remains_of(name) == []
    assert swarm_cluster.name not in remove_abandoned_clusters()
    assert len(remains_of(swarm_cluster.name)) >= 3


def test_cluster_down_leaves_nothing(swarm_cluster: Cluster) -> None:
    cluster = swarm_cluster
    assert remains_of(cluster.name), "the cluster should exist before it is taken down"
    proc = cluster.make("cluster-down", timeout=300)
    cluster.removed = True
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert remains_of(cluster.name) == []
    assert not cluster.folder.exists()
    with pytest.raises(OSError):
        http_session().get(cluster.url + "/rep", timeout=2)
