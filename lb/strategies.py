"""Lookup strategies: how a request key becomes a replica, over the routable replicas.

Every strategy answers ``lookup(key)`` (one server id or None) and ``walk(key, skip)`` (distinct
server ids in the order to try them). ``ring`` is the consistent hash map itself, on the slots
persisted in the registry. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from lb.hashring import HashRing
from lb.registry import Replica, State
from lb.settings import Settings


class Lookup(Protocol):
    def lookup(self, key: int) -> int | None: ...

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]: ...


def _ring(settings: Settings, state: State, routable: list[Replica]) -> Lookup:
    ring: HashRing = state.hash_ring(routable)
    return ring


Builder = Callable[[Settings, State, list[Replica]], Lookup]

STRATEGIES: dict[str, Builder] = {"ring": _ring}


def build_lookup(settings: Settings, state: State, routable: list[Replica]) -> Lookup:
    return STRATEGIES[settings.strategy](settings, state, routable)
