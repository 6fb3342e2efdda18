"""The status document behind /_lb/status.json, the status page and ``lbctl status``.

Built from the registry (replicas, states, heartbeats, weights, the hash map), the lookup the
router uses (its strategy's view of the key space, slow start's ramps included), and the
metrics counters
(requests and errors per replica, added up over every worker). Recent rates come from a small
window of earlier samples this worker took: the counters are shared, so any worker's samples
give the deployment's rate.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lb.hashring import resolve_preset
from lb.registry import ReplicaState, State
from lb.settings import Settings
from lb.slowstart import Ramped
from lb.strategies import Lookup

RATE_WINDOW_SECONDS = 60.0  # samples older than this are dropped
RATE_MIN_SECONDS = 1.0  # a rate needs samples at least this far apart


@dataclass(frozen=True)
class Counts:
    """Cumulative figures of one replica: requests it answered, and errors (5xx answers plus
    attempts that could not reach it)."""

    requests: float = 0.0
    errors: float = 0.0
    ejections: float = 0.0


class RateWindow:
    """Per-key rates from cumulative counts sampled now and then."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self.window = window
        self._samples: deque[tuple[float, dict[str, Counts]]] = deque()
        self._lock = threading.Lock()

    def rates(self, now: float, counts: dict[str, Counts]) -> tuple[float | None,
                                                                     dict[str, Counts]]:
        """Record ``counts`` taken at ``now``; return the seconds the rates span (None when
        there is no earlier sample far enough back) and per-key rates per second."""
        with self._lock:
            while self._samples and now - self._samples[0][0] > self.window:
                self._samples.popleft()
            base = next((s for s in self._samples if now - s[0] >= RATE_MIN_SECONDS), None)
            if not self._samples or now - self._samples[-1][0] >= RATE_MIN_SECONDS:
                self._samples.append((now, counts))
        if base is None:
            return None, {}
        span = now - base[0]
        out = {}
        for key, c in counts.items():
            before = base[1].get(key, Counts())
            # A counter only goes back when the deployment restarted: count from zero then.
            requests = c.requests - before.requests if c.requests >= before.requests else c.requests
            errors = c.errors - before.errors if c.errors >= before.errors else c.errors
            out[key] = Counts(requests / span, errors / span)
        return span, out


@dataclass(frozen=True)
class KeySpace:
    """What a lookup gives each server id: ``shares`` of the key space now (what the router
    sends it), ``full`` shares at its weight once no ramp runs, and the ``ramps`` (fraction
    0..1) of the replicas that slow start ramps up now."""

    shares: dict[int, float]
    full: dict[int, float]
    ramps: dict[int, float]


def key_space(lookup: Lookup) -> KeySpace:
    """The shares and ramps of ``lookup``, the router's own (``Router.table().ring``): a
    ``Ramped`` lookup knows both its shares now and its full map's; any other has no ramp."""
    shares = lookup.shares()
    if not isinstance(lookup, Ramped):
        return KeySpace(shares, shares, {})
    # A replica whose ramp has ended stays in the lookup (fraction 1) until the registry next
    # changes: it ramps no more.
    ramps = {sid: f for sid in lookup.ramps if (f := lookup.fraction(sid)) < 1.0}
    return KeySpace(shares, lookup.full.shares(), ramps)


def arcs(owner_by_slot: Iterable[int | None]) -> list[list[int]]:
    """Runs of consecutive slots with one owner: ``[first, last, server_id]`` each."""
    runs: list[list[int]] = []
    for slot, owner in enumerate(owner_by_slot):
        if owner is None:
            continue
        if runs and runs[-1][2] == owner and runs[-1][1] == slot - 1:
            runs[-1][1] = slot
        else:
            runs.append([slot, slot, owner])
    return runs


def build_status(state: State, counts: dict[str, Counts], rates: dict[str, Counts],
                 span: float | None, settings: Settings,
                 now: float | None = None,
                 registry: dict[str, Any] | None = None,
                 ejected: dict[str, float] | None = None,
                 load: dict[str, tuple[int, int]] | None = None,
                 lookup: Lookup | None = None) -> dict[str, Any]:
    """The status document (see the OpenAPI description's ``Status`` schema).

    ``ejected``: the Unix time each replica this worker has ejected comes back
    (``lb.ejections``). ``load``: this worker's requests in flight and queued per replica
    (``lb.limits``).

    ``lookup``: the one the router uses for ``state`` (``Router.table().ring``); shares, ramps
    and slot ownership come from it, through the ``Lookup`` interface: a ring's slots, or
    Maglev's table entries. Without it, the strategy's lookup at full weights (no ramp).
    """
    now = time.time() if now is None else now
    ejected = ejected or {}
    load = load or {}
    routable = state.routable()
    lookup = state.lookup(settings.strategy, routable) if lookup is None else lookup
    space = key_space(lookup)
    # Which routable replica answers for each slot or entry at full weight (while a replica
    # ramps, part of its slots' keys still go to their former owners: ``share`` says how much).
    owners = lookup.owners()
    slots = len(owners)
    owned = Counter(owners)
    routable_names = {r.hostname for r in routable}
    preset = resolve_preset(state.ring.hash, state.ring.virtual)
    replicas = []
    for r in state.replicas:
        c = counts.get(r.hostname, Counts())
        rate = rates.get(r.hostname)
        routes = r.hostname in routable_names
        replicas.append({
            "hostname": r.hostname,
            "server_id": r.server_id,
            "state": r.state,
            "routable": routes,
            "address": r.address,
            "domain": r.domain,
            "virtual_slots": sorted(r.slots),
            "slots_owned": owned[r.server_id] if routes else 0,
            "weight": r.weight,
            "share": space.shares.get(r.server_id, 0.0) if routes else 0.0,
            "expected_share": space.full.get(r.server_id, 0.0) if routes else 0.0,
            "ramp": space.ramps.get(r.server_id) if routes else None,
            "last_heartbeat": r.last_heartbeat,
            "heartbeat_age": None if r.last_heartbeat is None else max(0.0, now - r.last_heartbeat),
            "failures": r.failures,
            "restarts": r.restarts,
            "requests": int(c.requests),
            "errors": int(c.errors),
            "request_rate": None if rate is None else rate.requests,
            "error_rate": None if rate is None else rate.errors,
            "ejected_until": ejected.get(r.hostname),
            "ejections": int(c.ejections),
            "in_flight": load.get(r.hostname, (0, 0))[0],
            "queued": load.get(r.hostname, (0, 0))[1],
        })
    members = state.members()
    return {
        "deployment": settings.deployment,
        "generated_at": now,
        "registry_version": state.version,
        "registry": registry or {"store": "file", "revision": state.version, "leader": None,
                                 "change_age": None},
        "rep": state.rep(),
        "replicas_desired": len(members),
        "replicas_by_state": {name: sum(r.state == name for r in state.replicas)
                              for name in ReplicaState},
        "hash_map": {
            "preset": state.ring.hash,
            "description": preset.description,
            "formulas": (None if preset.formulas is None
                         else {"H": preset.formulas[0], "Phi": preset.formulas[1]}),
            "slots": state.ring.slots,
            "virtual": state.ring.virtual,
            "probing": state.ring.probing,
            "strategy": settings.strategy,
            "hash_key": settings.hash_key,
        },
        "ring": {
            "layout": lookup.layout,
            "slots": slots,
            # A table's entries are scattered: runs of one owner are ~1.5 entries long there.
            "arcs": arcs(owners) if lookup.layout == "ring" else [],
            "virtual_servers": [list(v) for v in lookup.virtual_servers()],
        },
        "rate_window": span,
        "totals": {
            "requests": int(sum(c.requests for c in counts.values())),
            "errors": int(sum(c.errors for c in counts.values())),
        },
        "replicas": replicas,
    }
