"""The Docker backend's own promises, beyond the contract every backend keeps
(``test_backend_contract.py``): the containers' shape, names that can be reused after a replica
dies, containers of others never touched, errors translated, no engine needed until first use.

Also the Docker fixtures the other Docker test modules import: images built from the working
tree, a client, and a throw-away deployment (its own label and network) removed by label.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests

from lb.backends.base import BackendError, ReplicaSpec
from lb.backends.docker import (
    LABEL_DEPLOYMENT,
    LABEL_HOSTNAME,
    LABEL_ROLE,
    LABEL_SERVER_ID,
    DockerBackend,
)
from lb.settings import Settings
from tests.conftest import RunningStack, free_port

ROOT = Path(__file__).resolve().parent.parent
TEST_LABEL = "hashlb.test"  # on containers a test makes itself, outside any deployment


# -- fixtures shared by the Docker test modules ------------------------------------------------
@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def docker_images(docker_client: docker.DockerClient) -> None:
    """The images, built from the working tree (a cached build takes seconds)."""
    proc = subprocess.run(["make", "-s", "build"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        pytest.fail(f"make build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@dataclass(frozen=True)
class Deployment:
    """A throw-away deployment: its label value and its own network."""

    name: str
    network: str

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {"backend": "docker", "deployment": self.name,
                                     "network": self.network}
        values.update(overrides)
        return Settings.from_env({}, **values)


def remove_by_label(client: docker.DockerClient, *labels: str) -> int:
    """Remove the containers, then the networks and volumes, carrying any of ``labels``
    (``key=value`` each); how many containers there were."""
    found = 0
    for label in labels:
        for container in client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
            found += 1
    for label in labels:
        for network in client.networks.list(filters={"label": label}):
            network.remove()
        for volume in client.volumes.list(filters={"label": label}):
            volume.remove(force=True)
    return found


@pytest.fixture
def deployment(docker_client: docker.DockerClient, docker_images: None) -> Iterator[Deployment]:
    name = f"hlbt{uuid.uuid4().hex[:8]}"
    docker_client.networks.create(f"{name}-net", driver="bridge",
                                  labels={LABEL_DEPLOYMENT: name})
    yield Deployment(name, f"{name}-net")
    remove_by_label(docker_client, f"{LABEL_DEPLOYMENT}={name}", f"{TEST_LABEL}={name}")


def wait_answering(address: str, path: str = "/heartbeat", timeout: float = 60.0) -> requests.Response:
    """The first 200 from ``address + path`` (replicas take a moment to boot)."""
    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = session.get(address + path, timeout=2)
            if reply.status_code == 200:
                return reply
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{address}{path} did not answer within {timeout}s")
        time.sleep(0.1)


# -- tests ---------------------------------------------------------------------------------------
def test_client_is_created_on_first_use_and_errors_are_translated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on this loopback port: an engine that does not answer.
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    backend = DockerBackend(Settings.from_env({}, backend="docker"))  # must not connect
    with pytest.raises(BackendError) as info:
        backend.list()
    assert info.value.__cause__ is not None


@pytest.mark.docker
def test_replica_container_shape(deployment: Deployment,
                                 docker_client: docker.DockerClient) -> None:
    backend = DockerBackend(deployment.settings(replica_memory="128m", replica_cpus=0.25))
    hostname = f"{deployment.name}-shape"
    inst = backend.start(ReplicaSpec(hostname, 42))
    info = docker_client.api.inspect_container(inst.handle)
    assert info["Name"] == "/" + hostname
    assert info["Config"]["Hostname"] == hostname
    assert "SERVER_ID=42" in info["Config"]["Env"]
    assert info["Config"]["User"] == "hashlb"  # the image's unprivileged user
    labels = info["Config"]["Labels"]
    assert labels[LABEL_DEPLOYMENT] == deployment.name
    assert labels[LABEL_ROLE] == "replica"
    assert labels[LABEL_HOSTNAME] == hostname and labels[LABEL_SERVER_ID] == "42"
    assert info["HostConfig"]["Memory"] == 128 * 2**20
    assert info["HostConfig"]["NanoCpus"] == 250_000_000
    assert info["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")  # the supervisor's job
    assert info["HostConfig"]["CapDrop"] == ["ALL"]
    assert info["HostConfig"]["LogConfig"]["Config"]["max-size"] == "10m"
    endpoint = info["NetworkSettings"]["Networks"][deployment.network]
    assert hostname in endpoint["Aliases"]
    # From the host (this test) the replica is reached at its address on the network.
    assert backend.address_mode == "ip"
    assert inst.address == f"http://{endpoint['IPAddress']}:5000"
    assert wait_answering(inst.address, "/home").json()["message"] == "Hello from Server: 42"
    backend.stop(inst.handle)


@pytest.mark.docker
def test_dead_replica_gives_its_name_back(deployment: Deployment,
                                          docker_client: docker.DockerClient) -> None:
    backend = DockerBackend(deployment.settings())
    spec = ReplicaSpec(f"{deployment.name}-again", 3)
    first = backend.start(spec)
    docker_client.api.kill(first.handle)
    assert not backend.is_running(first.handle)
    assert first.handle not in {i.handle for i in backend.list()}
    second = backend.start(spec)  # the dead container of ours gives way
    assert second.handle != first.handle
    same_name = docker_client.containers.list(all=True, filters={"name": f"^{spec.hostname}$"})
    assert [c.id for c in same_name] == [second.handle]
    wait_answering(second.address)
    backend.stop(second.handle)


@pytest.mark.docker
def test_containers_of_others_are_never_touched(deployment: Deployment,
                                                docker_client: docker.DockerClient) -> None:
    backend = DockerBackend(deployment.settings())
    name = f"{deployment.name}-foreign"
    foreign = docker_client.containers.run(
        "hashlb-server:latest", name=name, detach=True, network=deployment.network,
        environment={"SERVER_ID": "9"}, labels={TEST_LABEL: deployment.name},
    )
    assert backend.list() == []
    with pytest.raises(BackendError):
        backend.start(ReplicaSpec(name, 9))  # its name is taken by a container not ours
    with pytest.raises(BackendError):
        backend.stop(foreign.id)
    assert not backend.is_running(foreign.id)
    assert backend.stop_all() == 0
    foreign.reload()
    assert foreign.status == "running"


@pytest.mark.docker
def test_missing_image_is_a_backend_error(deployment: Deployment,
                                          docker_client: docker.DockerClient) -> None:
    backend = DockerBackend(deployment.settings(image="hashlb-no-such-image:none"))
    with pytest.raises(BackendError, match="make build"):
        backend.start(ReplicaSpec(f"{deployment.name}-noimage", 1))
    assert docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment.name}"}) == []


@pytest.mark.docker
def test_stop_all_removes_dead_replicas_too(deployment: Deployment,
                                            docker_client: docker.DockerClient) -> None:
    backend = DockerBackend(deployment.settings())
    alive = backend.start(ReplicaSpec(f"{deployment.name}-alive", 1))
    dead = backend.start(ReplicaSpec(f"{deployment.name}-dead", 2))
    docker_client.api.kill(dead.handle)
    assert backend.stop_all(timeout=5) == 2
    label = f"{LABEL_DEPLOYMENT}={deployment.name}"
    assert docker_client.containers.list(all=True, filters={"label": label}) == []
    assert not backend.is_running(alive.handle)



@pytest.mark.docker
def test_prepare_makes_the_network_and_release_removes_only_that(
        docker_client: docker.DockerClient) -> None:
    name = f"hlbt{uuid.uuid4().hex[:8]}"
    backend = DockerBackend(Settings.from_env({}, backend="docker", deployment=name,
                                              network=f"{name}-net"))
    try:
        backend.prepare()
        backend.prepare()  # idempotent: still one network of that name
        (made,) = docker_client.networks.list(names=[f"{name}-net"])
        assert made.attrs["Driver"] == "bridge"
        assert made.attrs["Labels"] == {LABEL_DEPLOYMENT: name, LABEL_ROLE: "network"}
        backend.release()
        assert docker_client.networks.list(names=[f"{name}-net"]) == []
        backend.release()  # nothing left to do: no error

        # A network it did not make (compose's carries the deployment label, no role) stays.
        theirs = docker_client.networks.create(f"{name}-net", driver="bridge",
                                               labels={LABEL_DEPLOYMENT: name})
        backend.prepare()
        assert [n.id for n in docker_client.networks.list(names=[f"{name}-net"])] == [theirs.id]
        backend.release()
        assert [n.id for n in docker_client.networks.list(names=[f"{name}-net"])] == [theirs.id]
    finally:
        remove_by_label(docker_client, f"{LABEL_DEPLOYMENT}={name}")


@pytest.mark.docker
def test_lb_run_with_the_docker_backend_cleans_up_after_itself(
        make_stack: Callable[..., RunningStack], docker_client: docker.DockerClient,
        docker_images: None) -> None:
    """``LB_BACKEND=docker lb-run`` on the host, no compose: it makes the replicas' network,
    reaches the containers by IP, and takes everything away again at the end."""
    name = f"hlbt{uuid.uuid4().hex[:8]}"
    label = f"{LABEL_DEPLOYMENT}={name}"
    try:
        stack = make_stack(backend="docker", deployment=name, network=f"{name}-net", n=2)
        reply = stack.get("/home")
        assert reply.status_code == 200, reply.text
        assert reply.json()["message"] in {"Hello from Server: 1", "Hello from Server: 2"}
        added = stack.post("/add", json={"n": 1, "hostnames": [f"{name}-x"]})
        assert added.status_code == 200, added.text
        containers = docker_client.containers.list(filters={"label": label})
        assert sorted(c.name for c in containers) == sorted(
            ["Server1", "Server2", f"{name}-x"])
        assert all(f"{name}-net" in c.attrs["NetworkSettings"]["Networks"] for c in containers)
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(timeout=90) == 0
        assert "removed network" in stack.log()
        assert docker_client.containers.list(all=True, filters={"label": label}) == []
        assert docker_client.networks.list(names=[f"{name}-net"]) == []
    finally:
        remove_by_label(docker_client, label)


def test_lb_run_without_an_engine_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "LB_BACKEND": "docker", "LB_PORT": str(free_port()),
           "LB_DEPLOYMENT": f"hlbt{uuid.uuid4().hex[:8]}",
           "LB_REGISTRY": str(tmp_path / "registry.json"),
           # Nothing listens on this loopback port: an engine that does not answer.
           "DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"}
    run = subprocess.run([sys.executable, "-m", "lb"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 1
    assert "cannot start: cannot reach the Docker engine" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
