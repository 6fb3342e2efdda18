"""Lookup strategies: how a request key becomes a replica, over the routable replicas.

Every strategy answers ``lookup(key)`` (one server id or None) and ``walk(key, skip)`` (distinct
server ids in the order to try them), and describes how it divides the key space through the
same ``Lookup`` interface: ``slot_of(key)`` (the ring slot or table entry a key lands on),
``owners()`` (the server answering for each of them), ``shares()`` (the fraction of them each
server answers for) and ``virtual_servers()``. The status page, the metrics and
``lb-analyze balance`` read shares and ownership only through it, so they report the strategy
that routes. Pure: no I/O.

- ``ring``: the consistent hash map itself (``LB_HASH``, ``LB_SLOTS``, ``LB_VIRTUAL``), on the
  slots persisted in the registry: the specification's map.
- ``ring160``: a well-mixed ring in one setting: xxHash, 65,536 slots, 160 virtual servers per
  replica, placed from the routable server ids alone (ascending, so the map is a function of the
  set of ids, and a replacement that keeps its server id moves no key).
- ``maglev``: Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size 65,537
  that every replica fills in turn along its own permutation, so each owns M/N entries +- 1.

The router rebuilds its lookup whenever the registry's version changes, which happens on every
heartbeat round; the two built-from-ids strategies are therefore cached by their inputs and only
built again when the set of routable server ids changes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import xxhash

from lb.hashring import HashRing, u64

MAGLEV_TABLE_SIZE = 65537  # prime; the paper's default, >> 100 x the largest N we allow
RING160_SLOTS = 65536
RING160_VIRTUAL = 160


# The keys of the specification's requests: every 6-digit request id.
REQUEST_IDS = range(100000, 1000000)


class Lookup(Protocol):
    """A strategy's map from request keys to server ids, and its division of the key space
    into slots (a ring's M slots, Maglev's table entries)."""

    layout: str  # "ring": a server answers for arcs of consecutive slots; "table": scattered

    def lookup(self, key: int) -> int | None:
        """The server id for ``key``: always ``walk(key)``'s first (routing counts on it)."""
        ...

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]: ...

    def slot_of(self, key: int) -> int:
        """The slot (table entry) ``key`` lands on: it depends on the key alone."""
        ...

    def owners(self) -> Sequence[int | None]:
        """The server id answering for each slot, in slot order."""
        ...

    def shares(self) -> dict[int, float]:
        """Fraction of the slots each server answers for."""
        ...

    def virtual_servers(self) -> list[tuple[int, int]]:
        """(slot, server id) of each virtual server on a ring; empty for a table."""
        ...


def expected_shares(lookup: Lookup, keys: Iterable[int] = REQUEST_IDS) -> dict[int, float]:
    """Fraction of ``keys`` (default: all 900,000 6-digit request ids) each server gets.

    Unlike ``shares()`` this weighs each slot by the keys the hash sends there: a request hash
    that reaches only some slots (the handout's H reaches 87 of 512) shows here. Counted slot by
    slot, so a strategy's slots are hashed once however many server sets are looked at.
    """
    return shares_by_weight(lookup, slot_weights(lookup, keys))


def slot_weights(lookup: Lookup, keys: Iterable[int] = REQUEST_IDS) -> Counter[int]:
    """How many of ``keys`` land on each slot; depends on the strategy's hash, not its servers."""
    return Counter(map(lookup.slot_of, keys))


def shares_by_weight(lookup: Lookup, weights: Counter[int]) -> dict[int, float]:
    owners = lookup.owners()
    total = sum(weights.values())
    out: dict[int, float] = {}
    for slot, count in weights.items():
        owner = owners[slot]
        if owner is not None:
            out[owner] = out.get(owner, 0.0) + count / total
    return {sid: out.get(sid, 0.0) for sid in lookup.shares()}


def key_hash(key: int) -> int:
    """A request key mixed to 64 bits (Maglev's table index is this mod M)."""
    # u64(key) spelled out: the same bytes, a third of the time (once per request).
    return xxhash.xxh64_intdigest((key & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"),
                                  seed=0x4D41474C)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


class Maglev:
    """Maglev's lookup table over a set of server ids.

    Each server id i has a permutation of the M entries, ``(offset_i + j * skip_i) mod M`` with
    offset and skip from two independent hashes of i (M prime, so every skip in 1..M-1 visits
    every entry). Servers take turns, in ascending id order, claiming the next entry of their
    permutation that is still free, until the table is full: each ends up with floor(M/N) or
    ceil(M/N) entries. The table depends only on the set of ids, never on history.
    """

    layout = "table"  # entries scattered over the table: no arcs

    def __init__(self, server_ids: Iterable[int], table_size: int = MAGLEV_TABLE_SIZE) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"the Maglev table size must be prime, not {table_size}")
        ids = sorted(set(server_ids))
        if ids and ids[0] < 0:
            raise ValueError("server ids must be >= 0")
        if len(ids) > table_size:
            raise ValueError(f"{len(ids)} servers do not fit a table of {table_size}")
        self.table_size = table_size
        self.servers = ids
        self._ids = frozenset(ids)
        self.table: list[int] = self._populate(ids, table_size) if ids else []
        self._shares: dict[int, float] | None = None

    @staticmethod
    def _populate(ids: list[int], m: int) -> list[int]:
        offsets = [xxhash.xxh64_intdigest(u64(i), seed=0x0FF5E7) % m for i in ids]
        skips = [xxhash.xxh64_intdigest(u64(i), seed=0x5C1F) % (m - 1) + 1 for i in ids]
        position = list(offsets)  # each server's current entry along its permutation
        table = [-1] * m
        filled = 0
        while True:
            for n, server_id in enumerate(ids):
                c, skip = position[n], skips[n]
                while table[c] >= 0:
                    c += skip
                    if c >= m:
                        c -= m
                table[c] = server_id
                c += skip
                position[n] = c - m if c >= m else c
                filled += 1
                if filled == m:
                    return table

    def slot_of(self, key: int) -> int:
        return key_hash(key) % self.table_size

    def lookup(self, key: int) -> int | None:
        if not self.table:
            return None
        return self.table[key_hash(key) % self.table_size]

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]:
        """``lookup(key)`` first, then the other servers in the order the table lists them
        from the key's entry on: a pseudo-random order per key, so the keys of a replica that
        cannot serve spread over all the others instead of piling onto one neighbour."""
        if not self.table:
            return
        seen = set(skip)
        remaining = len(self._ids - seen)
        m = self.table_size
        table = self.table
        entry = key_hash(key) % m
        for _ in range(m):
            if remaining == 0:
                return
            owner = table[entry]
            if owner not in seen:
                seen.add(owner)
                remaining -= 1
                yield owner
            entry = entry + 1 if entry + 1 < m else 0

    def owners(self) -> Sequence[int | None]:
        return self.table if self.table else [None] * self.table_size

    def shares(self) -> dict[int, float]:
        """Fraction of the table (and so of a uniform key space) each server answers for."""
        if self._shares is None:  # instances are cached per set of ids: count once
            counts = dict.fromkeys(self.servers, 0)
            for owner in self.table:
                counts[owner] += 1
            self._shares = {s: c / self.table_size for s, c in counts.items()}
        return dict(self._shares)

    def virtual_servers(self) -> list[tuple[int, int]]:
        return []  # a table, not a ring: a server's entries are scattered over it


def well_mixed_ring(server_ids: Iterable[int], slots: int = RING160_SLOTS,
                    virtual: int = RING160_VIRTUAL) -> HashRing:
    """The consistent hash map with the ``xxhash`` preset, many slots and many virtual servers,
    ids placed in ascending order (the same set of ids always gives the same map)."""
    ring = HashRing(slots, virtual, "xxhash", "linear")
    for server_id in sorted(set(server_ids)):
        ring.add(server_id)
    ring.lookup(0)  # build the slot table now, not under the first request
    return ring


@functools.lru_cache(maxsize=8)
def _cached_maglev(server_ids: tuple[int, ...]) -> Maglev:
    return Maglev(server_ids)


@functools.lru_cache(maxsize=8)
def _cached_ring160(server_ids: tuple[int, ...]) -> HashRing:
    return well_mixed_ring(server_ids)


def _ring(spec_map: Callable[[], HashRing], server_ids: tuple[int, ...]) -> Lookup:
    return spec_map()


def _ring160(spec_map: Callable[[], HashRing], server_ids: tuple[int, ...]) -> Lookup:
    return _cached_ring160(server_ids)


def _maglev(spec_map: Callable[[], HashRing], server_ids: tuple[int, ...]) -> Lookup:
    return _cached_maglev(server_ids)


# A strategy's lookup from the spec map (built on demand: only ``ring`` uses it) and the
# sorted routable server ids.
Builder = Callable[[Callable[[], HashRing], tuple[int, ...]], Lookup]

STRATEGIES: dict[str, Builder] = {"ring": _ring, "ring160": _ring160, "maglev": _maglev}


def build_lookup(strategy: str, spec_map: Callable[[], HashRing],
                 server_ids: Iterable[int]) -> Lookup:
    """The lookup of ``strategy`` over ``server_ids``; ``spec_map`` gives the specification's
    map of the same servers (at their persisted slots) when the strategy is ``ring``."""
    return STRATEGIES[strategy](spec_map, tuple(sorted(set(server_ids))))
