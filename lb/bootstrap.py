"""Creating the registry a deployment starts from (or rebuilds from when its file is lost), and
keeping its hash map consistent.

A registry remembers the hash map it was written with (``RingParams``: M, K, the hash spec in
canonical form, probing): the replicas' persisted slots were placed by that Phi. Resuming it
under other settings would route by one map and place new replicas by another, so it is
refused (``HashMapMismatch``) unless the caller asks to migrate: every replica's virtual
servers placed again under the new map, in ascending server id order (as a fresh start does).
"""

from __future__ import annotations

import copy
import logging
import time

from lb.backends import Instance
from lb.hashring import HashRing, RingError, RingFull, canonical_hash
from lb.leases import Lease, Purpose
from lb.registry import (
    DOWN,
    READY,
    REMOVING,
    STARTING,
    RegistryError,
    Replica,
    RingParams,
    State,
)
from lb.settings import Settings
from lb.stores import Store

log = logging.getLogger(__name__)

# A rebuilt registry's version jumps this far past the last good one: balancer workers rebuild
# their routing table when the version *changes*, and one of them may have read a few writes
# that the rebuilder never saw.
REBUILD_VERSION_GAP = 1000


class HashMapMismatch(RegistryError):
    """The registry was written with another hash map than the settings ask for."""


def ring_params(settings: Settings) -> RingParams:
    k = settings.virtual_per_server
    return RingParams(settings.slots, k, canonical_hash(settings.hash, k), settings.probing)


def describe(params: RingParams) -> str:
    return (f"M={params.slots}, K={params.virtual}, hash {params.hash}, "
            f"{params.probing} probing")


def initial_state(settings: Settings) -> State:
    """N wanted replicas ``Server1..N`` with server ids 1..N and no process yet."""
    state = State(ring=ring_params(settings))
    ring = state.hash_ring()
    for server_id in range(1, settings.n + 1):
        slots = ring.add(server_id)
        state.replicas.append(Replica(f"Server{server_id}", server_id, list(slots)))
    return state


def ensure_registry(settings: Settings, registry: Store, reset: bool = False,
                    migrate: bool = False) -> State:
    """The registry, created from the settings if missing (or when ``reset``).

    An existing registry written with another hash map is refused with ``HashMapMismatch``,
    or, with ``migrate``, placed again under the settings' map. The supervisor starts the new
    entries, as it starts any wanted replica that is not running.
    """
    state = registry.create(initial_state(settings), replace=reset)
    wanted = ring_params(settings)
    if state.ring == wanted:
        return state
    if not migrate:
        raise HashMapMismatch(
            f"registry {registry.where} was written with the hash map {describe(state.ring)}, "
            f"but the settings ask for {describe(wanted)}; resuming would mix the two. Start "
            "afresh (lb-run without --keep-registry), set the settings back, or place every "
            "replica again under the new map (lb-run --keep-registry --migrate-hash)")
    return migrate_registry(registry, wanted)


def migrate_registry(registry: Store, wanted: RingParams) -> State:
    """Every entry's virtual servers placed again under ``wanted``; keys move accordingly.

    Entries keep their hostnames, server ids, addresses and processes: only ``slots`` change.
    """
    with registry.update() as state:
        old = state.ring
        if old == wanted:
            return state
        ring = HashRing(wanted.slots, wanted.virtual, wanted.hash, wanted.probing)
        try:
            for replica in sorted(state.replicas, key=lambda r: r.server_id):
                replica.slots = list(ring.add(replica.server_id))
        except RingError as exc:
            raise HashMapMismatch(f"registry {registry.where} cannot move to the hash map "
                                  f"{describe(wanted)}: {exc}") from None
        state.ring = wanted
    log.warning("registry %s moved from the hash map %s to %s: %d replicas placed again",
                registry.where, describe(old), describe(wanted), len(state.replicas))
    return registry.read()


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
                entry.runs_as(inst)
                if entry.state == DOWN:  # its heartbeat decides
                    entry.state = STARTING
                    entry.lease = Lease.take(Purpose.SUPERVISOR, settings.start_timeout, now)
            continue
        if inst.server_id is None or any(r.server_id == inst.server_id for r in state.replicas):
            continue  # not placeable: left an orphan, which the supervisor stops
        try:
            slots = ring.add(inst.server_id)
        except RingFull:
            continue
        adopted = Replica(inst.hostname, inst.server_id, list(slots), state=READY,
                          last_heartbeat=now)
        adopted.runs_as(inst)
        state.replicas.append(adopted)
        by_name[adopted.hostname] = adopted
    if last_good is None and not state.replicas:
        state = initial_state(settings)
    # Without a last good state nobody knows which versions were handed out: the clock is
    # past any of them (a registry gets a few writes a second at most).
    state.version = last_good.version + REBUILD_VERSION_GAP if last_good else int(now)
    return state
