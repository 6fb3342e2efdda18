"""The contract every replica backend keeps, one suite run over each of them.

A started replica answers ``/heartbeat`` and ``/home`` with its server id; ``list()`` shows it by
hostname; ``stop()`` removes it and may be repeated; stopping something already gone (or never
there) is success; a backend lists only its own deployment's replicas.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from lb.backends.base import Backend, ReplicaSpec
from lb.backends.docker import DockerBackend
from lb.backends.local import LocalBackend
from lb.backends.swarm import SwarmBackend
from lb.settings import Settings
from tests.conftest import kill_deployment
from tests.test_docker_backend import (  # noqa: F401 - fixtures
    Deployment,
    deployment,
    docker_client,
    docker_images,
    wait_answering,
)

HTTP = requests.Session()
HTTP.trust_env = False  # straight to the replica, never through a proxy from the environment


@dataclass
class Harness:
    """One backend under test, a factory for more of its kind, and a handle that names
    nothing."""

    backend: Backend
    other: Callable[[], Backend]  # another deployment's backend, same kind
    unknown_handle: str
    prefix: str

    def spec(self, suffix: str, server_id: int) -> ReplicaSpec:
        return ReplicaSpec(f"{self.prefix}-{suffix}", server_id)


@pytest.fixture
def local_harness(tmp_path: Path) -> Iterator[Harness]:
    names: list[str] = []

    def make() -> Backend:
        name = f"ct{uuid.uuid4().hex[:10]}"
        names.append(name)
        return LocalBackend(Settings.from_env(
            {}, deployment=name, registry=str(tmp_path / name / "registry.json")))

    backend = make()
    yield Harness(backend, make, f"4194303/{uuid.uuid4().hex}", names[0])
    for name in names:
        kill_deployment(name)


@pytest.fixture
def docker_harness(deployment: Deployment) -> Iterator[Harness]:  # noqa: F811
    def other() -> Backend:
        # Same network, another deployment label: the label is what separates them.
        return DockerBackend(Settings.from_env({}, backend="docker", network=deployment.network,
                                               deployment=deployment.name + "-other"))

    yield Harness(DockerBackend(deployment.settings()), other, "0" * 64, deployment.name)
    other().stop_all(timeout=2)  # the deployment fixture removes the rest by label


@pytest.fixture
def swarm_harness(swarm_cluster: Any) -> Iterator[Harness]:
    """Services on the test cluster, seen from here: the manager's engine through its socket,
    replicas reached on their nodes' published ports (the tests run outside the overlay)."""
    name = f"hlbc{uuid.uuid4().hex[:8]}"
    made: list[SwarmBackend] = []

    def make(label: str) -> Backend:
        backend = SwarmBackend(
            Settings.from_env({}, backend="swarm", deployment=label, network="net1",
                              swarm_address="published"),
            client=swarm_cluster.client())
        made.append(backend)
        return backend

    yield Harness(make(name), lambda: make(name + "-other"), "0" * 25, name)
    for backend in made:
        backend.stop_all(timeout=2)


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker),
                        pytest.param("swarm", marks=[pytest.mark.docker, pytest.mark.swarm,
                                                      pytest.mark.timeout(900)])])
def harness(request: pytest.FixtureRequest) -> Harness:
    return request.getfixturevalue(f"{request.param}_harness")


def test_started_replica_answers_with_its_server_id(harness: Harness) -> None:
    spec = harness.spec("a", 7)
    inst = harness.backend.start(spec)
    assert (inst.hostname, inst.server_id) == (spec.hostname, 7)
    beat = wait_answering(inst.address, "/heartbeat")
    assert beat.status_code == 200 and beat.content == b""
    home = HTTP.get(inst.address + "/home", timeout=5)
    assert home.status_code == 200
    assert home.json() == {"message": "Hello from Server: 7", "status": "successful"}
    assert HTTP.get(inst.address + "/other", timeout=5).status_code == 404
    harness.backend.stop(inst.handle)


def test_list_shows_running_replicas_by_hostname(harness: Harness) -> None:
    started = [harness.backend.start(harness.spec(s, i)) for s, i in (("a", 1), ("b", 2))]
    for inst in started:
        wait_answering(inst.address)
    listed = {i.hostname: i for i in harness.backend.list()}
    assert set(listed) == {i.hostname for i in started}
    for inst in started:
        seen = listed[inst.hostname]
        assert (seen.handle, seen.address, seen.server_id) == (
            inst.handle, inst.address, inst.server_id)
        assert harness.backend.is_running(inst.handle)
    for inst in started:
        harness.backend.stop(inst.handle)


def test_stop_removes_the_replica_and_can_be_repeated(harness: Harness) -> None:
    keep = harness.backend.start(harness.spec("keep", 1))
    gone = harness.backend.start(harness.spec("gone", 2))
    wait_answering(gone.address)
    harness.backend.stop(gone.handle, timeout=5)
    assert not harness.backend.is_running(gone.handle)
    assert [i.hostname for i in harness.backend.list()] == [keep.hostname]
    with pytest.raises(requests.RequestException):
        HTTP.get(gone.address + "/heartbeat", timeout=1)
    harness.backend.stop(gone.handle, timeout=5)  # again: already gone is success
    harness.backend.stop(keep.handle)
    assert harness.backend.list() == []


def test_stopping_an_unknown_handle_is_success(harness: Harness) -> None:
    harness.backend.stop(harness.unknown_handle)
    assert not harness.backend.is_running(harness.unknown_handle)


def test_only_own_replicas_are_listed(harness: Harness) -> None:
    mine = harness.backend.start(harness.spec("mine", 1))
    other_backend = harness.other()
    theirs = other_backend.start(harness.spec("theirs", 1))
    assert [i.handle for i in harness.backend.list()] == [mine.handle]
    assert [i.handle for i in other_backend.list()] == [theirs.handle]
    assert harness.backend.stop_all() == 1
    assert other_backend.is_running(theirs.handle)  # untouched by the other's stop_all
    other_backend.stop(theirs.handle)
