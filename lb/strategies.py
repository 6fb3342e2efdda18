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
  replica, placed from the routable server ids and weights alone (a slot two virtual servers
  hash to goes to the higher hash, whatever the order: the map is a function of the set, and a
  replacement that keeps its server id moves no key).
- ``maglev``: Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size 65,537
  that every replica fills in turn along its own permutation, so each owns M/N entries +- 1.

Weights (a positive integer per replica, 1 unless set) scale a replica's part: on a ring, its
virtual servers (w x K); in Maglev's table, how often it claims an entry (w / W of them). With
every weight 1 each map is exactly the unweighted one. ``room`` says whether weights fit.

The router rebuilds its lookup whenever the registry's version changes, which happens on every
heartbeat round; the two built-from-ids strategies are therefore cached by their inputs and only
built again when the set of routable server ids changes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import xxhash

from lb.hashring import HashRing, u64

MAGLEV_TABLE_SIZE = 65537  # prime; the paper's default, >> 100 x the largest N we allow
RING160_SLOTS = 65536
RING160_VIRTUAL = 160
MAX_WEIGHT = 256  # per replica, as HAProxy's servers
# Maglev's table gives each unit of weight at least this many entries, so that a share is
# within about 1 % of its weight's part.
MAGLEV_ENTRIES_PER_WEIGHT = 100


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

    def __init__(self, server_ids: Iterable[int], table_size: int = MAGLEV_TABLE_SIZE,
                 weights: Mapping[int, int] | None = None) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"the Maglev table size must be prime, not {table_size}")
        ids = sorted(set(server_ids))
        if ids and ids[0] < 0:
            raise ValueError("server ids must be >= 0")
        if len(ids) > table_size:
            raise ValueError(f"{len(ids)} servers do not fit a table of {table_size}")
        shares = [1 if weights is None else weights.get(i, 1) for i in ids]
        if any(w < 1 for w in shares) or sum(shares) > table_size:
            raise ValueError("weights must be positive and fit the table")
        self.table_size = table_size
        self.servers = ids
        self._ids = frozenset(ids)
        self.table: list[int] = self._populate(ids, shares, table_size) if ids else []
        self._shares: dict[int, float] | None = None

    @staticmethod
    def _populate(ids: list[int], weights: list[int], m: int) -> list[int]:
        """Rounds of turns: in round t a server of weight w claims its next entry while it has
        claimed fewer than t x w / heaviest (as Envoy's weighted Maglev), so the heaviest claims
        in every round and equal weights take every turn, as in the paper."""
        offsets = [xxhash.xxh64_intdigest(u64(i), seed=0x0FF5E7) % m for i in ids]
        skips = [xxhash.xxh64_intdigest(u64(i), seed=0x5C1F) % (m - 1) + 1 for i in ids]
        position = list(offsets)  # each server's current entry along its permutation
        heaviest = max(weights)
        due = [0] * len(ids)  # heaviest x the entries each server has claimed
        table = [-1] * m
        filled = 0
        rounds = 0
        while True:
            rounds += 1
            for n, server_id in enumerate(ids):
                if rounds * weights[n] < due[n]:
                    continue  # a lighter server: not its turn this round
                due[n] += heaviest
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
                    virtual: int = RING160_VIRTUAL,
                    weights: Mapping[int, int] | None = None) -> HashRing:
    """The consistent hash map with the ``xxhash`` preset, many slots and many virtual servers
    (``virtual`` x weight each). Virtual servers that hash to one slot are not probed on (the
    one placed last would move when an earlier one comes or goes, taking keys from one
    unchanged replica to another): the one of highest hash takes the slot, so the map is a
    function of the ids and weights alone, and a weight change, an addition or a removal moves
    keys only to or from the replica it concerns."""
    ring = HashRing(slots, virtual, "xxhash", "linear")
    best: dict[int, tuple[int, int]] = {}  # slot -> (its hash // slots, server id) holding it
    for server_id in set(server_ids):
        for j in range(virtual * (1 if weights is None else weights.get(server_id, 1))):
            point = ring.preset.virtual(server_id, j)
            slot, rank = point % slots, (point // slots, server_id)
            if slot not in best or best[slot] < rank:
                best[slot] = rank
    placement: dict[int, list[int]] = {server_id: [] for server_id in set(server_ids)}
    for slot, (_, server_id) in best.items():
        placement[server_id].append(slot)
    for server_id in sorted(placement):
        ring.add(server_id, slots=sorted(placement[server_id]))
    ring.lookup(0)  # build the slot table now, not under the first request
    return ring


# Servers as (server id, weight) pairs in ascending id order: a cache key.
Servers = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=8)
def _cached_maglev(servers: Servers) -> Maglev:
    return Maglev([i for i, _ in servers], weights=dict(servers))


@functools.lru_cache(maxsize=8)
def _cached_ring160(servers: Servers) -> HashRing:
    return well_mixed_ring([i for i, _ in servers], weights=dict(servers))


def _ring(spec_map: Callable[[], HashRing], servers: Servers) -> Lookup:
    return spec_map()  # the weights are in its persisted slots: w x K of them


def _ring160(spec_map: Callable[[], HashRing], servers: Servers) -> Lookup:
    return _cached_ring160(servers)


def _maglev(spec_map: Callable[[], HashRing], servers: Servers) -> Lookup:
    return _cached_maglev(servers)


# A strategy's lookup from the spec map (built on demand: only ``ring`` uses it) and the
# routable servers with their weights.
Builder = Callable[[Callable[[], HashRing], Servers], Lookup]

STRATEGIES: dict[str, Builder] = {"ring": _ring, "ring160": _ring160, "maglev": _maglev}


def build_lookup(strategy: str, spec_map: Callable[[], HashRing], server_ids: Iterable[int],
                 weights: Mapping[int, int] | None = None) -> Lookup:
    """The lookup of ``strategy`` over ``server_ids`` (with ``weights``: 1 for an id it does not
    name); ``spec_map`` gives the specification's map of the same servers (at their persisted
    slots, which hold their weights) when the strategy is ``ring``."""
    weight = (lambda i: 1) if weights is None else (lambda i: weights.get(i, 1))
    return STRATEGIES[strategy](spec_map, tuple((i, weight(i)) for i in sorted(set(server_ids))))


def room(strategy: str, weights: Iterable[int]) -> str | None:
    """Why ``weights`` (every routable replica's, each 1..MAX_WEIGHT) do not fit the strategy's
    map, or None. The spec map (``ring``) is judged by placing its virtual servers: its slots
    run out (``RingFull``) while probing."""
    total = sum(weights)
    if strategy == "ring160" and total * RING160_VIRTUAL > RING160_SLOTS:
        return (f"ring160 has room for weights adding up to {RING160_SLOTS // RING160_VIRTUAL} "
                f"({RING160_VIRTUAL} virtual servers each in {RING160_SLOTS} slots), not {total}")
    most = MAGLEV_TABLE_SIZE // MAGLEV_ENTRIES_PER_WEIGHT
    if strategy == "maglev" and total > most:
        return f"maglev has room for weights adding up to {most}, not {total}"
    return None
