"""Creating the registry a deployment starts from, or rebuilds from when its file is lost."""

from __future__ import annotations

import copy
import logging
import time

from lb.backends import Instance
from lb.hashring import RingFull
from lb.registry import DOWN, READY, REMOVING, STARTING, Registry, Replica, RingParams, State
from lb.settings import Settings

log = logging.getLogger(__name__)

# A rebuilt registry's version jumps this far past the last good one: balancer workers rebuild
# their routing table when the version *changes*, and one of them may have read a few writes
# that the rebuilder never saw.
REBUILD_VERSION_GAP = 1000


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


def recovered_state(settings: Settings, last_good: State | None,
                    running: list[Instance]) -> State:
    """What the registry should say when its file is lost: ``last_good`` (the last state the
    caller read), brought up to date with the replicas of this deployment that run now.

    A running replica an entry names gets that entry's handle and address (it was restarted
    after ``last_good`` was read); one no entry names (an ``/add`` committed after that) is
    taken in with its server id and that id's slots, unless the id is taken. Without a last
    good state and with nothing running, the deployment starts afresh (N replicas).
    """
    now = time.time()
    state = copy.deepcopy(last_good) if last_good else State(ring=ring_params(settings))
    by_name = {r.hostname: r for r in state.replicas}
    known_handles = {r.handle for r in state.replicas if r.handle}
    ring = state.hash_ring()
    for inst in sorted(running, key=lambda i: (i.server_id or 0, i.hostname)):
        if inst.handle in known_handles:
            continue
        entry = by_name.get(inst.hostname)
        if entry is not None:
            if entry.state != REMOVING and entry.server_id == inst.server_id:
                entry.handle, entry.address = inst.handle, inst.address
                if entry.state == DOWN:  # its heartbeat decides
                    entry.state, entry.deadline = STARTING, now + settings.start_timeout
            continue
        if inst.server_id is None or any(r.server_id == inst.server_id for r in state.replicas):
            continue  # not placeable: left an orphan, which the supervisor stops
        try:
            slots = ring.add(inst.server_id)
        except RingFull:
            continue
        adopted = Replica(inst.hostname, inst.server_id, list(slots), state=READY,
                          address=inst.address, handle=inst.handle, last_heartbeat=now)
        state.replicas.append(adopted)
        by_name[adopted.hostname] = adopted
    if last_good is None and not state.replicas:
        state = initial_state(settings)
    # Without a last good state nobody knows which versions were handed out: the clock is
    # past any of them (a registry gets a few writes a second at most).
    state.version = last_good.version + REBUILD_VERSION_GAP if last_good else int(now)
    return state
