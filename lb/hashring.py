"""The consistent hash map: pure, no I/O.

M slots on a circle. Each replica (a stable integer server id) owns K virtual servers, placed by
the virtual-server hash Phi(i, j); a slot conflict is resolved by linear (or quadratic) probing.
A request key i lands on slot H(i) mod M and goes to the first virtual server at or after that
slot, clockwise.

Placement is explicit and incremental: adding a server never moves another server's virtual
servers, and removing one frees only its own slots. Callers persist ``placement()`` and rebuild
with ``from_placement``, so every process sees the same map and a replacement that keeps the dead
replica's server id and slots moves no key at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import xxhash

RequestHash = Callable[[int], int]
VirtualHash = Callable[[int, int], int]


class RingError(Exception):
    """Root of the hash map's errors."""


class RingFull(RingError):
    """No free slot is left for another virtual server."""


@dataclass(frozen=True)
class HashPreset:
    name: str
    request: RequestHash
    virtual: VirtualHash
    description: str


def _u64(*values: int) -> bytes:
    return b"".join((v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for v in values)


PRESETS: dict[str, HashPreset] = {
    p.name: p
    for p in (
        HashPreset(
            "seed",
            lambda i: i + 2 * i * i + 17,
            lambda i, j: i + j + 2 * j * j + 25,
            "the seed README: H(i) = i + 2i^2 + 17, Phi(i, j) = i + j + 2j^2 + 25",
        ),
        HashPreset(
            "cs60002",
            lambda i: i * i + 2 * i + 17,
            lambda i, j: i * i + j * j + 2 * j + 25,
            "the course handout: H(i) = i^2 + 2i + 17, Phi(i, j) = i^2 + j^2 + 2j + 25",
        ),
        HashPreset(
            "xxhash",
            lambda i: xxhash.xxh64_intdigest(_u64(i), seed=0x5EED),
            lambda i, j: xxhash.xxh64_intdigest(_u64(i, j), seed=0xF1),
            "well mixed: 64-bit xxHash of i and of (i, j)",
        ),
    )
}

PROBING = ("linear", "quadratic")


class HashRing:
    """M slots, K virtual servers per server id, hash functions chosen by preset name."""

    def __init__(
        self,
        slots: int = 512,
        virtual_per_server: int = 9,
        preset: str | HashPreset = "seed",
        probing: str = "linear",
    ) -> None:
        if slots < 1 or virtual_per_server < 1:
            raise ValueError("slots and virtual_per_server must be >= 1")
        if probing not in PROBING:
            raise ValueError(f"probing must be one of {PROBING}")
        self.slots = slots
        self.virtual_per_server = virtual_per_server
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.probing = probing
        self._owner: list[int | None] = [None] * slots
        self._placement: dict[int, tuple[int, ...]] = {}
        self._table: list[int | None] | None = None  # slot -> first owner clockwise (cache)
        self._occupied: list[int] | None = None  # sorted occupied slots (cache)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_placement(
        cls, placement: Mapping[int, Sequence[int]], **params: object
    ) -> HashRing:
        ring = cls(**params)  # type: ignore[arg-type]
        for server_id, slots in placement.items():
            ring.add(server_id, slots)
        return ring

    @property
    def capacity(self) -> int:
        """How many servers fit, K virtual servers each."""
        return self.slots // self.virtual_per_server

    def place(self, server_id: int) -> tuple[int, ...]:
        """The slots ``server_id`` would get now, without adding it."""
        taken = {s for s, owner in enumerate(self._owner) if owner is not None}
        chosen: list[int] = []
        for j in range(self.virtual_per_server):
            slot = self._probe(self.preset.virtual(server_id, j) % self.slots, taken)
            taken.add(slot)
            chosen.append(slot)
        return tuple(chosen)

    def _probe(self, home: int, taken: set[int]) -> int:
        if len(taken) >= self.slots:
            raise RingFull(f"all {self.slots} slots are taken")
        if self.probing == "quadratic":
            for step in range(self.slots):
                slot = (home + step * step) % self.slots
                if slot not in taken:
                    return slot
            # Quadratic probing need not visit every slot; fall back to a linear scan.
        for step in range(self.slots):
            slot = (home + step) % self.slots
            if slot not in taken:
                return slot
        raise RingFull(f"all {self.slots} slots are taken")  # pragma: no cover

    def add(self, server_id: int, slots: Sequence[int] | None = None) -> tuple[int, ...]:
        """Place ``server_id``; with ``slots``, at exactly those (a persisted placement)."""
        if server_id in self._placement:
            raise RingError(f"server id {server_id} is already in the ring")
        chosen = tuple(slots) if slots is not None else self.place(server_id)
        for slot in chosen:
            if not 0 <= slot < self.slots:
                raise RingError(f"slot {slot} is outside 0..{self.slots - 1}")
            if self._owner[slot] is not None:
                raise RingError(f"slot {slot} is already owned by {self._owner[slot]}")
        for slot in chosen:
            self._owner[slot] = server_id
        self._placement[server_id] = chosen
        self._table = self._occupied = None
        return chosen

    def remove(self, server_id: int) -> tuple[int, ...]:
        """Free ``server_id``'s slots; nobody else's virtual servers move."""
        slots = self._placement.pop(server_id)
        for slot in slots:
            self._owner[slot] = None
        self._table = self._occupied = None
        return slots

    # -- reading ---------------------------------------------------------------------------------
    def __contains__(self, server_id: object) -> bool:
        return server_id in self._placement

    def __len__(self) -> int:
        return len(self._placement)

    @property
    def servers(self) -> list[int]:
        return list(self._placement)

    def placement(self) -> dict[int, tuple[int, ...]]:
        return dict(self._placement)

    def owner_of_slot(self, slot: int) -> int | None:
        return self._owner[slot]

    def slot_of(self, key: int) -> int:
        return self.preset.request(key) % self.slots

    def lookup(self, key: int) -> int | None:
        """The server id for ``key``: O(1) through a table rebuilt after each change."""
        if self._table is None:
            self._table = self._build_table()
        return self._table[self.slot_of(key)]

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]:
        """Distinct server ids clockwise from ``key``'s slot, leaving out ``skip``.

        The first one is ``lookup(key)`` when nothing is skipped; the rest are where a request
        goes when the ones before it cannot serve.
        """
        occupied = self._occupied_slots()
        if not occupied:
            return
        seen = set(skip)
        remaining = len(self._placement.keys() - seen)
        start = bisect.bisect_left(occupied, self.slot_of(key))
        for n in range(len(occupied)):
            if remaining == 0:
                return
            owner = self._owner[occupied[(start + n) % len(occupied)]]
            if owner is not None and owner not in seen:
                seen.add(owner)
                remaining -= 1
                yield owner

    def shares(self) -> dict[int, float]:
        """Fraction of the M slots each server answers for (its arcs' total length / M)."""
        counts = {server: 0 for server in self._placement}
        if self._table is None:
            self._table = self._build_table()
        for owner in self._table:
            if owner is not None:
                counts[owner] += 1
        return {server: c / self.slots for server, c in counts.items()}

    def _occupied_slots(self) -> list[int]:
        if self._occupied is None:
            self._occupied = [s for s, owner in enumerate(self._owner) if owner is not None]
        return self._occupied

    def _build_table(self) -> list[int | None]:
        table: list[int | None] = [None] * self.slots
        occupied = self._occupied_slots()
        if not occupied:
            return table
        # Walk the circle backwards once: each slot takes the nearest owner at or after it.
        nxt = self._owner[occupied[0]]
        for slot in range(self.slots - 1, -1, -1):
            if self._owner[slot] is not None:
                nxt = self._owner[slot]
            table[slot] = nxt
        return table
