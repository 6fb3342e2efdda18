"""Slow start: a replica that joins takes its keys gradually. Pure: no I/O.

A replica that became ready (an ``/add``, a replacement, a recovery) less than ``LB_SLOW_START``
seconds ago *ramps*: its fraction f grows linearly from 0 to 1 over that period, from its
``ready_since`` in the registry (a wall-clock time, so every balancer ramps it alike).

Each request key has a fixed *gate* in [0, 1) (a hash of the key alone). A key whose replica
in the full map (every routable replica at its weight) is ramping goes there once its gate is
below f; until then it stays where it was when that replica joined: where the map without it
(and without those that joined after it) sent the key then (``Ramped``). With one ramp that is
the *base* map, the one without the replicas that joined since the oldest ramp under way began.
So:

- the ramping replica's share is f x its full share at every moment: it rises monotonically;
- a key changes owner once, from its base owner to its full owner, when its gate opens, and
  never back (f only grows); keys of the replicas that are not ramping go where the full map
  sends them from the start (on a ring that is where they were; Maglev moves a few, as it
  does for any join);
- the base stays the same until every ramp under way has ended (a replica that finished its
  ramp while a later one still ramps stays out of it, open to all its keys). A key that an
  earlier ramp already took, and that the full map gives a later joiner, stays with the
  earlier one until the later one's gate opens: it moves once per join at most, never more
  often than the maps without slow start move it, and never back to a replica it left.

With nothing ramping, or nothing else to send the keys to (the first replicas of a stack), the
router uses the full map itself: no cost per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import xxhash

from lb.strategies import Lookup

GATE_SCALE = 1.0 / 2**64


def gate(key: int) -> float:
    """Where ``key`` stands in line to move to a ramping replica: uniform over [0, 1)."""
    return xxhash.xxh64_intdigest((key & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"),
                                  seed=0x510757) * GATE_SCALE


def ramping(since: Mapping[int, float | None], period: float,
            now: float) -> dict[int, float]:
    """Server id -> ``ready_since`` of the replicas in the ramp under way at ``now``: the one
    that joined last, if its ramp has not ended, and each that joined before it while the ramp
    of the one after it was still under way. (A replica whose ramp ended while a later one's
    goes on stays in: the base must not change under a ramp.)"""
    joined = sorted(((t, sid) for sid, t in since.items() if t is not None), reverse=True)
    if period <= 0 or not joined or now - joined[0][0] >= period:
        return {}
    chain: dict[int, float] = {}
    after = joined[0][0]
    for t, server_id in joined:
        if t + period <= after:
            break  # its ramp had ended when the next one began: it is the base's
        chain[server_id] = after = t
    return chain


def joining_order(ramps: Mapping[int, float]) -> list[int]:
    """The ramping replicas in the order they joined (server id breaks a tie)."""
    return sorted(ramps, key=lambda server_id: (ramps[server_id], server_id))


def joined_before(ramps: Mapping[int, float]) -> dict[int, int]:
    """Server id -> how many ramping replicas joined before it: the map its waiting keys fall
    back to has those (the replicas of one /add join together: none falls back to another)."""
    return {server_id: sum(t < since for t in ramps.values())
            for server_id, since in ramps.items()}


def fallbacks(ramps: Mapping[int, float]) -> set[int]:
    """The prefixes of ``joining_order`` whose maps ``Ramped`` needs besides the full one."""
    return set(joined_before(ramps).values())


class Ramped:
    """A ``Lookup`` over the full map whose ramping replicas take their keys gradually.

    ``ramps``: server id -> ready_since of the ramping replicas; ``maps``: i -> the strategy's
    map of every routable replica but the ramping ones (the base) and the first i of them in
    ``joining_order``, for i = ``len(ramps)`` (the full map) and each i in ``fallbacks``
    (0 among them: the base). ``clock``: wall-clock seconds.

    A key whose owner in a map is a replica still ramping and whose gate is shut goes where it
    was when that replica joined: where the previous map sent it then (``_owner``). With one
    ramp that is the base; with several, a key the earlier one had already taken stays there
    until the later one's gate opens, rather than going back to the base meanwhile.
    """

    def __init__(self, maps: Mapping[int, Lookup], ramps: Mapping[int, float], period: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not fallbacks(ramps) | {len(ramps)} <= maps.keys():
            raise ValueError("a map missing: the full one, or one to fall back to")
        self.maps = dict(maps)
        self.full, self.base = self.maps[len(ramps)], self.maps[0]
        self.ramps = dict(ramps)
        self.before = joined_before(ramps)
        self.order = joining_order(ramps)  # the last resort of a waiting key's walk
        self.period = period
        self.clock = clock
        self.layout = self.full.layout

    def fraction(self, server_id: int, now: float | None = None) -> float:
        """How far ``server_id``'s ramp has gone: 0 at its start, 1 at its end (and for a
        replica that does not ramp)."""
        since = self.ramps.get(server_id)
        if since is None:
            return 1.0
        now = self.clock() if now is None else now
        return min(1.0, max(0.0, (now - since) / self.period))

    def _owner(self, key: int) -> tuple[int | None, bool]:
        """Where ``key`` goes now, and whether that is its full owner."""
        i, now, place = len(self.ramps), self.clock(), None
        while True:
            owner = self.maps[i].lookup(key)
            if owner is None or owner not in self.ramps:
                return owner, i == len(self.ramps)
            place = gate(key) if place is None else place
            if place < self.fraction(owner, now):
                return owner, i == len(self.ramps)
            # Its gate is shut: it stays where it was when this replica joined, i.e. where
            # the map before it sent the key at that time.
            i, now = self.before[owner], self.ramps[owner]

    def lookup(self, key: int) -> int | None:
        return self._owner(key)[0]

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]:
        """The full map's walk for a key that goes to its full owner; else where it waits,
        then the base's walk, then the ramping replicas (when every other one cannot serve,
        one still ramping beats a 502)."""
        owner, settled = self._owner(key)
        if settled:
            yield from self.full.walk(key, skip)
            return
        skip = set(skip)
        if owner is not None and owner not in skip:
            skip.add(owner)
            yield owner
        yield from self.base.walk(key, skip)
        for server_id in self.order:
            if server_id not in skip:
                yield server_id

    def slot_of(self, key: int) -> int:
        return self.full.slot_of(key)

    def owners(self) -> Sequence[int | None]:
        return self.full.owners()

    def shares(self) -> dict[int, float]:
        """Each server's share of the key space now: the keys of each slot split by their
        gates as ``_owner`` splits them (gates are uniform over [0, 1))."""
        owners = {i: m.owners() for i, m in self.maps.items()}
        now, top = self.clock(), len(self.ramps)
        out = dict.fromkeys(self.full.shares(), 0.0)
        unit = 1.0 / len(owners[top]) if owners[top] else 0.0
        for slot in range(len(owners[top])):
            i, at, low = top, now, 0.0  # the slot's keys with gates in [low, 1)
            while low < 1.0 and (owner := owners[i][slot]) is not None:
                cut = max(low, self.fraction(owner, at))  # 1 for one that does not ramp
                out[owner] = out.get(owner, 0.0) + (cut - low) * unit
                if owner in self.ramps:
                    i, at = self.before[owner], self.ramps[owner]
                low = cut
        return out

    def virtual_servers(self) -> list[tuple[int, int]]:
        return self.full.virtual_servers()
