"""The test cluster: a Docker Swarm of a manager and two workers, each a container with its own
engine (``make cluster-up``), the stack deployed, the balancer on a loopback port.

One cluster serves the whole test session (``conftest.swarm_cluster``); its last user,
``test_swarm.test_cluster_down_leaves_nothing``, takes it down with ``make cluster-down`` and
checks that nothing of it is left. Everything else about it is read through the engines' API:
the manager's for services, tasks and nodes, a worker's for the containers it runs.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import requests

from lb.backends.docker import LABEL_DEPLOYMENT, LABEL_HOSTNAME, LABEL_ROLE
from lb.backends.swarm import is_live

ROOT = Path(__file__).resolve().parent.parent
NODE_IMAGE = "hashlb-node:latest"  # swarm.mk's NODE_IMAGE, which the tests keep
CLUSTER_LABEL = "hashlb.cluster"  # ci/cluster.sh labels all a cluster makes with its name
TEST_CLUSTER_PREFIX = "hlbs"  # the tests' clusters; a user's own (make cluster-up) are never touched
UP_TIMEOUT = 900  # seconds: a first run builds the node image (Debian's docker.io) too
# The stack's settings for the tests: Maglev spreads random keys evenly, so every replica gets
# requests (the spec's hash sends 96 % to one), and a start timeout with room for a busy machine.
STACK_SETTINGS = {"LB_STRATEGY": "maglev", "LB_START_TIMEOUT": "45", "LB_N": "3"}


@dataclass
class Cluster:
    name: str
    folder: Path
    port: int
    deployment: str = "hashlb"
    stack: str = "hashlb"
    removed: bool = False
    _clients: dict[str, docker.DockerClient] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def socket(self, node: str = "manager") -> str:
        return f"unix://{self.folder}/{node}/docker.sock"

    def client(self, node: str = "manager") -> docker.DockerClient:
        if node not in self._clients:
            self._clients[node] = docker.DockerClient(base_url=self.socket(node), timeout=60)
        return self._clients[node]

    def make(self, *targets: str, timeout: float = UP_TIMEOUT,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        variables = [f"CLUSTER={self.name}", f"CLUSTER_DIR={self.folder}",
                     f"LB_PUBLISH_PORT={self.port}", f"STACK={self.stack}",
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

    def serving(self, session: requests.Session, requests_: int = 60) -> set[str]:
        """The replicas seen answering through the balancer in ``requests_`` GETs."""
        seen = set()
        for _ in range(requests_):
            reply = session.get(self.url + "/home", timeout=30)
            if reply.status_code == 200:
                seen.add(reply.headers.get("X-Served-By", "?"))
        return seen


def http_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy from the environment
    return session


def start_cluster(free_port: int, settings: dict[str, str] | None = None,
                  ) -> tuple[Cluster, subprocess.CompletedProcess[str]]:
    """``make cluster-up`` under a fresh name, the stack with ``settings`` (LB_* variables)."""
    name = f"{TEST_CLUSTER_PREFIX}{uuid.uuid4().hex[:6]}"
    cluster = Cluster(name, Path("/tmp") / name, free_port)
    began = time.monotonic()
    proc = cluster.make("cluster-up", env=settings or STACK_SETTINGS)
    print(f"\n[swarm] cluster {name} up in {time.monotonic() - began:.0f}s "
          f"(exit {proc.returncode})", flush=True)
    return cluster, proc


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
    """Test clusters of which no node runs (a run killed before its teardown left them, and a
    run still using its cluster has its manager running): each taken down with ``make
    cluster-down``. Their names."""
    host = docker.from_env(timeout=60)
    try:
        running: dict[str, bool] = {}
        for node in host.containers.list(all=True, filters={"label": f"{LABEL_ROLE}=node"}):
            name = node.labels.get(CLUSTER_LABEL, "")
            if name.startswith(TEST_CLUSTER_PREFIX):
                running[name] = running.get(name, False) or node.status == "running"
    finally:
        host.close()
    abandoned = sorted(name for name, alive in running.items() if not alive)
    for name in abandoned:
        Cluster(name, Path("/tmp") / name, 0).make("cluster-down", timeout=300)
    return abandoned


def running_cluster(free_port: int) -> Iterator[Cluster]:
    from tests.conftest import unavailable

    left = remove_abandoned_clusters()
    if left:
        print(f"\n[swarm] removed clusters left by an earlier run: {', '.join(left)}")
    cluster, proc = start_cluster(free_port)
    try:
        if proc.returncode != 0:
            unavailable(f"make cluster-up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        yield cluster
    finally:
        cluster.close()
        if not cluster.removed:
            cluster.make("cluster-down", timeout=300)
