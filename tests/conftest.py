"""Shared fixtures: a real stack (``lb-run``: gunicorn + supervisor + replica processes) on
loopback, registries in ``tmp_path``, and cleanup that leaves no process of a test behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest
import requests

from lb.backends.local import ENV_DEPLOYMENT
from lb.ha import free_port_run
from lb.registry import READY, Registry, State
from lb.settings import Settings

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d ")  # a log line's start (lb.logs.TEXT_FORMAT)


def trouble(lines: list[str]) -> list[str]:
    """The log lines at WARNING and above, each with the lines that follow it (a traceback):
    what a failed test shows of the balancer's side."""
    kept: list[str] = []
    keeping = False
    for line in lines:
        if LOG_LINE.match(line):
            keeping = any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL"))
        if keeping:
            kept.append(line)
    return kept


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: one from bind(0) may be handed
    to the next bind(0) (a replica starting) before the balancer meant to use it binds it
    (CI saw a stack's replica take its balancer's port)."""
    return free_port_run(1)


def deployment_processes(deployment: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["environ"], ad_value=None):
        if (proc.info["environ"] or {}).get(ENV_DEPLOYMENT) == deployment:
            found.append(proc)
    return found


def kill_deployment(deployment: str) -> int:
    procs = deployment_processes(deployment)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


@dataclass
class RunningStack:
    """An ``lb-run`` process and what a test needs to talk to it."""

    url: str
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.registry_path)

    def state(self) -> State:
        return self.registry.read()

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    # Admin calls on a connection of their own: a kept-alive one may be closed by the server
    # (its keep-alive time) just as a call goes out, and a POST or DELETE is not retried.
    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return requests.delete(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def rep(self) -> dict[str, Any]:
        reply = self.get("/rep")
        assert reply.status_code == 200, reply.text
        return reply.json()["message"]

    def wait_ready(self, n: int | None = None, timeout: float = 30.0) -> State:
        """Until every wanted replica is ready (and there are ``n``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            members = state.members()
            if all(r.state == READY for r in members) and (n is None or len(members) == n):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready after {timeout}s: {state.to_dict()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class StackFactory:
    """Starts ``lb-run`` processes with settings overrides and stops them all at the end,
    checking that nothing of theirs outlived them. ``worker`` is the balancer's data path
    (``LB_WORKER``) unless an override names one."""

    def __init__(self, base: Path, worker: str = "async") -> None:
        self.base = base
        self.worker = worker
        self.started: list[RunningStack] = []

    def __call__(self, *args: str, **overrides: Any) -> RunningStack:
        """``lb-run`` with the command-line ``args`` (e.g. ``--keep-registry``)."""
        deployment = f"t{uuid.uuid4().hex[:10]}"
        values: dict[str, Any] = {
            "port": free_port(), "deployment": deployment, "workers": 2, "threads": 8,
            "registry": str(self.base / deployment / "registry.json"), "worker": self.worker,
        }
        values.update(overrides)
        settings = Settings.from_env({}, **values)
        env = {**os.environ, **settings.to_env()}
        log_path = self.base / f"{deployment}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lb", *args], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        https_only = bool(settings.tls_cert) and not settings.tls_port
        stack = RunningStack(f"{'https' if https_only else 'http'}://127.0.0.1:{settings.port}",
                             settings, proc, log_path)
        if https_only:
            stack.session.verify = settings.tls_cert  # a test's self-signed certificate
            stack.session.trust_env = False  # else REQUESTS_CA_BUNDLE wins over verify
        self.started.append(stack)
        deadline = time.monotonic() + 60
        while True:
            try:
                if stack.get("/rep", timeout=2).status_code == 200:
                    stack.wait_ready(settings.n, timeout=max(1.0, deadline - time.monotonic()))
                    return stack
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or a worker still booting on a loaded machine
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"lb-run did not come up:\n{stack.log()}")
            time.sleep(0.1)

    def stop_all(self) -> None:
        for stack in self.started:
            stack.session.close()
            if stack.proc.poll() is None:
                stack.proc.send_signal(signal.SIGTERM)
                try:
                    stack.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    stack.proc.kill()
            leftovers = kill_deployment(stack.settings.deployment)
            assert leftovers == 0, (
                f"{leftovers} processes of {stack.settings.deployment} outlived lb-run")


# Both data paths are held to the same tests: the event-driven worker (the default) and the
# threads worker (gthread + Flask, the reference implementation).
WORKERS = ("async", "threads")


@pytest.fixture(scope="module", params=WORKERS)
def lb_worker(request: pytest.FixtureRequest) -> str:
    """The balancer's data path (``LB_WORKER``) for every stack a test starts: each test that
    starts one runs once per worker."""
    return str(request.param)


@pytest.fixture
def make_stack(tmp_path: Path, lb_worker: str) -> Iterator[Callable[..., RunningStack]]:
    """Start ``lb-run`` with settings overrides; stopped (and checked clean) after the test."""
    factory = StackFactory(tmp_path, lb_worker)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory,
                 lb_worker: str) -> Iterator[RunningStack]:
    """One default stack for a whole module of tests that leave it as they found it."""
    factory = StackFactory(tmp_path_factory.mktemp("shared"), lb_worker)
    yield factory()
    factory.stop_all()


@pytest.fixture
def stack(make_stack: Callable[..., RunningStack]) -> RunningStack:
    """The default system: N=3 local replicas, spec hash functions."""
    return make_stack()


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is not installed: a skip, except under CI, whose setup installs
    it, where that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docker tests skip without an engine, except under CI where that is a failure."""
    if any("docker" in item.keywords for item in items) and not docker_available():
        if os.environ.get("CI") == "true":
            return  # let them run and fail loudly
        skip = pytest.mark.skip(reason="no Docker engine answers (set up one: see README)")
        for item in items:
            if "docker" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def swarm_cluster_session() -> Iterator[Any]:
    """One 3-node Docker Swarm of containers for the session (``tests/helpers_swarm.py``),
    taken down by this fixture's teardown alone: at the session's end, or when it is
    interrupted. Tests use ``swarm_cluster``."""
    from tests.helpers_swarm import running_cluster

    yield from running_cluster(free_port())


@pytest.fixture
def swarm_cluster(swarm_cluster_session: Any) -> Iterator[Any]:
    """The session's Swarm cluster for one test. Afterwards it is put back as every test finds
    it (``Cluster.restore``: nodes running and active, the stack whole, three replicas), and
    what had to be put back fails the test: the next test, whichever it is, must not depend on
    what ran before it."""
    yield swarm_cluster_session
    fixed = swarm_cluster_session.restore()
    assert not fixed, f"the test left the shared cluster otherwise: {fixed} (put back)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that ran stacks gets their warnings and errors as a report section: a
    flaky failure in CI shows the balancer's side (tracebacks included) without a re-run."""
    report = yield
    if report.failed and report.when == "call":
        stacks = []
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, StackFactory):
                stacks += value.started
            elif isinstance(value, RunningStack):
                stacks.append(value)
        seen: set[int] = set()
        for stack in stacks:
            if id(stack) in seen:
                continue
            seen.add(id(stack))
            lines = trouble(stack.log().splitlines())
            title = f"{stack.settings.deployment} ({stack.log_path.name}): WARNING and above"
            report.sections.append((title, "\n".join(lines[-80:]) or "(nothing)"))
    return report
