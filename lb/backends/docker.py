"""Replicas as Docker containers (docker SDK).

Each replica is a container of ``settings.image`` named after its hostname, on
``settings.network`` with the hostname as network alias and ``SERVER_ID`` in its environment.
Every container this backend creates carries the deployment's labels, and only containers
carrying them are ever listed, stopped or removed. The handle is the container id.

The client connects on first use, never at import or construction, so a balancer or a test can
be set up without an engine. Replicas get no Docker restart policy: a dead replica is the
supervisor's to replace (with a new hostname), and Docker restarting it too would race with it.
"""

from __future__ import annotations

import builtins
import logging
import math
import socket
import threading
from typing import Any

import docker
import psutil
import requests
from docker import errors as docker_errors

from lb.backends.base import STOP_TIMEOUT, Backend, BackendError, Instance, ReplicaSpec
from lb.settings import Settings

log = logging.getLogger(__name__)

LABEL_DEPLOYMENT = "hashlb.deployment"
LABEL_ROLE = "hashlb.role"
LABEL_HOSTNAME = "hashlb.hostname"
LABEL_SERVER_ID = "hashlb.server_id"
ROLE_REPLICA = "replica"
ROLE_NETWORK = "network"  # a network prepare() created (compose's carry no role)
REPLICA_PORT = 5000
CLIENT_TIMEOUT = 60  # seconds per API call; a stop adds its own grace period to it
PIDS_LIMIT = 256  # a replica is one gunicorn master, one worker and its threads
LOG_ROTATION = {"max-size": "10m", "max-file": "3"}  # replicas log every request
CAP_DROP = ["ALL"]  # a replica needs no Linux capability

# What the SDK raises: its own errors, and requests' for an engine that does not answer.
FAILURES = (docker_errors.DockerException, requests.RequestException)


class Engine:
    """The Docker engine's low-level client, created on first use, never at import or
    construction (a balancer or a test can be set up without an engine). Shared by the docker
    and the swarm backends: one seam for the one outside system."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()

    @property
    def api(self) -> docker.APIClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.from_env(timeout=CLIENT_TIMEOUT)
                except FAILURES as exc:
                    raise BackendError(f"cannot reach the Docker engine: {exc}") from exc
            return self._client.api


def ensure_network(api: docker.APIClient, name: str, deployment: str, driver: str,
                   attachable: bool = False) -> bool:
    """The network ``name``: used as it is when it exists (compose's, a stack's, or one made by
    hand), else created with ``driver``, labelled as made for ``deployment``. Whether it made
    it."""
    try:
        api.inspect_network(name)
        return False
    except docker_errors.NotFound:
        pass
    except FAILURES as exc:
        raise BackendError(f"cannot inspect network {name}: {exc}") from exc
    try:
        api.create_network(name, driver=driver, attachable=attachable or None,
                           check_duplicate=True,
                           labels={LABEL_DEPLOYMENT: deployment, LABEL_ROLE: ROLE_NETWORK})
    except docker_errors.APIError as exc:
        if exc.status_code != 409:  # 409: created meanwhile by someone else: fine
            raise BackendError(f"cannot create network {name}: {exc}") from exc
        return False
    except FAILURES as exc:
        raise BackendError(f"cannot create network {name}: {exc}") from exc
    log.info("created %s network %s for deployment %s", driver, name, deployment)
    return True


def remove_network(api: docker.APIClient, name: str, deployment: str) -> None:
    """Remove the network if ``ensure_network`` made it for ``deployment`` (in this run or one
    that ended without cleaning up) and nothing is attached to it any more."""
    try:
        info = api.inspect_network(name)
    except docker_errors.NotFound:
        return
    except FAILURES as exc:
        raise BackendError(f"cannot inspect network {name}: {exc}") from exc
    labels = info.get("Labels") or {}
    if labels.get(LABEL_DEPLOYMENT) != deployment or labels.get(LABEL_ROLE) != ROLE_NETWORK:
        return
    if info.get("Containers"):
        log.warning("network %s still has containers on it; leaving it", name)
        return
    try:
        api.remove_network(info["Id"])
    except docker_errors.NotFound:
        return
    except docker_errors.APIError as exc:
        if exc.status_code in (403, 409):  # still in use elsewhere (a service on a node)
            log.warning("network %s is still in use; leaving it: %s", name, exc)
            return
        raise BackendError(f"cannot remove network {name}: {exc}") from exc
    except FAILURES as exc:
        raise BackendError(f"cannot remove network {name}: {exc}") from exc
    log.info("removed network %s", name)


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self.deployment = settings.deployment
        self.image = settings.image
        self.network = settings.network
        self.memory = settings.replica_memory
        self.nano_cpus = int(settings.replica_cpus * 1e9)
        self._address_mode = settings.docker_address if settings.docker_address != "auto" else None
        self.engine = Engine(client)

    @property
    def api(self) -> docker.APIClient:
        """The low-level client, created on first use."""
        return self.engine.api

    @property
    def address_mode(self) -> str:
        """``name`` or ``ip``; ``auto`` is decided on first use (it asks the engine)."""
        if self._address_mode is None:
            self._address_mode = "name" if self._on_network() else "ip"
            log.info("reaching replicas on %s by %s", self.network, self._address_mode)
        return self._address_mode

    def _on_network(self) -> bool:
        """Whether this process runs in a container attached to the replicas' network: only
        there do their names resolve. (``/.dockerenv`` cannot tell: the host itself may be a
        container, and a container on another network cannot resolve the names either.)"""
        try:
            members = self.api.inspect_network(self.network).get("Containers") or {}
        except FAILURES:
            return False
        theirs = {m.get("IPv4Address", "").split("/")[0] for m in members.values()}
        mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                if a.family == socket.AF_INET}
        return bool(theirs & mine)

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_DEPLOYMENT: self.deployment, LABEL_ROLE: ROLE_REPLICA}

    # -- the network -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """The replicas' network: used as it is when a network of that name exists (compose's,
        or one made by hand), else created as a bridge labelled as this deployment's."""
        ensure_network(self.api, self.network, self.deployment, driver="bridge")

    def release(self) -> None:
        """Remove the network if ``prepare`` made it for this deployment (in this run or one
        that ended without cleaning up) and no container is on it any more."""
        remove_network(self.api, self.network, self.deployment)

    # -- start -----------------------------------------------------------------------------------
    def start(self, spec: ReplicaSpec) -> Instance:
        api = self.api
        try:
            self._remove_leftover(spec.hostname)
            host_config = api.create_host_config(
                network_mode=self.network, mem_limit=self.memory, nano_cpus=self.nano_cpus,
                pids_limit=PIDS_LIMIT, cap_drop=CAP_DROP, security_opt=["no-new-privileges:true"],
                log_config={"Type": "json-file", "Config": LOG_ROTATION},
            )
            networking = api.create_networking_config({
                self.network: api.create_endpoint_config(aliases=[spec.hostname]),
            })
            # create + start rather than the SDK's run(): run() pulls a missing image.
            container = api.create_container(
                self.image, name=spec.hostname, hostname=spec.hostname, detach=True,
                environment={"SERVER_ID": str(spec.server_id)},
                labels={**self.labels, LABEL_HOSTNAME: spec.hostname,
                        LABEL_SERVER_ID: str(spec.server_id)},
                host_config=host_config, networking_config=networking,
            )
            handle = container["Id"]
            try:
                api.start(handle)
                address = self._address(spec.hostname, api.inspect_container(handle))
            except BaseException:
                api.remove_container(handle, force=True)
                raise
        except docker_errors.ImageNotFound as exc:
            raise BackendError(f"cannot start replica {spec.hostname}: image {self.image} not "
                               "found (build it: make build)") from exc
        except FAILURES as exc:
            raise BackendError(f"cannot start replica {spec.hostname}: {exc}") from exc
        log.info("started replica %s (server id %d) as container %s at %s",
                 spec.hostname, spec.server_id, handle[:12], address)
        return Instance(spec.hostname, handle, address, spec.server_id)

    def _remove_leftover(self, name: str) -> None:
        """A container of ours with this name (a dead replica not yet cleared) gives way; a
        container that is not ours is never touched."""
        try:
            info = self.api.inspect_container(name)
        except docker_errors.NotFound:
            return
        if info.get("Name") != "/" + name:
            return  # ``name`` matched another container's id prefix, not a name
        if not self._ours(info):
            raise BackendError(f"a container named {name} exists and is not a replica of "
                               f"deployment {self.deployment}; not touching it")
        log.info("removing leftover container %s of replica %s", info["Id"][:12], name)
        self._remove(info["Id"])

    def _address(self, hostname: str, info: dict[str, Any]) -> str:
        if self.address_mode == "name":
            return f"http://{hostname}:{REPLICA_PORT}"
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (networks.get(self.network) or {}).get("IPAddress")
        if not ip:
            raise BackendError(f"replica {hostname} has no address on network {self.network}")
        return f"http://{ip}:{REPLICA_PORT}"

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, handle: str, timeout: float = STOP_TIMEOUT) -> None:
        try:
            info = self.api.inspect_container(handle)
            if not self._ours(info):
                raise BackendError(f"container {handle[:12]} is not a replica of deployment "
                                   f"{self.deployment}; not stopping it")
            # SIGTERM: gunicorn lets in-flight requests finish; SIGKILL after the timeout.
            self.api.stop(info["Id"], timeout=max(0, math.ceil(timeout)))
            self._remove(info["Id"])
        except docker_errors.NotFound:
            return  # already gone: that is what we wanted
        except FAILURES as exc:
            raise BackendError(f"cannot stop replica container {handle[:12]}: {exc}") from exc

    def _remove(self, container_id: str) -> None:
        try:
            self.api.remove_container(container_id, force=True)
        except docker_errors.NotFound:
            pass
        except docker_errors.APIError as exc:
            if exc.status_code != 409:  # 409: a removal is already under way
                raise

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> int:
        """Every container of this deployment's replicas, running or not."""
        stopped = 0
        for summary in self._containers(running_only=False):
            self.stop(summary["Id"], timeout)
            stopped += 1
        return stopped

    # -- list ------------------------------------------------------------------------------------
    def list(self) -> builtins.list[Instance]:
        instances = []
        for summary in self._containers(running_only=True):
            labels = summary.get("Labels") or {}
            hostname = labels.get(LABEL_HOSTNAME) or (summary.get("Names") or ["/?"])[0][1:]
            server_id = labels.get(LABEL_SERVER_ID, "")
            try:
                address = self._address(hostname, summary)
            except BackendError:
                address = ""  # not (or no longer) on the network: unreachable
            instances.append(Instance(hostname, summary["Id"], address,
                                      int(server_id) if server_id.isdigit() else None))
        return instances

    def is_running(self, handle: str) -> bool:
        try:
            info = self.api.inspect_container(handle)
        except docker_errors.NotFound:
            return False
        except FAILURES as exc:
            raise BackendError(f"cannot inspect replica container {handle[:12]}: {exc}") from exc
        return self._ours(info) and bool((info.get("State") or {}).get("Running"))

    # -- internals -------------------------------------------------------------------------------
    def _containers(self, running_only: bool) -> builtins.list[dict[str, Any]]:
        filters: dict[str, Any] = {"label": [f"{k}={v}" for k, v in self.labels.items()]}
        if running_only:
            filters["status"] = "running"
        try:
            return list(self.api.containers(all=not running_only, filters=filters))
        except FAILURES as exc:
            raise BackendError(f"cannot list replica containers: {exc}") from exc

    def _ours(self, info: dict[str, Any]) -> bool:
        labels = (info.get("Config") or {}).get("Labels") or info.get("Labels") or {}
        return all(labels.get(k) == v for k, v in self.labels.items())
