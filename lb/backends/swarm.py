"""Replicas as services of a Docker Swarm (docker SDK, talking to a manager's engine).

Each replica is a service of one task, named after its hostname, on ``settings.network`` (an
attachable overlay network) with ``--endpoint-mode dnsrr``: the service name resolves to the
task's own address on that network, so no virtual IP (and no IPVS) is needed. The services get
restart condition *none*: a dead replica is the supervisor's to replace (new hostname, same
server id and slots), and Swarm respawning it too would race with it. Limits and capabilities
are the docker backend's (``lb.backends.docker``); the handle is the service id.

Placement is Swarm's: its scheduler puts each new task on the eligible node running the fewest
tasks, which spreads the one-task replica services over the nodes (a ``spread`` placement
preference would change nothing: it only balances the tasks of one service).
``LB_SWARM_CONSTRAINTS`` narrows the eligible nodes, e.g. to ``node.labels.role==replicas``.

A replica counts as running while its task is wanted running and has not ended: a task that
failed, a task on a node that went down (the manager then wants it shut down) and a task on a
node being drained all stop counting, and the supervisor replaces the replica wherever Swarm
can place the new service.

Each replica's failure domain is its task's node (the node's hostname): a task never moves, so
it holds for the replica's life, and the balancer's retries go to other nodes first.

A node that stops outright keeps looking ready to the manager until it misses a few heartbeats
(seconds), and the scheduler likes it then: its tasks are gone, so it runs the fewest. So a
node on which a stopped replica's task did not end within the stop's timeout is *suspect* for
``SUSPECT_SECONDS``: new replicas are kept off it while another ready node is left.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
from docker import errors as docker_errors
from docker.types import (
    ContainerSpec,
    DriverConfig,
    EndpointSpec,
    Healthcheck,
    NetworkAttachmentConfig,
    Placement,
    Resources,
    RestartPolicy,
    TaskTemplate,
)
from docker.utils import parse_bytes

from lb.backends.base import STOP_TIMEOUT, Backend, BackendError, Instance, ReplicaSpec
from lb.backends.docker import (
    CAP_DROP,
    FAILURES,
    LABEL_DEPLOYMENT,
    LABEL_HOSTNAME,
    LABEL_ROLE,
    LABEL_SERVER_ID,
    LOG_ROTATION,
    PIDS_LIMIT,
    REPLICA_PORT,
    ROLE_REPLICA,
    Engine,
    ensure_network,
    remove_network,
)
from lb.settings import Settings

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds Swarm gives a replica between SIGTERM and SIGKILL
POLL = 0.1  # seconds between looks at a task's state while waiting for it
SUSPECT_SECONDS = 30.0  # no new replica on a node whose replica's task would not end
# How long a start waits for Swarm to put the task on a node, to learn its failure domain, when
# nothing else makes it wait (name addresses); the scheduler usually takes well under a second.
PLACEMENT_WAIT = 5.0
# Task states before and at running (https://docs.docker.com/engine/swarm/how-swarm-mode-works/
# swarm-task-states/); every other state (complete, shutdown, failed, rejected, orphaned,
# remove) means the task has ended or will not run.
LIVE_STATES = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing",
                         "ready", "starting", "running"})
# Swarm's rule for service names: a DNS label, letters and digits joined by '-' or '_'.
SERVICE_NAME_RE = re.compile(r"[a-zA-Z0-9](?:[-_]*[a-zA-Z0-9]+)*\Z")
MAX_SERVICE_NAME = 63


def service_name(hostname: str) -> str:
    """The service name for ``hostname``: the hostname itself when Swarm takes it, else (a '.'
    in it, a trailing '_') a DNS label made from it plus a digest of it, so that two hostnames
    never share a service name."""
    if len(hostname) <= MAX_SERVICE_NAME and SERVICE_NAME_RE.match(hostname):
        return hostname
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", hostname).strip("-")[:50] or "replica"
    return f"{stem}-{hashlib.sha256(hostname.encode()).hexdigest()[:8]}"


def is_live(task: dict[str, Any]) -> bool:
    """Whether a task is wanted running and has not ended."""
    return task.get("DesiredState") == "running" and _state(task) in LIVE_STATES


class SwarmBackend(Backend):
    name = "swarm"

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self.deployment = settings.deployment
        self.image = settings.image
        self.network = settings.network
        self.memory = parse_bytes(settings.replica_memory)
        self.nano_cpus = int(settings.replica_cpus * 1e9)
        self.constraints = [c.strip() for c in settings.swarm_constraints.split(",") if c.strip()]
        self.address_mode = settings.swarm_address
        self.start_timeout = settings.start_timeout
        self.engine = Engine(client)
        self._told: set[str] = set()  # handles whose failed task was logged already
        self._lock = threading.Lock()
        self._suspects: dict[str, float] = {}  # node id -> until when (time.monotonic())
        self._domains: dict[str, str] = {}  # node id -> its failure domain (its hostname)

    @property
    def api(self) -> docker.APIClient:
        return self.engine.api

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_DEPLOYMENT: self.deployment, LABEL_ROLE: ROLE_REPLICA}

    # -- the network -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """The replicas' overlay network: used as it is when one of that name exists (the
        stack's), else created attachable and labelled as this deployment's."""
        ensure_network(self.api, self.network, self.deployment, driver="overlay",
                       attachable=True)

    def release(self) -> None:
        remove_network(self.api, self.network, self.deployment)

    # -- start -----------------------------------------------------------------------------------
    def start(self, spec: ReplicaSpec) -> Instance:
        name = service_name(spec.hostname)
        try:
            self._remove_leftover(name, spec.hostname)
            service_id = self.api.create_service(
                self._task_template(spec), name=name, endpoint_spec=self._endpoint_spec(),
                labels={**self.labels, LABEL_HOSTNAME: spec.hostname,
                        LABEL_SERVER_ID: str(spec.server_id)},
            )["ID"]
            try:
                address, domain = self._address(name, service_id)
            except BaseException:
                self._remove_service(service_id)
                raise
        except FAILURES as exc:
            raise BackendError(f"cannot start replica {spec.hostname}: {exc}") from exc
        log.info("started replica %s (server id %d) as service %s at %s on node %s",
                 spec.hostname, spec.server_id, service_id[:12], address, domain or "unknown")
        return Instance(spec.hostname, service_id, address, spec.server_id, domain)

    def _task_template(self, spec: ReplicaSpec) -> TaskTemplate:
        container = ContainerSpec(
            self.image, hostname=spec.hostname, env={"SERVER_ID": str(spec.server_id)},
            labels={**self.labels, LABEL_HOSTNAME: spec.hostname,
                    LABEL_SERVER_ID: str(spec.server_id)},
            cap_drop=CAP_DROP, stop_grace_period=int(STOP_GRACE * 1e9),
            # Swarm keeps a task out of DNS until its health check passes (10 s with the
            # image's); readiness is the supervisor's heartbeat, so the image's check is off.
            healthcheck=Healthcheck(test=["NONE"]),
        )
        constraints = self.constraints + self._avoid_suspects()
        resources = Resources(cpu_limit=self.nano_cpus, mem_limit=self.memory)
        resources["Limits"]["Pids"] = PIDS_LIMIT  # API 1.41; the SDK has no argument for it
        return TaskTemplate(
            container, resources=resources, restart_policy=RestartPolicy(condition="none"),
            log_driver=DriverConfig("json-file", LOG_ROTATION),
            networks=[NetworkAttachmentConfig(self.network, aliases=[spec.hostname])],
            placement=Placement(constraints=constraints) if constraints else None,
        )

    def _avoid_suspects(self) -> builtins.list[str]:
        """``node.id!=...`` for each suspect node, as long as a ready node is left besides."""
        now = time.monotonic()
        with self._lock:
            self._suspects = {n: until for n, until in self._suspects.items() if until > now}
            suspects = set(self._suspects)
        if not suspects:
            return []
        ready = {n["ID"] for n in self.api.nodes()
                 if (n.get("Status") or {}).get("State") == "ready"
                 and (n.get("Spec") or {}).get("Availability") == "active"}
        if not ready - suspects:
            return []
        return [f"node.id!={n}" for n in sorted(suspects & ready)]

    def _endpoint_spec(self) -> EndpointSpec:
        endpoint = EndpointSpec(mode="dnsrr")
        if self.address_mode == "published":
            # Host mode on a port the node's engine picks (the SDK's own port syntax would
            # send target port 0 for that).
            endpoint["Ports"] = [{"Protocol": "tcp", "TargetPort": REPLICA_PORT,
                                  "PublishMode": "host"}]
        return endpoint

    def _remove_leftover(self, name: str, hostname: str) -> None:
        """A service of ours for this hostname (a dead replica not yet cleared) gives way; a
        service of that name that is not ours, or is another replica's, is never touched."""
        try:
            info = self.api.inspect_service(name)
        except docker_errors.NotFound:
            return
        if (info.get("Spec") or {}).get("Name") != name:
            return  # ``name`` matched another service's id prefix, not a name
        labels = (info.get("Spec") or {}).get("Labels") or {}
        if not self._ours(labels) or labels.get(LABEL_HOSTNAME) != hostname:
            raise BackendError(f"a service named {name} exists and is not a replica "
                               f"{hostname} of deployment {self.deployment}; not touching it")
        log.info("removing leftover service %s of replica %s", info["ID"][:12], hostname)
        self._stop_service(info["ID"], timeout=2.0)

    # -- addresses -------------------------------------------------------------------------------
    def _address(self, name: str, service_id: str) -> tuple[str, str | None]:
        """The new replica's address and failure domain (its task's node)."""
        if self.address_mode == "name":
            return f"http://{name}:{REPLICA_PORT}", self._placed(name, service_id)
        # published: known once the task runs on a node with its port bound.
        deadline = time.monotonic() + self.start_timeout
        while True:
            tasks = self.api.tasks(filters={"service": service_id})
            for task in tasks:
                address = self._published_address(task)
                if address:
                    return address, self._node_domain(task["NodeID"])
            ended = [t for t in tasks if not is_live(t)]
            if ended and len(ended) == len(tasks):
                raise BackendError(f"replica service {name} ended before running: "
                                   f"{_task_error(ended[-1])}")
            if time.monotonic() > deadline:
                raise BackendError(f"replica service {name} did not get a published port "
                                   f"within {self.start_timeout:g}s")
            time.sleep(POLL)

    def _placed(self, name: str, service_id: str) -> str | None:
        """The failure domain of the node Swarm put the service's task on, once it has; None
        when it has not within ``PLACEMENT_WAIT`` (no eligible node yet: the replica's
        heartbeat decides as always) or the task ended (``is_running`` tells the supervisor)."""
        deadline = time.monotonic() + min(self.start_timeout, PLACEMENT_WAIT)
        while True:
            tasks = self.api.tasks(filters={"service": service_id})
            node = next((t["NodeID"] for t in tasks if is_live(t) and t.get("NodeID")), None)
            if node:
                return self._node_domain(node)
            if time.monotonic() > deadline or (tasks and not any(is_live(t) for t in tasks)):
                log.info("replica service %s is on no node yet: its failure domain is unknown",
                         name)
                return None
            time.sleep(POLL)

    def _node_domain(self, node_id: str) -> str | None:
        """A node's failure domain (``domain_of_node``), looked up once per node; None when
        the node cannot be inspected (an unknown domain only costs the retries' spread)."""
        domain = self._domains.get(node_id)
        if domain is None:
            try:
                domain = domain_of_node(self.api.inspect_node(node_id))
            except FAILURES as exc:
                log.warning("cannot inspect node %s for its replicas' failure domain: %s",
                            node_id[:12], exc)
                return None
            self._domains[node_id] = domain
        return domain

    def _published_address(self, task: dict[str, Any],
                           nodes: dict[str, str | None] | None = None) -> str | None:
        if not is_live(task) or not task.get("NodeID"):
            return None
        ports = ((task.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []
        port = next((p.get("PublishedPort") for p in ports
                     if p.get("TargetPort") == REPLICA_PORT and p.get("PublishedPort")), None)
        if not port:
            return None
        host = (nodes or {}).get(task["NodeID"]) or self._node_address(task["NodeID"])
        return f"http://{host}:{port}" if host else None

    def _node_address(self, node_id: str) -> str | None:
        return self._learned(node_id, self.api.inspect_node(node_id))

    def _learned(self, node_id: str, node: dict[str, Any]) -> str | None:
        """The address ``node``'s published ports are reached at; its failure domain is kept on
        the way, so ``_node_domain`` need not ask the manager for the same node again."""
        self._domains[node_id] = domain_of_node(node)
        return _address_of_node(node)

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, handle: str, timeout: float = STOP_TIMEOUT) -> None:
        try:
            info = self.api.inspect_service(handle)
            if not self._ours((info.get("Spec") or {}).get("Labels") or {}):
                raise BackendError(f"service {handle[:12]} is not a replica of deployment "
                                   f"{self.deployment}; not stopping it")
            self._stop_service(info["ID"], timeout)
        except docker_errors.NotFound:
            return  # already gone: that is what we wanted
        except FAILURES as exc:
            raise BackendError(f"cannot stop replica service {handle[:12]}: {exc}") from exc

    def _stop_service(self, service_id: str, timeout: float) -> None:
        """Remove the service (Swarm sends its task SIGTERM, SIGKILL after ``STOP_GRACE``),
        then wait up to ``timeout`` for the task to end. A task on a node that is down never
        reports; the service is gone from the swarm all the same, and the node is suspect."""
        tasks = [t for t in self.api.tasks(filters={"service": service_id})
                 if _state(t) in LIVE_STATES]
        # Only a task the manager still wanted running can tell of a lost node: one it was
        # already shutting down (a drain) takes its grace period on a node that is fine.
        running = {t["ID"]: (t.get("NodeID") or "") if is_live(t) else "" for t in tasks}
        self._remove_service(service_id)
        deadline = time.monotonic() + timeout
        while running and time.monotonic() < deadline:
            running = {t: node for t, node in running.items() if self._task_still_running(t)}
            if running:
                time.sleep(POLL)
        for node in set(running.values()) - {""}:
            log.warning("replica service %s: its task on node %s did not end within %gs; no "
                        "new replica goes there for %gs", service_id[:12], node[:12], timeout,
                        SUSPECT_SECONDS)
            with self._lock:
                self._suspects[node] = time.monotonic() + SUSPECT_SECONDS

    def _task_still_running(self, task_id: str) -> bool:
        try:
            task = self.api.inspect_task(task_id)
        except docker_errors.NotFound:
            return False
        return _state(task) in LIVE_STATES

    def _remove_service(self, service_id: str) -> None:
        try:
            self.api.remove_service(service_id)
        except docker_errors.NotFound:
            pass

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> int:
        """Every replica service of this deployment, whether its task runs or not."""
        services = self._services()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda s: self.stop(s["ID"], timeout), services))
        return len(services)

    # -- list ------------------------------------------------------------------------------------
    def list(self) -> builtins.list[Instance]:
        services = self._services()
        if not services:
            return []
        try:
            tasks = self.api.tasks(filters={"desired-state": "running"})
            nodes = {n["ID"]: self._learned(n["ID"], n) for n in self.api.nodes()} \
                if self.address_mode == "published" else {}
        except FAILURES as exc:
            raise BackendError(f"cannot list replica tasks: {exc}") from exc
        live: dict[str, dict[str, Any]] = {}
        for task in tasks:
            if is_live(task):
                live[task.get("ServiceID", "")] = task
        instances = []
        for service in services:
            task = live.get(service["ID"])
            if task is None:
                continue
            spec = service.get("Spec") or {}
            labels = spec.get("Labels") or {}
            hostname = labels.get(LABEL_HOSTNAME) or spec.get("Name", "?")
            server_id = labels.get(LABEL_SERVER_ID, "")
            if self.address_mode == "name":
                address = f"http://{spec.get('Name')}:{REPLICA_PORT}"
            else:
                address = self._published_address(task, nodes) or ""
            node = task.get("NodeID")
            instances.append(Instance(hostname, service["ID"], address,
                                      int(server_id) if server_id.isdigit() else None,
                                      self._node_domain(node) if node else None))
        return instances

    def is_running(self, handle: str) -> bool:
        try:
            tasks = self.api.tasks(filters={"service": handle})
        except docker_errors.NotFound:
            return False
        except FAILURES as exc:
            raise BackendError(f"cannot inspect replica service {handle[:12]}: {exc}") from exc
        # The service filter also takes names: the task's own labels say whose it is.
        ours = [t for t in tasks if self._ours(
            ((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {})]
        if any(is_live(t) for t in ours):
            return True
        if ours:
            self._tell_once(handle, ours)
        return False

    def _tell_once(self, handle: str, tasks: builtins.list[dict[str, Any]]) -> None:
        """Why a replica's task ended (no such image on a node, killed, node down), once."""
        with self._lock:
            if handle in self._told:
                return
            self._told.add(handle)
        last = max(tasks, key=lambda t: t.get("UpdatedAt", ""))
        log.warning("replica service %s: task %s on node %s is %s (wanted %s): %s",
                    handle[:12], last.get("ID", "?")[:12], (last.get("NodeID") or "-")[:12],
                    (last.get("Status") or {}).get("State"), last.get("DesiredState"),
                    _task_error(last))

    # -- internals -------------------------------------------------------------------------------
    def _services(self) -> builtins.list[dict[str, Any]]:
        filters = {"label": [f"{k}={v}" for k, v in self.labels.items()]}
        try:
            return list(self.api.services(filters=filters))
        except FAILURES as exc:
            raise BackendError(f"cannot list replica services: {exc}") from exc

    def _ours(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())


def _state(task: dict[str, Any]) -> str | None:
    return (task.get("Status") or {}).get("State")


def _task_error(task: dict[str, Any]) -> str:
    status = task.get("Status") or {}
    return status.get("Err") or status.get("Message") or "no reason given"


def domain_of_node(node: dict[str, Any]) -> str:
    """A node's failure domain: its hostname (what ``docker node ls`` shows), else its id."""
    hostname = (node.get("Description") or {}).get("Hostname")
    return str(hostname) if hostname else str(node["ID"])


def _address_of_node(node: dict[str, Any]) -> str | None:
    """The address a node's published ports are reached at: the one it joined the swarm with
    (a manager may report 0.0.0.0 there, then its manager address stands in)."""
    addr = (node.get("Status") or {}).get("Addr")
    if addr and addr != "0.0.0.0":
        return str(addr)
    manager = (node.get("ManagerStatus") or {}).get("Addr") or ""
    return manager.rsplit(":", 1)[0] or None
