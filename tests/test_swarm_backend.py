"""The swarm backend's pure parts and its settings, without a cluster (``test_swarm.py`` and the
backend contract run it against a real one): service names Swarm accepts for every hostname the
contract accepts, which task states count as running, no engine needed until first use."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.backends import BackendError, create_backend
from lb.backends.swarm import SwarmBackend, is_live, service_name
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
