"""The swarm backend's pure parts and its settings, without a cluster (``test_swarm.py`` and the
backend contract run it against a real one): service names Swarm accepts for every hostname the
contract accepts, which task states count as running, no engine needed until first use, and
each replica's failure domain (its task's node) learnt from a manager's answers, faked here."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.backends import BackendError, create_backend, swarm
from lb.backends.docker import (
    LABEL_DEPLOYMENT,
    LABEL_HOSTNAME,
    LABEL_ROLE,
    LABEL_SERVER_ID,
    ROLE_REPLICA,
)
from lb.backends.swarm import SwarmBackend, domain_of_node, is_live, service_name
from lb.naming import HOSTNAME_RE, MAX_HOSTNAME
from lb.settings import Settings, SettingsError
from tests.conftest import free_port

# Swarm's own rule for a service name (swarmkit's controlapi): a DNS label, at most 63.
SWARM_NAME = re.compile(r"[a-zA-Z0-9](?:[-_]*[a-zA-Z0-9]+)*\Z")
HOSTNAMES = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,62}", fullmatch=True)


@settings(deadline=None)  # generating from a regex is slow on a busy machine
@given(HOSTNAMES)
def test_every_contract_hostname_gets_a_service_name_swarm_takes(hostname: str) -> None:
    assert HOSTNAME_RE.match(hostname) and len(hostname) <= MAX_HOSTNAME
    name = service_name(hostname)
    assert SWARM_NAME.match(name) and len(name) <= 63, name


@settings(deadline=None)
@given(st.lists(HOSTNAMES, min_size=2, max_size=20, unique=True))
def test_different_hostnames_never_share_a_service_name(hostnames: list[str]) -> None:
    assert len({service_name(h) for h in hostnames}) == len(hostnames)


def test_names_swarm_takes_are_kept_and_others_are_mapped() -> None:
    assert service_name("Server1") == "Server1"
    assert service_name("replica-3d6791") == "replica-3d6791"
    assert service_name("a_b") == "a_b"
    dotted = service_name("S.5")
    assert dotted.startswith("S-5-") and dotted != service_name("S-5")
    assert service_name("x_").startswith("x-")


@pytest.mark.parametrize(("desired", "state", "live"), [
    ("running", "pending", True), ("running", "assigned", True),
    ("running", "starting", True), ("running", "running", True),
    ("running", "failed", False), ("running", "rejected", False),
    ("running", "complete", False), ("shutdown", "running", False),  # its node went down
    ("remove", "running", False),
])
def test_which_tasks_count_as_running(desired: str, state: str, live: bool) -> None:
    assert is_live({"DesiredState": desired, "Status": {"State": state}}) is live


def test_settings_pick_the_backend_and_check_its_values() -> None:
    configured = Settings.from_env({"LB_BACKEND": "swarm",
                                    "LB_SWARM_CONSTRAINTS": " node.role==worker , node.labels.x==1"})
    backend = create_backend(configured)
    assert isinstance(backend, SwarmBackend)
    assert backend.constraints == ["node.role==worker", "node.labels.x==1"]
    assert backend.address_mode == "name"
    with pytest.raises(SettingsError, match="swarm_address"):
        Settings.from_env({"LB_BACKEND": "swarm", "LB_SWARM_ADDRESS": "vip"})


def test_client_is_created_on_first_use_and_errors_are_translated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on this loopback port: an engine that does not answer.
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    backend = SwarmBackend(Settings.from_env({}, backend="swarm"))  # must not connect
    with pytest.raises(BackendError) as info:
        backend.list()
    assert info.value.__cause__ is not None


# -- failure domains: a replica's node, learnt from the manager's answers ------------------------
NODES = {"n1": {"ID": "n1", "Description": {"Hostname": "worker1"}},
         "n2": {"ID": "n2", "Description": {"Hostname": "worker2"}}}


def task(service: str, node: str | None, state: str = "running",
         desired: str = "running") -> dict[str, Any]:
    return {"ID": f"t-{service}", "ServiceID": service, "NodeID": node,
            "DesiredState": desired, "Status": {"State": state}}


class FakeManager:
    """The few calls of a manager's API that tell a replica's node, answered from lists."""

    def __init__(self, tasks: list[dict[str, Any]],
                 services: Sequence[dict[str, Any]] = ()) -> None:
        self.api = self  # stands in for the DockerClient and its APIClient alike
        self._tasks, self._services = tasks, list(services)
        self.inspected: list[str] = []

    def tasks(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        service = filters.get("service")
        return [t for t in self._tasks if service is None or t["ServiceID"] == service]

    def inspect_node(self, node_id: str) -> dict[str, Any]:
        self.inspected.append(node_id)
        return NODES[node_id]

    def nodes(self) -> list[dict[str, Any]]:
        return list(NODES.values())

    def services(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        return self._services


def swarm_backend(manager: FakeManager) -> SwarmBackend:
    return SwarmBackend(Settings.from_env({}, backend="swarm"), manager)  # type: ignore[arg-type]


def test_a_nodes_domain_is_its_hostname_else_its_id() -> None:
    assert domain_of_node(NODES["n1"]) == "worker1"
    assert domain_of_node({"ID": "n9", "Description": {}}) == "n9"


def test_a_started_replica_gets_the_domain_of_its_tasks_node() -> None:
    backend = swarm_backend(FakeManager([task("svc1", "n2")]))
    assert backend._address("S1", "svc1") == ("http://S1:5000", "worker2")


def test_a_task_on_no_node_leaves_the_domain_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not placed (no eligible node yet) or ended: the start goes on without a domain, the
    heartbeat and ``is_running`` decide as always."""
    monkeypatch.setattr(swarm, "PLACEMENT_WAIT", 0.3)
    began = time.monotonic()
    assert swarm_backend(FakeManager([task("svc1", None, "pending")]))._address(
        "S1", "svc1") == ("http://S1:5000", None)
    assert 0.3 <= time.monotonic() - began < 5
    ended = FakeManager([task("svc1", None, "rejected")])
    assert swarm_backend(ended)._address("S1", "svc1") == ("http://S1:5000", None)


def test_listed_replicas_carry_their_nodes_domain_each_node_inspected_once() -> None:
    labels = {LABEL_DEPLOYMENT: "hashlb", LABEL_ROLE: ROLE_REPLICA}
    services = [{"ID": f"svc{i}", "Spec": {"Name": f"S{i}", "Labels": {
        **labels, LABEL_HOSTNAME: f"S{i}", LABEL_SERVER_ID: str(i)}}} for i in (1, 2, 3)]
    manager = FakeManager([task("svc1", "n1"), task("svc2", "n2"), task("svc3", "n1")],
                          services)
    backend = swarm_backend(manager)
    listed = {i.hostname: i.domain for i in backend.list()}
    assert listed == {"S1": "worker1", "S2": "worker2", "S3": "worker1"}
    assert {i.hostname: i.domain for i in backend.list()} == listed
    assert sorted(manager.inspected) == ["n1", "n2"]  # a node's hostname is asked once
