"""The consistent hash map: pure, no I/O.

M slots on a circle. Each replica (a stable integer server id) owns K virtual servers, placed by
the virtual-server hash Phi(i, j); a slot conflict is resolved by linear (or quadratic) probing.
A request key i lands on slot H(i) mod M and goes to the first virtual server at or after that
slot, clockwise.

Placement is explicit and incremental: adding a server never moves another server's virtual
servers, and removing one frees only its own slots. Callers persist ``placement()`` and rebuild
with ``from_placement``, so every process sees the same map and a replacement that keeps the dead
replica's server id and slots moves no key at all.

H and Phi come from a hash spec (``LB_HASH``, resolved by ``resolve_preset``): a preset name,
integer formulas ``'H=...; Phi=...'`` (``lb.formulas``) or a plug-in ``package.module:name``
naming a ``HashPreset`` object. A plug-in is the one place where this module loads code.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import xxhash

from lb.formulas import is_formula_spec, parse_formulas

RequestHash = Callable[[int], int]
VirtualHash = Callable[[int, int], int]


class RingError(Exception):
    """Root of the hash map's errors."""


class RingFull(RingError):
    """No free slot is left for another virtual server."""


class HashSpecError(ValueError):
    """An ``LB_HASH`` value that names no usable hash functions."""


@dataclass(frozen=True)
class HashPreset:
    """A pair of hash functions: the built-in presets, compiled formulas and plug-ins alike.

    ``request(i)`` is H, applied to a request key; ``virtual(i, j)`` is Phi, applied to a server
    id and the virtual server's number 0..K-1. Both return any integer; the ring takes it mod M.
    ``formulas`` is (H, Phi) as formula text when there is one, for people to read.
    """

    name: str
    request: RequestHash
    virtual: VirtualHash
    description: str
    formulas: tuple[str, str] | None = None


def u64(*values: int) -> bytes:
    """Integers as the little-endian 64-bit words xxHash is given (the well-mixed hashes)."""
    return b"".join((v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for v in values)


PRESETS: dict[str, HashPreset] = {
    p.name: p
    for p in (
        HashPreset(
            "seed",
            lambda i: i + 2 * i * i + 17,
            lambda i, j: i + j + 2 * j * j + 25,
            "the seed README: H(i) = i + 2i^2 + 17, Phi(i, j) = i + j + 2j^2 + 25",
            ("i + 2 * i ** 2 + 17", "i + j + 2 * j ** 2 + 25"),
        ),
        HashPreset(
            "cs60002",
            lambda i: i * i + 2 * i + 17,
            lambda i, j: i * i + j * j + 2 * j + 25,
            "the course handout: H(i) = i^2 + 2i + 17, Phi(i, j) = i^2 + j^2 + 2j + 25",
            ("i ** 2 + 2 * i + 17", "i ** 2 + j ** 2 + 2 * j + 25"),
        ),
        HashPreset(
            "xxhash",
            # u64(i) spelled out for H: the same bytes, a third of the time per request.
            lambda i: xxhash.xxh64_intdigest((i & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"),
                                             seed=0x5EED),
            lambda i, j: xxhash.xxh64_intdigest(u64(i, j), seed=0xF1),
            "well mixed: 64-bit xxHash of i and of (i, j)",
        ),
    )
}

PROBING = ("linear", "quadratic")
HASH_CHOICES = ("one of seed, cs60002, xxhash, formulas 'H=...; Phi=...' or a plug-in "
                "'package.module:name'")


@functools.lru_cache(maxsize=64)
def resolve_preset(spec: str, virtual_per_server: int = 9) -> HashPreset:
    """The hash functions an ``LB_HASH`` value names, checked for K = ``virtual_per_server``.

    The result's ``name`` is the spec in canonical form (formulas re-printed, so spacing does
    not matter): what the registry stores and compares. Cached: every registry version builds
    a ring, and formulas are parsed and checked only once per process.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    if is_formula_spec(spec):
        f = parse_formulas(spec, virtual_per_server)  # FormulaError is a ValueError
        return HashPreset(f.spec, f.request, f.virtual,
                          f"formulas: H(i) = {f.h}, Phi(i, j) = {f.phi}", (f.h, f.phi))
    module_name, colon, attr = spec.strip().partition(":")
    if colon and module_name and attr:
        return _plugin(module_name.strip(), attr.strip(), virtual_per_server)
    raise HashSpecError(f"hash must be {HASH_CHOICES}, not {spec[:60]!r}")


def canonical_hash(spec: str, virtual_per_server: int = 9) -> str:
    return resolve_preset(spec, virtual_per_server).name


def _plugin(module_name: str, attr: str, virtual_per_server: int) -> HashPreset:
    """``package.module:name``: a ``HashPreset`` object in an importable module."""
    spec = f"{module_name}:{attr}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, say so in one line
        raise HashSpecError(f"hash plug-in {spec}: cannot import {module_name}: "
                            f"{type(exc).__name__}: {exc}") from None
    preset = getattr(module, attr, None)
    if not isinstance(preset, HashPreset):
        found = "nothing" if preset is None else f"a {type(preset).__name__}"
        raise HashSpecError(f"hash plug-in {spec}: {module_name}.{attr} is {found}, not a "
                            "lb.hashring.HashPreset")
    # A smoke test where a mistake would otherwise surface at the first request or /add.
    for name, call in (("request(123456)", lambda: preset.request(123456)),
                       (f"virtual(1, {virtual_per_server - 1})",
                        lambda: preset.virtual(1, virtual_per_server - 1))):
        try:
            value = call()
        except Exception as exc:  # noqa: BLE001
            raise HashSpecError(f"hash plug-in {spec}: {name} raised {type(exc).__name__}: "
                                f"{exc}") from None
        if type(value) is not int:
            raise HashSpecError(f"hash plug-in {spec}: {name} returned a "
                                f"{type(value).__name__}, not an int")
    return dataclasses.replace(preset, name=spec)


class HashRing:
    """M slots, K virtual servers per server id, hash functions from a spec or a preset."""

    layout = "ring"  # slots on a circle: a server answers for arcs (see strategies.Lookup)

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
        self.preset = (resolve_preset(preset, virtual_per_server) if isinstance(preset, str)
                       else preset)
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

    def place(self, server_id: int, count: int | None = None, first: int = 0) -> tuple[int, ...]:
        """The slots ``server_id``'s virtual servers ``first`` .. ``count`` - 1 (default: K of
        them, a weight of 1) would get now, without adding them. A weight w gives w x K virtual
        servers, numbered on from K: Phi(i, j) for j = 0 .. wK - 1."""
        count = self.virtual_per_server if count is None else count
        taken = {s for s, owner in enumerate(self._owner) if owner is not None}
        chosen: list[int] = []
        for j in range(first, count):
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

    def add(self, server_id: int, slots: Sequence[int] | None = None,
            count: int | None = None) -> tuple[int, ...]:
        """Place ``server_id``: with ``slots``, at exactly those (a persisted placement), else
        with ``count`` virtual servers (default K)."""
        if server_id in self._placement:
            raise RingError(f"server id {server_id} is already in the ring")
        chosen = tuple(slots) if slots is not None else self.place(server_id, count)
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

    def resize(self, server_id: int, count: int) -> tuple[int, ...]:
        """``server_id`` with ``count`` virtual servers: its last ones freed, or more placed
        after its own (j numbered on). Nobody else's virtual servers move, so only keys between
        this server and others change hands: a weight change moves only the keys it must."""
        if count < 1:
            raise RingError("a server keeps at least one virtual server")
        have = self._placement[server_id]
        if count <= len(have):
            kept, freed = have[:count], have[count:]
            for slot in freed:
                self._owner[slot] = None
        else:
            kept = have + self.place(server_id, count, first=len(have))
            for slot in kept[len(have):]:
                self._owner[slot] = server_id
        self._placement[server_id] = kept
        self._table = self._occupied = None
        return kept

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

    def owners(self) -> list[int | None]:
        """The server each slot's requests go to: the first virtual server at or after it."""
        if self._table is None:
            self._table = self._build_table()
        return self._table

    def shares(self) -> dict[int, float]:
        """Fraction of the M slots each server answers for (its arcs' total length / M)."""
        counts = {server: 0 for server in self._placement}
        for owner in self.owners():
            if owner is not None:
                counts[owner] += 1
        return {server: c / self.slots for server, c in counts.items()}

    def virtual_servers(self) -> list[tuple[int, int]]:
        """(slot, server id) of every virtual server, by slot."""
        return sorted((slot, sid) for sid, slots in self._placement.items() for slot in slots)

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
