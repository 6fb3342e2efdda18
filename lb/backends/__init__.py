"""Replica backends behind one interface; ``create_backend`` picks one by setting."""

from __future__ import annotations

from lb.backends.base import STOP_TIMEOUT, Backend, BackendError, Instance, ReplicaSpec
from lb.settings import Settings

__all__ = ["STOP_TIMEOUT", "Backend", "BackendError", "Instance", "ReplicaSpec", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "local":
        from lb.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "docker":
        from lb.backends.docker import DockerBackend

        return DockerBackend(settings)
    if settings.backend == "swarm":
        from lb.backends.swarm import SwarmBackend

        return SwarmBackend(settings)
    raise BackendError(f"unknown backend {settings.backend!r}")
