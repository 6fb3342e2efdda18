"""Slow start: a replica that joins takes its keys gradually. Pure: no I/O.

A replica that became ready (an ``/add``, a replacement, a recovery) less than ``LB_SLOW_START``
seconds ago *ramps*: its fraction f grows linearly from 0 to 1 over that period, from its
``ready_since`` in the registry (a wall-clock time, so every balancer ramps it alike).

Each request key has a fixed *gate* in [0, 1) (a hash of the key alone). A key whose replica
in the full map (every routable replica at its weight) is ramping goes there once its gate is
below f; until then it goes where the *base* map sends it: the map without the replicas that
joined since the oldest ramp under way began. So:

- the ramping replica's share is f x its full share at every moment: it rises monotonically;
- a key changes owner once, from its base owner to its full owner, when its gate opens, and
  never back (f only grows); keys of the replicas that are not ramping go where the full map
  sends them from the start (on a ring that is where they were; Maglev moves a few, as it
  does for any join);
- the base stays the same until every ramp under way has ended (a replica that finished its
  ramp while a later one still ramps stays out of it, open to all its keys), so a key between
  two joining replicas does not move twice either.

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


class Ramped:
    """A ``Lookup`` over the full map whose ramping replicas take their keys gradually.

    ``full``: every routable replica at its weight; ``base``: the same without the ramping
    ones (``ramps``: server id -> ready_since); ``clock``: wall-clock seconds.
    """

    def __init__(self, full: Lookup, base: Lookup, ramps: Mapping[int, float], period: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.full, self.base = full, base
        self.ramps = dict(ramps)
        self.period = period
        self.clock = clock
        self.layout = full.layout
        self.ends = max(self.ramps.values()) + period

    def fraction(self, server_id: int, now: float | None = None) -> float:
        """How far ``server_id``'s ramp has gone: 0 at its start, 1 at its end (and for a
        replica that does not ramp)."""
        since = self.ramps.get(server_id)
        if since is None:
            return 1.0
        now = self.clock() if now is None else now
        return min(1.0, max(0.0, (now - since) / self.period))

    def _waits(self, key: int, owner: int | None) -> bool:
        """Whether ``key``, whose full owner is ``owner``, still goes where the base sends it."""
        return owner in self.ramps and gate(key) >= self.fraction(owner)

    def lookup(self, key: int) -> int | None:
        owner = self.full.lookup(key)
        return self.base.lookup(key) if self._waits(key, owner) else owner

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]:
        """The full map's walk for a key whose gate is open; else the base's, then the ramping
        replicas (when every other one cannot serve, one still ramping beats a 502)."""
        if not self._waits(key, self.full.lookup(key)):
            yield from self.full.walk(key, skip)
            return
        skip = set(skip)
        yield from self.base.walk(key, skip)
        for server_id in sorted(self.ramps):
            if server_id not in skip:
                yield server_id

    def slot_of(self, key: int) -> int:
        return self.full.slot_of(key)

    def owners(self) -> Sequence[int | None]:
        return self.full.owners()

    def shares(self) -> dict[int, float]:
        """Each server's share of the key space now: a ramping replica's full share times its
        fraction, the rest of it with the base owners of its slots."""
        full, base = self.full.owners(), self.base.owners()
        now = self.clock()
        out = dict.fromkeys(self.full.shares(), 0.0)
        unit = 1.0 / len(full) if full else 0.0
        for owner, fallback in zip(full, base):
            if owner is None:
                continue
            f = self.fraction(owner, now)
            out[owner] += f * unit
            if f < 1.0 and fallback is not None:
                out[fallback] = out.get(fallback, 0.0) + (1.0 - f) * unit
        return out

    def virtual_servers(self) -> list[tuple[int, int]]:
        return self.full.virtual_servers()
