"""The test cluster's own life (``tests/helpers_swarm.py``), on real one-node clusters: a
session's cluster is taken down by the session's teardown when the session is interrupted
(Ctrl-C) while the cluster is made or while a test runs; a session killed outright (SIGKILL)
leaves its cluster running, and the next run's clean-up removes it (and what an older run left)
while one whose session lives is left alone; only the session fixture takes the shared cluster
down. Each session here is a pytest of its own in a subprocess whose session fixture is
``running_cluster`` with a one-node cluster (seconds, not the minutes of the stack's).
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import psutil
import pytest

from lb.backends.docker import LABEL_ROLE
from tests.helpers_swarm import (
    CLUSTER_LABEL,
    NODE_IMAGE,
    OWNER_LABEL,
    ROOT,
    TEST_CLUSTER_PREFIX,
    Cluster,
    remains_of,
    remove_abandoned_clusters,
)

SESSION_TIMEOUT = 120.0  # seconds for a session's one-node cluster to be up, or down

# A test session holding a one-node cluster: its one test writes the cluster's name to MARKER
# and waits to be interrupted or killed.
SESSION = '''
import os
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.helpers_swarm import one_node_up, running_cluster


@pytest.fixture(scope="session")
def cluster():
    yield from running_cluster(free_port(), up=one_node_up)


def test_holds_the_cluster(cluster):
    assert cluster.client().info()["Swarm"]["LocalNodeState"] == "active"
    Path(os.environ["MARKER"]).write_text(cluster.name)
    time.sleep(600)
'''


class Session:
    """A pytest session in a process group of its own (as a terminal's foreground job)."""

    def __init__(self, folder: Path) -> None:
        (folder / "pytest.ini").write_text("[pytest]\n")
        (folder / "test_session.py").write_text(SESSION)
        self.marker = folder / "cluster-name"
        self.output = folder / "output.txt"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
                 "-c", str(folder / "pytest.ini"), str(folder / "test_session.py")],
                cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "MARKER": str(self.marker)})
        # What running_cluster labels its cluster with (owner_of_this_run in that process).
        self.owner = f"{self.proc.pid}:{int(psutil.Process(self.proc.pid).create_time())}"

    def said(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]

    def wait_for(self, what: str, found: Callable[[], str | None]) -> str:
        deadline = time.monotonic() + SESSION_TIMEOUT
        while not (value := found()):
            assert self.proc.poll() is None, f"the session ended before {what}:\n{self.said()}"
            assert time.monotonic() < deadline, f"no {what} in {SESSION_TIMEOUT}s:\n{self.said()}"
            time.sleep(0.1)
        return value

    def holding(self) -> str:
        """The cluster's name, once the session's test holds it."""
        return self.wait_for("cluster held by the test",
                             lambda: self.marker.read_text() if self.marker.exists() else None)

    def node_running(self) -> str:
        """The cluster's name, once its node runs (the session still making the cluster)."""
        def found() -> str | None:
            host = docker.from_env(timeout=60)
            try:
                nodes = host.containers.list(filters={"label": f"{OWNER_LABEL}={self.owner}",
                                                      "status": "running"})
            finally:
                host.close()
            return nodes[0].labels[CLUSTER_LABEL] if nodes else None
        return self.wait_for("node running", found)

    def end(self, sig: signal.Signals) -> int:
        """Send ``sig`` (SIGINT: to the group, as a terminal's Ctrl-C); the exit status."""
        if sig == signal.SIGINT:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=SESSION_TIMEOUT)

    def clusters(self) -> set[str]:
        """The names of the clusters this session made (what carries its owner label)."""
        host = docker.from_env(timeout=60)
        try:
            owned = {"label": f"{OWNER_LABEL}={self.owner}"}
            found = [c.labels for c in host.containers.list(all=True, filters=owned)]
            found += [v.attrs.get("Labels") or {} for v in host.volumes.list(filters=owned)]
            found += [n.attrs.get("Labels") or {} for n in host.networks.list(filters=owned)]
        finally:
            host.close()
        return {labels[CLUSTER_LABEL] for labels in found}


def take_down(*names: str) -> None:
    for name in names:
        if remains_of(name):
            Cluster(name, Path("/tmp") / name, 0).make("cluster-down", timeout=300)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A session; afterwards it is ended and whatever it made is removed, whatever the test
    did."""
    started = Session(tmp_path)
    yield started
    if started.proc.poll() is None:
        os.killpg(started.proc.pid, signal.SIGKILL)
        started.proc.wait(timeout=30)
    take_down(*started.clusters())


@pytest.mark.docker
@pytest.mark.swarm
@pytest.mark.parametrize("when", ["while the cluster is made", "while a test runs"])
def test_ctrl_c_takes_the_sessions_cluster_down(session: Session, when: str) -> None:
    name = session.node_running() if when == "while the cluster is made" else session.holding()
    assert any(r.startswith("container ") for r in remains_of(name)), remains_of(name)
    status = session.end(signal.SIGINT)
    said = session.said()
    assert status == pytest.ExitCode.INTERRUPTED, said
    assert "KeyboardInterrupt" in said, said
    assert session.marker.exists() == (when == "while a test runs"), said
    assert remains_of(name) == [], said
    assert not Path("/tmp", name).exists()


@pytest.mark.docker
@pytest.mark.swarm
def test_a_killed_sessions_cluster_is_removed_by_the_next_run_a_live_ones_is_not(
        session: Session) -> None:
    """The session killed outright while its cluster runs: its node still runs, and the clean-up
    each run starts with (``remove_abandoned_clusters``) removes all of it; before, while the
    session lived, the clean-up left it alone. Also removed: a cluster of which the killed
    session had made only the network, and an older run's node without an owner, not running."""
    name = session.holding()
    assert name not in remove_abandoned_clusters()
    assert len(remains_of(name)) == 3, remains_of(name)  # the node, its volume, the network
    assert session.end(signal.SIGKILL) == -signal.SIGKILL

    host = docker.from_env(timeout=60)
    partial = f"{TEST_CLUSTER_PREFIX}part{uuid.uuid4().hex[:4]}"
    older = f"{TEST_CLUSTER_PREFIX}old{uuid.uuid4().hex[:4]}"
    try:
        (node,) = host.containers.list(filters={"label": f"{CLUSTER_LABEL}={name}"})
        assert node.status == "running"
        host.networks.create(f"{partial}-net",
                             labels={CLUSTER_LABEL: partial, OWNER_LABEL: session.owner})
        host.containers.create(NODE_IMAGE, name=f"{older}-manager", network_mode="none",
                               labels={CLUSTER_LABEL: older, LABEL_ROLE: "node"})
        removed = remove_abandoned_clusters()
        assert {name, partial, older} <= set(removed), removed
        assert remains_of(name) == remains_of(partial) == remains_of(older) == []
        assert not Path("/tmp", name).exists()
    finally:
        host.close()
        take_down(partial, older)


def test_only_the_session_fixture_takes_the_shared_cluster_down() -> None:
    """Statically, for every test module: none but ``helpers_swarm`` runs ``cluster-down`` (or
    ``ci/cluster.sh down``), and no function but ``conftest.swarm_cluster`` asks for the
    session's cluster itself (every test gets it through the fixture that checks it is left
    as it was found)."""
    here = Path(__file__).resolve()
    takes_down = re.compile(r"cluster-down|cluster\.sh\W+down")
    askers = []
    for path in sorted(here.parent.glob("*.py")):
        if path == here:
            continue
        source = path.read_text()
        if path.name != "helpers_swarm.py":
            assert not takes_down.search(source), f"{path.name} takes a cluster down"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg == "swarm_cluster_session" for a in args):
                    askers.append(f"{path.stem}.{node.name}")
            elif isinstance(node, ast.Constant) and node.value == "swarm_cluster_session":
                askers.append(f"{path.stem}: {node.value!r}")  # getfixturevalue, usefixtures
    assert askers == ["conftest.swarm_cluster"]
