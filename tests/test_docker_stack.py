"""The Docker deployment end to end: ``make up`` (compose: balancer + supervisor, replicas as
containers on the stack's own network), the contract call by call on 127.0.0.1, replicas killed
under traffic, the supervisor killed, and ``make down`` leaving nothing behind.

Every test runs once with Compose v2 (``docker compose``) and once with Compose v1
(``docker-compose``): the file must mean the same to both. A missing one is skipped, except under
CI where it is a failure.

Each stack has its own compose project, deployment label, network and published port, so these
tests can run beside a ``make up`` of the default deployment. It starts with N=0 and the tests
add replicas with names of their own: the default names (Server1..N) are container names, unique
per engine, and may be taken by that other deployment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import docker
import pytest
import requests

from lb.backends.docker import LABEL_DEPLOYMENT, LABEL_ROLE, LABEL_SERVER_ID
from lb.settings import Settings
from tests.conftest import free_port, unavailable
from tests.test_docker_backend import (  # noqa: F401 - fixtures
    ROOT,
    docker_client,
    docker_images,
    remove_by_label,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_COMMANDS = {"v2": "docker compose", "v1": "docker-compose"}


# Each Compose reads the file alike; each data path (LB_WORKER) serves the stack alike. Both
# workers with Compose v2, the default worker with v1: every part is covered, the suite short.
VARIANTS = [("v2", "async"), ("v1", "async"), ("v2", "threads")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{c}-{w}" for c, w in VARIANTS])
def variant(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(Compose version, balancer worker) of the module's stack."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def compose(variant: tuple[str, str]) -> str:
    """The compose command the Make targets use (their ``COMPOSE`` variable)."""
    version = variant[0]
    command = COMPOSE_COMMANDS[version]
    try:
        proc = subprocess.run([*command.split(), "version", "--short"], capture_output=True,
                              text=True, timeout=30, check=False)
        found = proc.returncode == 0
    except FileNotFoundError:
        found = False
    if not found:
        unavailable(f"Compose {version} (`{command}`) is not installed: "
                    "ci/docker-setup.sh installs it")
    return command


@dataclass
class Stack:
    """A compose stack of this project, driven through the Make targets."""

    project: str
    port: int
    client: docker.DockerClient
    compose: str
    worker: str = "async"
    http: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.http.trust_env = False  # loopback only, never through a proxy from the environment

    @property
    def deployment(self) -> str:
        return self.project

    @property
    def network(self) -> str:
        return f"{self.project}-net1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def make(self, target: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COMPOSE": self.compose, "COMPOSE_PROJECT": self.project, "LB_DEPLOYMENT": self.deployment,
               "LB_NETWORK": self.network, "LB_PUBLISH_PORT": str(self.port), "LB_N": "0",
               "LB_WORKER": self.worker,
               # The tests pick a replica by key (X-Key); requests without it stay random.
               "LB_HASH_KEY": "header:X-Key"}
        return subprocess.run(["make", "-s", target], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def make_ok(self, target: str) -> None:
        proc = self.make(target)
        assert proc.returncode == 0, f"make {target}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    # -- the balancer's API ----------------------------------------------------------------------
    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def add(self, n: int, hostnames: list[str] | None = None) -> requests.Response:
        body: dict[str, Any] = {"n": n} if hostnames is None else {"n": n, "hostnames": hostnames}
        return self.http.post(self.url + "/add", json=body, timeout=90)

    def rm(self, n: int, hostnames: list[str] | None = None) -> requests.Response:
        body: dict[str, Any] = {"n": n} if hostnames is None else {"n": n, "hostnames": hostnames}
        return self.http.delete(self.url + "/rm", json=body, timeout=90)

    def rep(self) -> list[str]:
        reply = self.get("/rep")
        assert reply.status_code == 200, reply.text
        message = reply.json()["message"]
        assert message["N"] == len(message["replicas"])
        return list(message["replicas"])

    def reset(self, hostnames: list[str]) -> None:
        """Exactly these replicas, freshly added."""
        current = self.rep()
        if current:
            assert self.rm(len(current)).status_code == 200
        if hostnames:
            reply = self.add(len(hostnames), hostnames)
            assert reply.status_code == 200, reply.text
        self.assert_docker_agrees()

    # -- what Docker says ------------------------------------------------------------------------
    def replica_containers(self, all: bool = False) -> list[Any]:
        filters = {"label": [f"{LABEL_DEPLOYMENT}={self.deployment}", f"{LABEL_ROLE}=replica"]}
        return self.client.containers.list(all=all, filters=filters)

    def assert_docker_agrees(self) -> None:
        """``docker ps`` by label shows exactly the replicas ``/rep`` lists, each running on the
        stack's network under its name, and no other container of them exists."""
        names = self.rep()
        running = self.replica_containers()
        assert sorted(c.name for c in running) == sorted(names)
        assert len(self.replica_containers(all=True)) == len(names)
        ids = Counter(c.labels[LABEL_SERVER_ID] for c in running)
        assert all(count == 1 for count in ids.values()), f"duplicate server ids: {ids}"
        for c in running:
            endpoint = c.attrs["NetworkSettings"]["Networks"][self.network]
            assert c.name in endpoint["Aliases"]

    def service(self, name: str) -> Any:
        found = self.client.containers.list(all=True, filters={"label": [
            f"{COMPOSE_PROJECT_LABEL}={self.project}", f"com.docker.compose.service={name}"]})
        assert len(found) == 1, found
        return found[0]

    def wait_for(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = check()
            except (requests.RequestException, AssertionError, KeyError):
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s")
            time.sleep(0.05)

    def wait_replaced(self, dead: str, n: int) -> list[str]:
        """``/rep`` once it shows ``n`` replicas again, ``dead`` no longer among them."""
        def replaced() -> list[str] | None:
            names = self.rep()
            return names if len(names) == n and dead not in names else None

        return self.wait_for(f"/rep shows N={n} again without {dead}", replaced)

    def leftovers(self) -> dict[str, list[str]]:
        """Everything of this stack that Docker still has."""
        labels = [f"{COMPOSE_PROJECT_LABEL}={self.project}", f"{LABEL_DEPLOYMENT}={self.deployment}"]
        left: dict[str, list[str]] = {"containers": [], "networks": [], "volumes": []}
        for label in labels:
            left["containers"] += [c.name for c in self.client.containers.list(
                all=True, filters={"label": label})]
            left["volumes"] += [v.name for v in self.client.volumes.list(filters={"label": label})]
            left["networks"] += [n.name for n in self.client.networks.list(
                filters={"label": label})]
        left["networks"] += [n.name for n in self.client.networks.list(names=[self.network])]
        return {k: sorted(set(v)) for k, v in left.items() if v}


def start_stack(client: docker.DockerClient, compose: str, worker: str = "async") -> Stack:
    stack = Stack(f"hlbt{uuid.uuid4().hex[:8]}", free_port(), client, compose, worker)
    try:
        stack.make_ok("up")
    except BaseException:
        force_clean(stack)
        raise
    return stack


def force_clean(stack: Stack) -> None:
    """Whatever a failed test left: by the stack's labels only."""
    stack.http.close()
    if stack.leftovers():
        stack.make("down")
        remove_by_label(stack.client, f"{COMPOSE_PROJECT_LABEL}={stack.project}",
                        f"{LABEL_DEPLOYMENT}={stack.deployment}")


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient, docker_images: None,  # noqa: F811
          compose: str, variant: tuple[str, str]) -> Iterator[Stack]:
    stack = start_stack(docker_client, compose, variant[1])
    yield stack
    try:
        stack.make_ok("down")
    finally:
        force_clean(stack)


class Traffic:
    """GET /home in a loop on a thread (bounded in count and time), recording the status codes."""

    def __init__(self, stack: Stack, limit: int = 5000, seconds: float = 120.0) -> None:
        self.stack, self.limit, self.seconds = stack, limit, seconds
        self.codes: Counter[int] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        end = time.monotonic() + self.seconds
        while not self._stop.is_set() and sum(self.codes.values()) < self.limit \
                and time.monotonic() < end:
            try:
                self.codes[session.get(self.stack.url + "/home", timeout=30).status_code] += 1
            except requests.RequestException as exc:
                self.errors.append(repr(exc))
            time.sleep(0.01)
        session.close()

    def assert_all_served(self) -> None:
        assert self.errors == [], self.errors[:5]
        assert set(self.codes) == {200}, dict(self.codes)
        assert sum(self.codes.values()) > 0


def served_by(stack: Stack, key: int) -> tuple[str, str]:
    """(replica hostname, reply message) for a request hashed on ``key``."""
    reply = stack.get("/home", headers={"X-Key": str(key)})
    assert reply.status_code == 200, reply.text
    return reply.headers["X-Served-By"], reply.json()["message"]


# -- tests ---------------------------------------------------------------------------------------
def test_contract_call_by_call(stack: Stack) -> None:
    p = stack.project
    stack.reset([])
    reply = stack.get("/rep")
    assert reply.status_code == 200
    assert reply.json() == {"message": {"N": 0, "replicas": []}, "status": "successful"}

    names = [f"{p}-S5", f"{p}-S4", f"{p}-S10", f"{p}-S11"]
    reply = stack.add(4, names)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"message": {"N": 4, "replicas": names}, "status": "successful"}
    stack.assert_docker_agrees()

    home = stack.get("/home")
    assert home.status_code == 200
    assert home.json()["status"] == "successful"
    assert home.json()["message"] in {f"Hello from Server: {i}" for i in (1, 2, 3, 4)}
    beat = stack.get("/heartbeat")
    assert (beat.status_code, beat.content) == (200, b"")
    other = stack.get("/other")
    assert other.status_code == 400
    assert other.json() == {
        "message": "<Error> '/other' endpoint does not exist in server replicas",
        "status": "failure"}

    reply = stack.add(1, [f"{p}-x1", f"{p}-x2"])
    assert reply.status_code == 400
    assert reply.json() == {
        "message": "<Error> Length of hostname list is more than newly added instances",
        "status": "failure"}
    reply = stack.rm(1, [f"{p}-S5", f"{p}-S4"])
    assert reply.status_code == 400
    assert reply.json() == {
        "message": "<Error> Length of hostname list is more than removable instances",
        "status": "failure"}
    reply = stack.add(1, [f"{p}-S5"])  # exists already: rejected, nothing changes
    assert reply.status_code == 409 and reply.json()["status"] == "failure"
    assert stack.rep() == names
    stack.assert_docker_agrees()

    reply = stack.add(2, [f"{p}-S6"])  # the second one gets a random name
    assert reply.status_code == 200, reply.text
    after_add = reply.json()["message"]["replicas"]
    assert after_add[:5] == names + [f"{p}-S6"] and len(after_add) == 6
    stack.assert_docker_agrees()

    reply = stack.rm(3, [f"{p}-S5", f"{p}-S4"])
    assert reply.status_code == 200, reply.text
    message = reply.json()["message"]
    assert message["N"] == 3
    assert f"{p}-S5" not in message["replicas"] and f"{p}-S4" not in message["replicas"]
    assert set(message["replicas"]) < set(after_add)
    stack.assert_docker_agrees()


def test_services_run_as_declared(stack: Stack) -> None:
    """What the engine runs is what docker-compose.yml says, whichever Compose read it."""
    socket_gid = str(os.stat("/var/run/docker.sock").st_gid)
    for name, role in (("lb", "balancer"), ("supervisor", "supervisor")):
        container = stack.service(name)
        config, host = container.attrs["Config"], container.attrs["HostConfig"]
        assert config["User"] == "hashlb"
        assert config["Labels"]["hashlb.role"] == role
        assert config["Labels"]["hashlb.deployment"] == stack.deployment
        assert (host["Memory"], host["PidsLimit"]) == (512 * 2**20, 256)
        assert host["CapDrop"] == ["ALL"] and not host["Privileged"]
        assert host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["GroupAdd"] == [socket_gid]
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert host["LogConfig"] == {"Type": "json-file",
                                     "Config": {"max-size": "10m", "max-file": "3"}}
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert mounts["/var/lib/hashlb"]["Type"] == "volume"
        assert mounts["/var/run/docker.sock"]["Source"] == "/var/run/docker.sock"
        assert list(container.attrs["NetworkSettings"]["Networks"]) == [stack.network]
        env = dict(item.split("=", 1) for item in config["Env"])
        assert (env["LB_BACKEND"], env["LB_NETWORK"], env["LB_N"], env["LB_WORKER"]) == \
            ("docker", stack.network, "0", stack.worker)
        assert set(Settings().to_env()) <= set(env)  # every setting, passed on
    lb, supervisor = stack.service("lb"), stack.service("supervisor")
    # Published on loopback only; the supervisor serves nothing and has no health check.
    assert lb.attrs["HostConfig"]["PortBindings"] == {
        "5000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(stack.port)}]}
    assert lb.attrs["Config"]["Healthcheck"]["Test"][0] == "CMD"
    assert supervisor.attrs["Config"]["Healthcheck"]["Test"] == ["NONE"]
    assert supervisor.attrs["Config"]["Cmd"] == ["python", "-m", "supervisor"]


def test_killed_replica_is_replaced_under_traffic(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    p = stack.project
    stack.reset([f"{p}-a", f"{p}-b", f"{p}-c"])
    key = 100000
    victim, victim_message = served_by(stack, key)
    container = stack.client.containers.get(victim)

    with Traffic(stack) as traffic:
        time.sleep(0.5)
        killed = time.monotonic()
        container.kill()

        names = stack.wait_replaced(victim, 3)
        listed = time.monotonic()

        def replacement_serves() -> str | None:
            name, message = served_by(stack, key)  # same server id, slots and keys as the dead
            return name if name != victim and message == victim_message else None

        newcomer = stack.wait_for("the replacement serves the dead replica's keys",
                                  replacement_serves)
        serving = time.monotonic()
        time.sleep(0.5)
    traffic.assert_all_served()

    assert newcomer in names and newcomer not in (f"{p}-a", f"{p}-b", f"{p}-c")
    stack.wait_for("the dead container removed", lambda: not stack.client.containers.list(
        all=True, filters={"name": f"^{victim}$"}))
    stack.assert_docker_agrees()
    with capsys.disabled():
        print(f"\n[docker recovery] kill -> /rep lists the replacement: {listed - killed:.2f}s; "
              f"kill -> replacement serving: {serving - killed:.2f}s "
              f"({sum(traffic.codes.values())} requests during, all 200)")


def test_supervisor_crash_loses_nothing(stack: Stack) -> None:
    p = stack.project
    stack.reset([f"{p}-d", f"{p}-e", f"{p}-f"])
    supervisor = stack.service("supervisor")
    restarts = supervisor.attrs["RestartCount"]
    key = 100000
    victim, victim_message = served_by(stack, key)

    with Traffic(stack) as traffic:
        time.sleep(0.3)
        crash(supervisor)
        # While it is down, a replica dies too: the restarted supervisor must replace it.
        stack.client.containers.get(victim).kill()

        def restarted() -> bool:
            supervisor.reload()
            return supervisor.status == "running" and supervisor.attrs["RestartCount"] > restarts

        stack.wait_for("the supervisor restarted by its restart policy", restarted)

        names = stack.wait_replaced(victim, 3)
        (newcomer,) = set(names) - {f"{p}-d", f"{p}-e", f"{p}-f"}
        stack.wait_for("the replacement serves the dead replica's keys",
                       lambda: served_by(stack, key) == (newcomer, victim_message))
    traffic.assert_all_served()

    # Settled: a few more supervisor rounds change nothing, no duplicate, no orphan.
    time.sleep(2)
    assert stack.rep() == names
    stack.assert_docker_agrees()


def crash(container: Any) -> None:
    """Kill the container's main process as a crash would (the restart policy applies; after
    ``docker kill`` Docker would leave it stopped). Without the right to, kill and start it."""
    container.reload()
    try:
        os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)
    except PermissionError:
        container.kill()
        container.start()


def test_make_down_leaves_nothing(docker_client: docker.DockerClient,  # noqa: F811
                                  docker_images: None, compose: str,  # noqa: F811
                                  variant: tuple[str, str]) -> None:
    stack = start_stack(docker_client, compose, variant[1])
    try:
        reply = stack.add(2, [f"{stack.project}-runtime"])  # replicas that compose never knew
        assert reply.status_code == 200, reply.text
        stack.assert_docker_agrees()
        assert stack.leftovers()["containers"]
        stack.make_ok("down")
        assert stack.leftovers() == {}
    finally:
        force_clean(stack)
