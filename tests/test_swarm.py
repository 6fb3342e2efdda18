"""The Swarm deployment on a real cluster: three nodes (``manager``, ``worker1``, ``worker2``, all
three swarm managers), each a container running its own engine (``make cluster-up``), the stack
deployed: etcd on every node, a balancer on every node (each reached on a loopback port), two
supervisors.

The stack is laid out with no single point of failure and every balancer routes a key alike;
the contract holds through the balancer; replicas spread over the nodes; ``/add`` and ``/rm``
agree with ``docker service ls``; a replica killed on a worker, a worker drained and a worker
stopped outright under load each end with replacements on the nodes left and no failed
client request (the stopped node's requests retried on the replicas of the nodes left);
the node of the leading supervisor stopped outright: no failed request through another node's
balancer, the standby leads, the lost replicas are replaced; ``make swarm-down`` removes the
stack, every replica service and the etcd volumes on every node (and the stack is deployed
again); a cluster a test left broken is put back for the next one. The tests share one cluster,
which only the session fixture takes down (``tests/test_swarm_cluster.py`` shows its own life);
each finds it whole with three replicas and must leave it so (``conftest.swarm_cluster`` checks),
so they pass in any order and any subset; they print their figures (``[hard-to-break] swarm-...``
lines).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import docker
import pytest

from tests.helpers_chaos import Load, report
from tests.helpers_swarm import (
    NODES,
    REPLICAS,
    STACK_SETTINGS,
    Cluster,
    answer,
    http_session,
    wait_until,
    wait_whole,
)

# Each test's limit includes building the cluster when it is the first to use it.
pytestmark = [pytest.mark.docker, pytest.mark.swarm, pytest.mark.timeout(900)]


def error(message: str) -> dict[str, str]:
    return {"message": f"<Error> {message}", "status": "failure"}


def leader_if_known(cluster: Cluster) -> str | None:
    """``cluster.leader()``, or None while it cannot be read: right after a node stops, the
    swarm's API (which finds the etcd members' containers) waits for its managers to elect a
    new raft leader if the stopped node led them."""
    try:
        return cluster.leader()
    except AssertionError:
        return None


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


def routed(cluster: Cluster, node: str, keys: list[str]) -> dict[str, str]:
    """Key -> the replica that answered ``/home?key=K`` through ``node``'s balancer."""
    session = http_session()
    served = {}
    for key in keys:
        reply = session.get(cluster.url_of(node) + "/home", params={"key": key}, timeout=30)
        assert reply.status_code == 200, (node, key, reply.text)
        served[key] = reply.headers["X-Served-By"]
    return served


def test_no_single_point_of_failure_in_the_layout(swarm_cluster: Cluster) -> None:
    cluster = swarm_cluster  # whole: the fixture sees to it
    members = {member: set(cluster.task_nodes(member).values())
               for member in ("etcd1", "etcd2", "etcd3")}
    assert all(len(where) == 1 for where in members.values()), members
    assert {n for where in members.values() for n in where} == set(NODES), members
    assert sorted(cluster.task_nodes("lb").values()) == sorted(NODES)
    supervisors = list(cluster.task_nodes("supervisor").values())
    assert len(supervisors) == len(set(supervisors)) == 2, supervisors
    assert cluster.leader() in supervisors
    managers = [n["Spec"]["Role"] for n in cluster.nodes().values()]
    assert managers == ["manager"] * 3, managers
    # Balancers have no Docker socket; supervisors do.
    api = cluster.client().api
    mounts = {name: [m["Target"] for m in api.inspect_service(f"{cluster.stack}_{name}")["Spec"]
                     ["TaskTemplate"]["ContainerSpec"].get("Mounts", [])]
              for name in ("lb", "supervisor")}
    assert mounts == {"lb": [], "supervisor": ["/var/run/docker.sock"]}, mounts

    # Every balancer sees the same replicas and sends each key to the same one, every time.
    session = http_session()
    reps = {node: session.get(cluster.url_of(node) + "/rep", timeout=30).json()["message"]
            for node in NODES}
    assert len({str(rep) for rep in reps.values()}) == 1, reps
    keys = [f"user{i}" for i in range(30)]
    first = routed(cluster, "manager", keys)
    assert len(set(first.values())) >= 2, f"30 keys on one replica: {first}"
    for node in NODES:
        for _ in range(2):
            assert routed(cluster, node, keys) == first, node


def test_contract_through_the_balancer(swarm_cluster: Cluster) -> None:
    """Three replicas, whose names depend on what ran before (a replaced replica has a new
    one; a fresh stack's are Server1..3: ``test_swarm_down_...``)."""
    cluster, session = swarm_cluster, http_session()
    rep = cluster.rep(session)
    assert rep["N"] == 3 and len(set(rep["replicas"])) == 3, rep
    said: dict[str, set[str]] = {}  # replica -> what it answered
    for _ in range(30):
        reply = session.get(cluster.url + "/home", timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "successful"
        assert re.fullmatch(r"Hello from Server: [1-9][0-9]*", body["message"]), body
        assert reply.headers["X-Served-By"] in rep["replicas"]
        said.setdefault(reply.headers["X-Served-By"], set()).add(body["message"])
    # Each replica answers with its own server id, always the same.
    assert all(len(messages) == 1 for messages in said.values()), said
    assert len({m for messages in said.values() for m in messages}) == len(said), said
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
    reply = session.post(cluster.url + "/add", json={"n": 1, "hostnames": rep["replicas"][1:2]},
                         timeout=30)
    assert reply.status_code == 409 and reply.json()["status"] == "failure"

    where = wait_until("3 replica services running", settled(cluster, 3))
    assert set(where) == set(rep["replicas"])
    assert len(set(where.values())) >= 2, f"replicas not spread over nodes: {where}"


def test_add_and_rm_ten_across_nodes(swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    # Two names Swarm takes as no service name ('.', a trailing '_') are mapped, not refused.
    names = [f"S{i}" for i in range(10, 18)] + ["S.18", "S19_"]
    before = cluster.rep(session)["replicas"]
    try:
        reply = session.post(cluster.url + "/add", json={"n": 10, "hostnames": names},
                             timeout=120)
        assert reply.status_code == 200, reply.text
        added = reply.json()["message"]
        assert added == {"N": 13, "replicas": [*before, *names]}
        assert set(cluster.replica_services()) == set(added["replicas"])  # service ls agrees
        where = wait_until("13 replica services running", settled(cluster, 13))
        assert set(where.values()) == {"manager", "worker1", "worker2"}, where
        # Each entry's failure domain is its task's node (the node's hostname): what the
        # balancers' retries spread over.
        status = session.get(cluster.url + "/_lb/status.json", timeout=10).json()["message"]
        domains = {r["hostname"]: r["domain"] for r in status["replicas"]}
        assert domains == {h: f"{cluster.name}-{node}" for h, node in where.items()}, domains
        assert cluster.serving(session, 300) == set(added["replicas"])  # every one answers

        reply = session.delete(cluster.url + "/rm", json={"n": 10, "hostnames": names[:5]},
                               timeout=120)
        assert reply.status_code == 200, reply.text
        left = reply.json()["message"]
        assert left["N"] == 3 and not set(names[:5]) & set(left["replicas"])
        # The leading supervisor stops them (the balancer only wrote the wanted state to etcd).
        wait_until("docker service ls agreeing with /rm",
                   lambda: set(cluster.replica_services()) == set(left["replicas"]))
        assert cluster.rep(session) == left
    finally:
        cluster.scale_to(REPLICAS)  # as the next test expects it, even after a failure


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
        back_s = wait_whole(cluster)  # its etcd member and balancer come back with it
    report("swarm-drain", whole_again_s=back_s, node=node, replicas_moved=len(leaving), moved_s=moved,
           serving_s=serving, requests=load.sent, failed=len(load.failures))
    assert len(new) == len(leaving)
    no_failures(cluster, load)


# What the manager's balancer counts while a node stops (``Cluster.counter``).
ROUTING_COUNTERS = {"retries": "lb_retries_total", "unreachable": "lb_upstream_unreachable_total",
                    "exhausted": "lb_exhausted_total", "hedges_won": "lb_hedges_won_total"}
TRIES = 3  # 1 + LB_RETRIES, the stack's default


def _most_replicas_on_one_worker(cluster: Cluster, more: int) -> tuple[str, dict[str, str]]:
    """``more`` replicas added, all on the worker that ran the fewest of the three (so at least
    two run elsewhere): the other nodes paused meanwhile (a paused node keeps its tasks but is
    given no new one). That worker and the placement."""
    where = wait_until("replicas running", settled(cluster, REPLICAS))
    node = min(("worker1", "worker2"), key=lambda w: sum(at == w for at in where.values()))
    others = [other for other in NODES if other != node]
    try:
        for other in others:
            _set_availability(cluster, other, "pause")
        reply = http_session().post(cluster.url + "/add", json={"n": more}, timeout=120)
        assert reply.status_code == 200, reply.text
        where = wait_until(f"{REPLICAS + more} replicas running",
                           settled(cluster, REPLICAS + more))
    finally:
        for other in others:
            _set_availability(cluster, other, "active")
    return node, where


def test_node_stopped_under_load_no_failed_request(swarm_cluster: Cluster) -> None:
    """The node that runs most replicas, not all, stops outright (its container stopped: its
    engine and every task on it gone at once, nothing closes a connection) while 4 keep-alive
    clients send GETs through the manager's balancer, whose node stays up. It runs at least
    1 + LB_RETRIES of the 6 replicas, so in ring order alone all the tries of some keys would
    land on it; retries go to other nodes first, so no request fails as long as a replica on
    another node is alive. A request sent on a kept-alive connection to the lost node is
    hedged to another once its hedge deadline passes, or retried once its host has not acknowledged it within LB_CONNECT_TIMEOUT (TCP_USER_TIMEOUT;
    before, it waited LB_UPSTREAM_TIMEOUT, 5 s); one in flight as the node stopped still waits
    that long, so no request may take longer than one upstream deadline and the tries after it.
    The lost replicas are replaced on the nodes left, and the node comes back."""
    cluster, session = swarm_cluster, http_session()
    host = docker.from_env(timeout=60)
    node = "worker1"
    try:
        node, before = _most_replicas_on_one_worker(cluster, 3)
        leaving = {name for name, where in before.items() if where == node}
        assert len(leaving) >= TRIES and set(before) - leaving, (node, before)
        node_id = cluster.node_id(node)
        counted = {k: cluster.counter("manager", name) for k, name in ROUTING_COUNTERS.items()}
        load = Load(cluster.url, total=1600, seconds=20, threads=4).start()
        try:
            time.sleep(3)
            began = time.monotonic()
            host.containers.get(f"{cluster.name}-{node}").stop(timeout=0)
            n = len(before)
            rep = wait_until(f"replicas of stopped {node} replaced in /rep",
                             lambda: not leaving & set((r := cluster.rep(session))["replicas"])
                             and r["N"] == n and r)
            detected = time.monotonic() - began
            new = set(rep["replicas"]) - set(before)
            wait_until(f"{new} serving", lambda: new <= cluster.serving(session, 90))
            serving = time.monotonic() - began
            wait_until(f"{node} down for the manager",
                       lambda: cluster.client().api.inspect_node(node_id)["Status"]["State"]
                       == "down")
            node_down = time.monotonic() - began
            where = wait_until(f"{n} replicas running elsewhere",
                               settled(cluster, n, gone=leaving, off=node))
        finally:
            load.wait()  # bounded: at most its 20 s, also when a check above failed
        used = {k: cluster.counter("manager", name) - counted[k]
                for k, name in ROUTING_COUNTERS.items()}
    finally:
        host.containers.get(f"{cluster.name}-{node}").start()  # it rejoins the swarm
        host.close()
        back_s = wait_whole(cluster)
        cluster.scale_to(REPLICAS)
    slowest_before = max((took for at, took in load.timings if at < began), default=0.0)
    # Requests slower than 1 s: when each began, from the stop (in flight then: negative).
    slow = sorted((round(at - began, 1), round(took, 1)) for at, took in load.timings if took > 1)
    report("swarm-stop-node", node=node, whole_again_s=back_s, replicas=len(before),
           replicas_lost=len(leaving), detected_s=detected, serving_s=serving,
           manager_saw_down_by_s=node_down, requests=load.sent, failed=len(load.failures),
           **used, slowest_before_stop_s=slowest_before,
           slowest_after_stop_s=load.slowest(since=began), over_1s=slow,
           now_on=sorted(set(where.values())))
    no_failures(cluster, load)
    assert load.ok == load.sent
    assert used["exhausted"] == 0, used
    # Requests met the lost node (else the test showed nothing) and another node answered them:
    # a hedge to the next candidate once its deadline passed (usually first: tens of ms), or a
    # retry once the lost host had not acknowledged the request (TCP_USER_TIMEOUT, 0.5 s).
    assert used["hedges_won"] + used["retries"] >= 1, used
    # The design's bound, with a generous margin: one LB_UPSTREAM_TIMEOUT (5 s) for a request
    # in flight to the lost node as it stopped, then a connect (LB_CONNECT_TIMEOUT, 0.5 s) at
    # most per further try, and the answer. (Measured: 0.5-1.0 s.)
    assert max(took for _, took in load.timings) < 15.0, slow


def _one_or_two_replicas_on(cluster: Cluster, node: str, n: int) -> tuple[dict[str, str], int]:
    """Replicas placed so that ``node`` runs one or two of them (never all three a request may
    try: 1 + LB_RETRIES): replicas added or removed until so. The placement and their count."""
    session = http_session()
    cluster.scale_to(n)
    for _ in range(6):
        where = wait_until(f"{n} replicas running", settled(cluster, n))
        on_node = sorted(name for name, at in where.items() if at == node)
        if 1 <= len(on_node) <= 2:
            return where, n
        if on_node:  # too many there: one fewer
            reply = session.delete(cluster.url + "/rm", json={"n": 1, "hostnames": on_node[:1]},
                                   timeout=120)
            n -= 1
        else:  # none: Swarm puts the next where the fewest tasks run, so add until one is
            reply = session.post(cluster.url + "/add", json={"n": 1}, timeout=120)
            n += 1
        assert reply.status_code == 200, reply.text
    raise AssertionError(f"could not get one or two replicas on {node}: {where}")


def test_leaders_node_stopped_no_failed_request_standby_leads(swarm_cluster: Cluster) -> None:
    """The node running the leading supervisor, one balancer, one etcd member and some replicas
    stops outright: clients of another node's balancer see no failed request, the standby
    supervisor leads, the lost replicas are replaced on the nodes left, and the balancers left
    still agree on every key."""
    cluster = swarm_cluster
    victim = cluster.leader()
    assert victim in NODES, victim
    others = [node for node in NODES if node != victim]
    cluster.control = others[0]  # a manager that stays up answers for the swarm from here on
    host = docker.from_env(timeout=60)
    try:
        before, n = _one_or_two_replicas_on(cluster, victim, 5)
        leaving = {name for name, at in before.items() if at == victim}
        keys = [f"user{i}" for i in range(30)]
        assert routed(cluster, others[1], keys) == routed(cluster, others[0], keys)
        session = http_session()
        load = Load(cluster.url_of(others[0]), total=2000, seconds=25, threads=6).start()
        time.sleep(3)
        began = time.monotonic()
        host.containers.get(f"{cluster.name}-{victim}").stop(timeout=0)
        new_leader = wait_until("the standby supervisor leading",
                                lambda: (lead := leader_if_known(cluster)) not in (None, victim)
                                and lead, timeout=60)
        leads_s = time.monotonic() - began
        rep = wait_until(f"replicas of stopped {victim} replaced in /rep",
                         lambda: not leaving & set((r := cluster.rep(session))["replicas"])
                         and r["N"] == n and r)
        replaced_s = time.monotonic() - began
        new = set(rep["replicas"]) - set(before)
        wait_until(f"{new} serving", lambda: new <= cluster.serving(session, 60))
        serving_s = time.monotonic() - began
        where = wait_until("replicas running elsewhere",
                           settled(cluster, n, gone=leaving, off=victim))
        load.wait()
        # The other balancer left saw it all alike: same replicas, same key -> replica.
        assert (session.get(cluster.url_of(others[1]) + "/rep", timeout=30).json()["message"]
                == cluster.rep(session))
        assert routed(cluster, others[1], keys) == routed(cluster, others[0], keys)
        members = cluster.etcdctl("endpoint", "health", "--cluster", check=False)
    finally:
        host.containers.get(f"{cluster.name}-{victim}").start()  # it rejoins the swarm
        host.close()
        back_s = wait_whole(cluster)
        cluster.control = "manager"
        cluster.scale_to(REPLICAS)
    report("swarm-stop-leaders-node", node=victim, new_leader=new_leader, leads_s=leads_s,
           replicas=n, replicas_lost=len(leaving), replaced_in_rep_s=replaced_s,
           serving_s=serving_s, requests=load.sent, failed=len(load.failures),
           now_on=sorted(set(where.values())), etcd_healthy_left=members.count("is healthy"),
           whole_again_s=back_s)
    no_failures(cluster, load)
    assert load.ok == load.sent
    assert new_leader in others


def test_swarm_down_removes_the_stack_and_every_replica(swarm_cluster: Cluster) -> None:
    cluster, session = swarm_cluster, http_session()
    reply = session.post(cluster.url + "/add", json={"n": 2}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert len(cluster.replica_services()) == 5
    try:
        began = time.monotonic()
        proc = cluster.make("swarm-down", timeout=400,  # past SWARM_WAIT: its own message first
                            env={"DOCKER_HOST": cluster.socket("manager")})
        down_s = time.monotonic() - began
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "etcd volumes of" in proc.stdout, proc.stdout + proc.stderr
        api = cluster.client().api
        assert api.services() == []  # the stack's and every replica, the clean-up job too
        assert api.networks(names=["net1"]) == []
        for node in NODES:  # each etcd member's volume, on its own node
            volumes = cluster.client(node).api.volumes(
                filters={"label": f"com.docker.stack.namespace={cluster.stack}"})["Volumes"]
            assert not volumes, (node, [v["Name"] for v in volumes])
    finally:
        # The cluster is shared: the stack goes back for whoever uses it next (a fresh
        # registry), also when the checks above failed.
        began = time.monotonic()
        proc = cluster.make("swarm-up", timeout=400,
                            env={"DOCKER_HOST": cluster.socket("manager"), **STACK_SETTINGS})
        up_s = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_whole(cluster)
    assert cluster.rep(session) == {"N": 3, "replicas": ["Server1", "Server2", "Server3"]}
    report("swarm-down-up", down_s=down_s, up_s=up_s)


def test_a_cluster_left_broken_is_put_back_for_the_next_test(swarm_cluster: Cluster) -> None:
    """What ``conftest.swarm_cluster`` does after every test: a worker's container stopped, a
    replica more and ``control`` moved are put back (and reported), and the stack is whole."""
    cluster, session = swarm_cluster, http_session()
    cluster.control = "worker1"
    cluster.scale_to(REPLICAS + 1)
    node_id = cluster.node_id("worker2")
    host = docker.from_env(timeout=60)
    try:
        host.containers.get(f"{cluster.name}-worker2").stop(timeout=0)
    finally:
        host.close()
    def seen_down() -> bool:  # (the managers' raft may time out while it loses a member)
        node = answer(lambda: cluster.client().api.inspect_node(node_id))
        return node is not None and node["Status"]["State"] == "down"

    # As a test that left it stopped would: seen down by the swarm before the next test.
    wait_until("worker2 down for the managers", seen_down)
    began = time.monotonic()
    fixed = cluster.restore()
    report("swarm-restore", put_back_s=time.monotonic() - began, fixed=len(fixed))
    assert fixed == ["control on worker1", "node worker2 exited", f"{REPLICAS + 1} replicas"]
    assert cluster.whole() is None
    assert cluster.rep(session)["N"] == REPLICAS
    assert cluster.restore() == []  # nothing left to put back
