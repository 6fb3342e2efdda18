"""The test cluster: a Docker Swarm of three nodes, each a container with its own engine and
each a swarm manager (``make cluster-up``; the nodes are named ``manager``, which made the
swarm, ``worker1`` and ``worker2``), the stack deployed, each node's balancer on a loopback port.

One cluster serves the whole test session (``conftest.swarm_cluster_session``), and only that
fixture's teardown takes it down (``make cluster-down``), also when the session is interrupted:
a Ctrl-C raises KeyboardInterrupt in pytest, which still runs the session's finalizers, and the
cluster is made inside the generator's ``try`` so one interrupted while it is made (or a test
timeout striking then) is taken down too. No test removes what another still needs: each test
gets the cluster through ``conftest.swarm_cluster``, which puts it back as every test finds it
(``Cluster.restore``) and fails the test that left it otherwise, so the tests pass in any order
and any subset. The nodes, network and volumes carry their run's owner (pid and start time): a
run killed outright (SIGKILL, or a second Ctrl-C during the teardown) leaves its cluster to the
next run, which removes a cluster whose owner is gone, even with its nodes still running
(``tests/test_swarm_cluster.py`` shows the Ctrl-C and the SIGKILL cases). Everything else
about it is read through the engines' API: a manager's (``Cluster.control``) for services,
tasks and nodes, a node's own for the containers it runs.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from lb.backends.docker import LABEL_DEPLOYMENT, LABEL_HOSTNAME, LABEL_ROLE
from lb.backends.swarm import is_live
from lb.ha import free_port_run

ROOT = Path(__file__).resolve().parent.parent
NODE_IMAGE = "hashlb-node:latest"  # swarm.mk's NODE_IMAGE, which the tests keep
CLUSTER_LABEL = "hashlb.cluster"  # ci/cluster.sh labels all a cluster makes with its name
OWNER_LABEL = "hashlb.cluster.owner"  # ... and with who made it (CLUSTER_OWNER)
NODES = ("manager", "worker1", "worker2")  # all three swarm managers (CLUSTER_MANAGERS=3)
TEST_CLUSTER_PREFIX = "hlbs"  # the tests' clusters; a user's own (make cluster-up) are never touched
UP_TIMEOUT = 900  # seconds: a first run builds the node image (Debian's docker.io) too
RECOVERY_TIMEOUT = 90.0  # seconds; a replacement normally serves within a few
WHOLE_TIMEOUT = 180.0  # seconds for a stopped node to be back with all of its stack's tasks
REPLICAS = 3  # what every test finds: the stack's default N
# The stack's settings for the tests: Maglev spreads random keys evenly, so every replica gets
# requests (the spec's hash sends 96 % to one), and a start timeout with room for a busy machine.
# A request with ``?key=K`` is routed by K (one without falls back to a random key), so the
# balancers of all nodes can be compared on where they send one key.
STACK_SETTINGS = {"LB_STRATEGY": "maglev", "LB_START_TIMEOUT": "45", "LB_N": "3",
                  "LB_HASH_KEY": "query:key"}


def owner_of_this_run() -> str:
    """``<pid>:<start time>`` of this process: what its clusters are labelled with."""
    return f"{os.getpid()}:{int(psutil.Process().create_time())}"


def owner_alive(owner: str) -> bool:
    pid, _, started = owner.partition(":")
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started)
    except (ValueError, psutil.Error):
        return False


def other_free_ports(first: int, count: int) -> list[int]:
    """``first`` and ``count - 1`` more free loopback ports, all different."""
    ports = [first]
    while len(ports) < count:
        port = free_port_run(1)  # below the ephemeral range: no client's socket takes it
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class Cluster:
    name: str
    folder: Path
    port: int  # the manager's balancer on the host, and the port every node publishes
    ports: dict[str, int] = field(default_factory=dict)  # node -> its balancer on the host
    deployment: str = "hashlb"
    stack: str = "hashlb"
    control: str = "manager"  # the node whose engine client() asks by default: a live manager
    _clients: dict[str, docker.DockerClient] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The balancer of the node ``control`` names (the manager's unless a test moved it)."""
        return self.url_of(self.control)

    def url_of(self, node: str) -> str:
        """The balancer on ``node``, from here."""
        return f"http://127.0.0.1:{self.ports.get(node, self.port)}"

    def socket(self, node: str = "manager") -> str:
        return f"unix://{self.folder}/{node}/docker.sock"

    def client(self, node: str | None = None) -> docker.DockerClient:
        node = node or self.control
        if node not in self._clients:
            self._clients[node] = docker.DockerClient(base_url=self.socket(node), timeout=60)
        return self._clients[node]

    def make(self, *targets: str, timeout: float = UP_TIMEOUT,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        ports = " ".join(str(self.ports.get(node, self.port)) for node in NODES)
        variables = [f"CLUSTER={self.name}", f"CLUSTER_DIR={self.folder}",
                     f"LB_PUBLISH_PORT={self.port}", f"CLUSTER_PORTS={ports}",
                     f"CLUSTER_OWNER={owner_of_this_run()}", f"STACK={self.stack}",
                     f"LB_DEPLOYMENT={self.deployment}"]
        return subprocess.run(["make", "-s", *targets, *variables], cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout, check=False,
                              env={**os.environ, **(env or {})})

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # -- what the swarm runs ----------------------------------------------------------------
    def nodes(self) -> dict[str, dict[str, Any]]:
        """Node id -> the node, as the manager sees it."""
        return {n["ID"]: n for n in self.client().api.nodes()}

    def node_id(self, node: str) -> str:
        want = f"{self.name}-{node}"
        return next(i for i, n in self.nodes().items() if n["Description"]["Hostname"] == want)

    def replica_services(self) -> dict[str, dict[str, Any]]:
        """Hostname -> the replica's service, for this deployment."""
        services = self.client().api.services(filters={"label": [
            f"{LABEL_DEPLOYMENT}={self.deployment}", f"{LABEL_ROLE}=replica"]})
        return {s["Spec"]["Labels"][LABEL_HOSTNAME]: s for s in services}

    def placement(self) -> dict[str, str]:
        """Hostname -> the node (``manager``, ``worker1``, ...) whose task runs it now."""
        names = {i: n["Description"]["Hostname"].removeprefix(self.name + "-")
                 for i, n in self.nodes().items()}
        services = {s["ID"]: h for h, s in self.replica_services().items()}
        where = {}
        for task in self.client().api.tasks(filters={"desired-state": "running"}):
            hostname = services.get(task.get("ServiceID", ""))
            if hostname and is_live(task) and task["Status"]["State"] == "running":
                where[hostname] = names.get(task.get("NodeID", ""), "?")
        return where

    def replica_container(self, hostname: str, node: str) -> Any:
        (container,) = self.client(node).containers.list(
            filters={"label": [f"{LABEL_HOSTNAME}={hostname}",
                               f"{LABEL_DEPLOYMENT}={self.deployment}"]})
        return container

    def task_nodes(self, service: str) -> dict[str, str]:
        """Container id -> the node (``manager``, ...) for the running tasks of the stack's
        ``service`` (``lb``, ``supervisor``, ``etcd1``, ...)."""
        names = {i: n["Description"]["Hostname"].removeprefix(self.name + "-")
                 for i, n in self.nodes().items()}
        found = {}
        for task in self.client().api.tasks(filters={"service": f"{self.stack}_{service}",
                                                     "desired-state": "running"}):
            status = task["Status"]
            if status["State"] == "running":
                container = status.get("ContainerStatus", {}).get("ContainerID", "")
                found[container] = names.get(task.get("NodeID", ""), "?")
        return found

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """``etcdctl ARGS`` in a running etcd member of the stack (on a node that answers); its
        output (with ``check=False`` also when it exits non-zero, e.g. a member unhealthy)."""
        said = ""
        for member in ("etcd1", "etcd2", "etcd3"):
            try:
                for container, node in self.task_nodes(member).items():
                    run = self.client(node).containers.get(container).exec_run(
                        ["etcdctl", "--command-timeout=3s", *args])
                    said = run.output.decode()
                    if run.exit_code == 0 or not check:
                        return said
            except (docker.errors.DockerException, requests.RequestException):
                continue  # that node is down: its engine's socket is gone
        raise AssertionError(f"no etcd member answered etcdctl {' '.join(args)}: {said}")

    def leader(self) -> str | None:
        """The node whose supervisor leads (the leader key holds
        ``supervisor-<node's hostname>:<pid>``), or None."""
        said = self.etcdctl("get", "--print-value-only",
                            f"/hashlb/{self.deployment}/leader").strip()
        if not said:
            return None
        return said.partition(":")[0].removeprefix(f"supervisor-{self.name}-")

    def whole(self) -> str | None:
        """None when the stack is whole again: every node ready, three etcd members healthy,
        a balancer serving on every node, two supervisors running and one leading; else what
        is missing."""
        try:
            states = [n["Status"]["State"] for n in self.nodes().values()]
            if states.count("ready") != len(NODES):
                return f"nodes {states}"
            health = self.etcdctl("endpoint", "health", "--cluster", check=False)
            if health.count("is healthy") != 3:
                return f"etcd: {health}"
            if sorted(self.task_nodes("lb").values()) != sorted(NODES):
                return f"balancers on {self.task_nodes('lb')}"
            if len(set(self.task_nodes("supervisor").values())) != 2:
                return f"supervisors on {self.task_nodes('supervisor')}"
            if self.leader() is None:
                return "no supervisor leads"
            session = http_session()
            for node in NODES:
                session.get(self.url_of(node) + "/rep", timeout=5).raise_for_status()
        except (AssertionError, OSError, docker.errors.DockerException,
                requests.RequestException) as exc:
            return repr(exc)
        return None

    def balancer_trouble(self, since: float) -> list[str]:
        """The balancer's log lines at WARNING and above since ``since`` (a Unix time), each
        with its traceback: what a failed request's test shows of the balancer's side."""
        try:
            (service,) = self.client().api.services(filters={"name": f"{self.stack}_lb"})
            raw = self.client().api.service_logs(service["ID"], stdout=True, stderr=True,
                                                 since=int(since))
            lines = b"".join(raw).decode("utf-8", "replace").splitlines()
        except (docker.errors.DockerException, ValueError) as exc:  # ValueError: no service
            return [f"(the balancer's log could not be read: {exc!r})"]
        from tests.conftest import trouble

        return trouble(lines)

    # -- what the balancer says -------------------------------------------------------------
    def rep(self, session: requests.Session) -> dict[str, Any]:
        reply = session.get(self.url + "/rep", timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()["message"]

    def counter(self, node: str, name: str) -> float:
        """The sum of counter ``name``'s samples (every label, every worker) in ``/_lb/metrics``
        of ``node``'s balancer."""
        reply = http_session().get(self.url_of(node) + "/_lb/metrics", timeout=10)
        assert reply.status_code == 200, reply.text
        return sum(sample.value for family in text_string_to_metric_families(reply.text)
                   for sample in family.samples if sample.name == name)

    def serving(self, session: requests.Session, requests_: int = 60) -> set[str]:
        """The replicas seen answering through the balancer in ``requests_`` GETs."""
        seen = set()
        for _ in range(requests_):
            reply = session.get(self.url + "/home", timeout=30)
            if reply.status_code == 200:
                seen.add(reply.headers.get("X-Served-By", "?"))
        return seen


    def scale_to(self, n: int) -> None:
        """``n`` replicas in the wanted state: ``/add`` or ``/rm`` through the balancer (the
        leading supervisor then starts or stops their services)."""
        session = http_session()
        have = self.rep(session)["N"]
        if have < n:
            reply = session.post(self.url + "/add", json={"n": n - have}, timeout=120)
        elif have > n:
            reply = session.delete(self.url + "/rm", json={"n": have - n}, timeout=120)
        else:
            return
        assert reply.status_code == 200, reply.text

    # -- what every test finds --------------------------------------------------------------
    def restore(self) -> list[str]:
        """Put the cluster back as every test finds it, and say what was not so: ``control`` on
        the manager, every node's container running and the node active, the stack deployed,
        the stack whole (``whole``; not being whole yet is not counted: it follows the rest),
        ``REPLICAS`` replicas with ``docker service ls`` agreeing. AssertionError when it
        cannot be put back."""
        fixed = []
        if self.control != "manager":
            fixed.append(f"control on {self.control}")
            self.control = "manager"
        host = docker.from_env(timeout=60)
        try:
            for node in NODES:
                container = host.containers.get(f"{self.name}-{node}")
                if container.status != "running":
                    fixed.append(f"node {node} {container.status}")
                    container.start()  # it rejoins the swarm
        finally:
            host.close()
        # Right after a node's restart the managers may still be electing a raft leader.
        nodes = wait_until("the swarm's managers answering", lambda: answer(self.nodes))
        api = self.client().api
        for node_id, node in nodes.items():
            if node["Spec"]["Availability"] != "active":
                name = node["Description"]["Hostname"].removeprefix(self.name + "-")
                fixed.append(f"node {name} {node['Spec']['Availability']}")
                api.update_node(node_id, node["Version"]["Index"],
                                {**node["Spec"], "Availability": "active"})
        services = {s["Spec"]["Name"] for s in api.services(
            filters={"label": f"com.docker.stack.namespace={self.stack}"})}
        if not {f"{self.stack}_lb", f"{self.stack}_supervisor"} <= services:
            fixed.append(f"stack {self.stack} not deployed (services: {sorted(services)})")
            proc = self.make("swarm-up", timeout=400,
                             env={"DOCKER_HOST": self.socket("manager"), **STACK_SETTINGS})
            assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_whole(self)
        session = http_session()
        n = self.rep(session)["N"]
        if n != REPLICAS:
            fixed.append(f"{n} replicas")
            self.scale_to(REPLICAS)
        wait_until(f"{REPLICAS} replicas, docker service ls agreeing",
                   lambda: len(names := self.rep(session)["replicas"]) == REPLICAS
                   and set(self.replica_services()) == set(names))
        return fixed


def http_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy from the environment
    return session


def answer(call: Callable[[], Any]) -> Any:
    """What ``call()`` returns, or None while the engine it asks does not answer."""
    try:
        return call()
    except (docker.errors.DockerException, requests.RequestException):
        return None


def wait_until(what: str, check: Callable[[], Any], timeout: float = RECOVERY_TIMEOUT,
               interval: float = 0.2) -> Any:
    """Poll ``check`` every ``interval`` seconds until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def wait_whole(cluster: Cluster, timeout: float = WHOLE_TIMEOUT) -> float:
    """Wait until the stack is whole again (``Cluster.whole``); the seconds it took."""
    began = time.monotonic()
    missing: list[str | None] = [None]

    def check() -> bool:
        missing[0] = cluster.whole()
        return missing[0] is None
    try:
        wait_until("the stack whole again", check, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {missing[0]}") from None
    return time.monotonic() - began


def new_cluster(free_port: int) -> Cluster:
    """A cluster under a fresh name, not made yet: the manager's balancer to be published on
    ``free_port``, the others' on other free ports."""
    name = f"{TEST_CLUSTER_PREFIX}{uuid.uuid4().hex[:6]}"
    ports = dict(zip(NODES, other_free_ports(free_port, len(NODES)), strict=True))
    return Cluster(name, Path("/tmp") / name, free_port, ports)


def make_cluster_up(cluster: Cluster, settings: dict[str, str] | None = None,
                    ) -> subprocess.CompletedProcess[str]:
    """``make cluster-up`` of ``cluster``, the stack with ``settings`` (LB_* variables)."""
    began = time.monotonic()
    proc = cluster.make("cluster-up", env=settings or STACK_SETTINGS)
    print(f"\n[swarm] cluster {cluster.name} up in {time.monotonic() - began:.0f}s "
          f"(exit {proc.returncode})", flush=True)
    return proc


def start_cluster(free_port: int, settings: dict[str, str] | None = None,
                  ) -> tuple[Cluster, subprocess.CompletedProcess[str]]:
    """``make cluster-up`` under a fresh name (``new_cluster``), the stack with ``settings``."""
    cluster = new_cluster(free_port)
    return cluster, make_cluster_up(cluster, settings)


def stack_up(cluster: Cluster) -> str | None:
    """``make cluster-up`` of ``cluster``, then until it is as every test finds it
    (``Cluster.restore``): None, or what failed."""
    proc = make_cluster_up(cluster)
    if proc.returncode != 0:
        return f"make cluster-up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    cluster.restore()
    return None


def one_node_up(cluster: Cluster) -> str | None:
    """``ci/cluster.sh up`` of a one-node swarm (the node ``manager``, no images, no stack):
    for tests of a cluster's own life, made in seconds. None, or what failed."""
    env = {**os.environ, "CLUSTER": cluster.name, "CLUSTER_DIR": str(cluster.folder),
           "CLUSTER_WORKERS": "0", "CLUSTER_MANAGERS": "1", "CLUSTER_PORTS": "0",
           "CLUSTER_OWNER": owner_of_this_run(), "NODE_IMAGE": NODE_IMAGE}
    proc = subprocess.run(["bash", "ci/cluster.sh", "up"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300, check=False)
    if proc.returncode != 0:
        return f"ci/cluster.sh up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return None


def remains_of(name: str) -> list[str]:
    """What the host's engine still has of cluster ``name``: containers, volumes, networks."""
    host = docker.from_env(timeout=60)
    try:
        label = f"{CLUSTER_LABEL}={name}"
        found = [f"container {c.name}" for c in host.containers.list(
            all=True, filters={"label": label})]
        found += [f"volume {v.name}" for v in host.volumes.list(filters={"label": label})]
        found += [f"network {n.name}" for n in host.networks.list(filters={"label": label})]
        return found
    finally:
        host.close()


def remove_abandoned_clusters() -> list[str]:
    """Test clusters a run killed before its teardown left: those whose owner (the run that made
    them, on their nodes', network's and volumes' label) is gone, even with nodes still running
    (or with no node yet: a run killed right after it made the network), and those without an
    owner of which no node runs. Each taken down with ``make cluster-down``. Their names."""
    alive: dict[str, bool] = {}

    def seen(labels: dict[str, str], used: bool) -> None:
        name = labels.get(CLUSTER_LABEL, "")
        if name.startswith(TEST_CLUSTER_PREFIX):
            alive[name] = alive.get(name, False) or used

    host = docker.from_env(timeout=60)
    try:
        for node in host.containers.list(all=True, filters={"label": f"{LABEL_ROLE}=node"}):
            owner = node.labels.get(OWNER_LABEL, "")
            seen(node.labels, owner_alive(owner) if owner else node.status == "running")
        owned = {"label": OWNER_LABEL}
        for thing in [*host.networks.list(filters=owned), *host.volumes.list(filters=owned)]:
            labels = thing.attrs.get("Labels") or {}
            if labels.get(OWNER_LABEL):
                seen(labels, owner_alive(labels[OWNER_LABEL]))
    finally:
        host.close()
    abandoned = sorted(name for name, used in alive.items() if not used)
    for name in abandoned:
        Cluster(name, Path("/tmp") / name, 0).make("cluster-down", timeout=300)
    return abandoned


def running_cluster(free_port: int, up: Callable[[Cluster], str | None] = stack_up,
                    ) -> Iterator[Cluster]:
    """A session's cluster (a generator for a fixture): clusters abandoned by earlier runs
    removed, a new one made by ``up`` (by default the three nodes and the stack); taken down
    when the generator is closed, or when making it fails or is interrupted (KeyboardInterrupt,
    a test's timeout)."""
    from tests.conftest import unavailable

    left = remove_abandoned_clusters()
    if left:
        print(f"\n[swarm] removed clusters left by an earlier run: {', '.join(left)}")
    cluster = new_cluster(free_port)
    try:
        failed = up(cluster)
        if failed:
            unavailable(failed)
        yield cluster
    finally:
        cluster.close()
        proc = cluster.make("cluster-down", timeout=300)
        left = remains_of(cluster.name)
        if proc.returncode != 0 or left:
            print(f"\n[swarm] make cluster-down of {cluster.name} left {left}: "
                  f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}", flush=True)
