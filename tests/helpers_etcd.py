"""Real etcd members for the tests (Debian's ``etcd-server``; ``.ci/run`` installs it).

``etcd_cluster``: one 3-member cluster for a whole test session, each test on keys of its own
(``etcd_prefix``). ``new_cluster``: a cluster of a test's own, for the tests that kill, pause or
restart members. Every member is stopped at the end; a test's own cluster also loses its data.
Import the fixtures into a test module: ``from tests.helpers_etcd import etcd_cluster, ...``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lb.etcd import EtcdRegistry
from lb.ha import EtcdCluster, free_port_run
from lb.settings import EtcdAddress
from tests.conftest import unavailable


def start_cluster(folder: Path, size: int = 3) -> EtcdCluster:
    if shutil.which("etcd") is None:
        unavailable("etcd is not installed (Debian: apt-get install etcd-server)")
    base = free_port_run(2 * size + 1)
    cluster = EtcdCluster(str(folder), size=size, client_port=base, peer_port=base + size)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.close()


@pytest.fixture
def etcd_prefix() -> str:
    """Keys of this test's own under the session's cluster."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def etcd_registry(etcd_cluster: EtcdCluster, etcd_prefix: str) -> EtcdRegistry:
    """An etcd registry on the session's cluster, empty (no state key yet)."""
    return EtcdRegistry(EtcdAddress(etcd_cluster.endpoints, "/" + etcd_prefix), lock_timeout=5.0)


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[Callable[[], EtcdCluster]]:
    """A factory of clusters of the test's own, all stopped at its end."""
    made: list[EtcdCluster] = []

    def make() -> EtcdCluster:
        cluster = start_cluster(tmp_path / f"etcd{len(made)}")
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
