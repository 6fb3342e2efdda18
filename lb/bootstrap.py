"""Creating the registry a deployment starts from."""

from __future__ import annotations

import logging

from lb.registry import Registry, Replica, RingParams, State
from lb.settings import Settings

log = logging.getLogger(__name__)


def ring_params(settings: Settings) -> RingParams:
    return RingParams(settings.slots, settings.virtual_per_server, settings.hash, settings.probing)


def initial_state(settings: Settings) -> State:
    """N wanted replicas ``Server1..N`` with server ids 1..N and no process yet."""
    state = State(ring=ring_params(settings))
    ring = state.hash_ring()
    for server_id in range(1, settings.n + 1):
        slots = ring.add(server_id)
        state.replicas.append(Replica(f"Server{server_id}", server_id, list(slots)))
    return state


def ensure_registry(settings: Settings, registry: Registry, reset: bool = False) -> State:
    """The registry, created from the settings if missing (or when ``reset``).

    The supervisor starts the new entries, as it starts any wanted replica that is not running.
    """
    state = registry.create(initial_state(settings), replace=reset)
    if state.ring != ring_params(settings):
        log.warning("registry %s keeps its hash map %s; the settings ask for %s",
                    registry.path, state.ring, ring_params(settings))
    return state
