"""The one seam between the system and wherever replicas run."""

from __future__ import annotations

import abc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# How long a graceful stop waits for a replica before forcing it: its requests in flight get this
# long to finish.
STOP_TIMEOUT = 10.0


class BackendError(Exception):
    """Root of the backends' errors: a replica could not be started, stopped or listed."""


@dataclass(frozen=True)
class ReplicaSpec:
    """What to start: a replica named ``hostname`` answering as ``Server: <server_id>``."""

    hostname: str
    server_id: int


@dataclass(frozen=True)
class Instance:
    """A running replica, as the backend sees it."""

    hostname: str
    handle: str  # the backend's own id for it (pid/token, container or service id)
    address: str  # base URL the balancer and the supervisor use, e.g. http://127.0.0.1:41234
    server_id: int | None = None
    # The failure domain it runs in, stable for its life: the Swarm node's hostname. None
    # where every replica shares one host (local processes, one Docker engine).
    domain: str | None = None


class Backend(abc.ABC):
    """Start, stop and list the replicas of one deployment.

    Implementations only ever touch replicas they marked as this deployment's own.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def start(self, spec: ReplicaSpec) -> Instance:
        """Start a replica and return at once; readiness is the caller's heartbeat to check."""

    @abc.abstractmethod
    def stop(self, handle: str, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully (in-flight requests finish), then force. Already gone is success."""

    @abc.abstractmethod
    def list(self) -> list[Instance]:
        """Replicas of this deployment that are running now."""

    def prepare(self) -> None:
        """Make ready what replicas need before the first one starts (idempotent). ``lb-run``
        calls it; a deployment that brings its own (compose's network) has it already."""

    def release(self) -> None:
        """Once every replica is stopped: undo what ``prepare`` made, and nothing else."""

    def is_running(self, handle: str) -> bool:
        """Whether the replica behind ``handle`` still runs (may be cheaper than ``list``)."""
        return any(i.handle == handle for i in self.list())

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stop every replica of this deployment; returns how many there were."""
        instances = self.list()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda i: self.stop(i.handle, timeout), instances))
        return len(instances)
