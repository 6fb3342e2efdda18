"""Lookup strategies by themselves: Maglev, the well-mixed ring (ring160), the router's use of
them, and bounded loads over a window of recent requests. Pure: no process is started."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.bootstrap import initial_state
from lb.hashring import HashRing
from lb.registry import READY, Registry, Replica
from lb.routing import Outcome, Router, Step
from lb.settings import Settings, SettingsError
from lb.strategies import (
    MAGLEV_TABLE_SIZE,
    STRATEGIES,
    Maglev,
    well_mixed_ring,
)

_rng = random.Random(11)
KEYS = [_rng.randint(100000, 999999) for _ in range(10_000)]
SMALL_PRIMES = [101, 257, 1009, 4099]

id_sets = st.sets(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=12)


def moved(a: object, b: object, keys: list[int]) -> float:
    return sum(a.lookup(k) != b.lookup(k) for k in keys) / len(keys)  # type: ignore[attr-defined]


# -- Maglev ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(ids=id_sets, size=st.sampled_from(SMALL_PRIMES))
def test_maglev_gives_every_server_floor_or_ceil_of_the_table(ids: set[int], size: int) -> None:
    counts = Counter(Maglev(ids, size).table)
    assert set(counts) == ids
    assert set(counts.values()) <= {size // len(ids), -(-size // len(ids))}
    assert sum(counts.values()) == size


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(1, 10_000), min_size=1, max_size=8, unique=True),
       data=st.data())
def test_maglev_depends_only_on_the_set_of_ids(ids: list[int], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(ids))
    assert Maglev(ids, 1009).table == Maglev(shuffled, 1009).table


@settings(max_examples=60, deadline=None)
@given(ids=id_sets, key=st.integers(0, 2**63), skip=st.sets(st.integers(1, 10_000)))
def test_maglev_walk_starts_at_lookup_and_lists_each_other_server_once(
        ids: set[int], key: int, skip: set[int]) -> None:
    maglev = Maglev(ids, 257)
    assert next(maglev.walk(key)) == maglev.lookup(key)
    order = list(maglev.walk(key, skip))
    assert len(order) == len(set(order))
    assert set(order) == ids - skip


def test_maglev_spreads_a_missing_servers_keys_over_all_the_others() -> None:
    """The fallback order is per key: a dead replica's requests do not pile onto one."""
    maglev = Maglev(range(1, 6))
    orphans = [k for k in KEYS if maglev.lookup(k) == 3]
    fallback = Counter(next(maglev.walk(k, skip={3})) for k in orphans)
    assert set(fallback) == {1, 2, 4, 5}
    assert max(fallback.values()) < 0.4 * len(orphans)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10])
def test_maglev_balance_and_movement_next_to_the_ideal(n: int) -> None:
    """Deterministic figures: shares within 0.1% of 1/N; add and remove move ~1/N of keys."""
    before, after = Maglev(range(1, n)), Maglev(range(1, n + 1))
    shares = after.shares()
    assert max(shares.values()) * n <= 1.001
    table_moved = sum(a != b for a, b in zip(before.table, after.table)) / MAGLEV_TABLE_SIZE
    assert (MAGLEV_TABLE_SIZE // n) / MAGLEV_TABLE_SIZE <= table_moved <= 1.05 / n
    assert 0.9 / n <= moved(before, after, KEYS) <= 1.1 / n
    keep = [k for k in KEYS if after.lookup(k) != n]
    assert moved(before, after, keep) < 0.02  # keys of the others stay, nearly all


def test_maglev_edge_cases() -> None:
    with pytest.raises(ValueError, match="prime"):
        Maglev([1, 2], 1000)
    with pytest.raises(ValueError, match="fit"):
        Maglev(range(1, 20), 17)
    empty = Maglev([])
    assert empty.lookup(123) is None
    assert list(empty.walk(123)) == []
    assert list(Maglev([7]).walk(5, skip={7})) == []


# -- the well-mixed ring -------------------------------------------------------------------------
def test_ring160_is_a_function_of_the_set_of_ids() -> None:
    a = well_mixed_ring([5, 1, 3], slots=4096, virtual=40)
    b = well_mixed_ring([3, 5, 1], slots=4096, virtual=40)
    assert a.placement() == b.placement()
    assert (a.slots, a.virtual_per_server, a.preset.name) == (4096, 40, "xxhash")


@pytest.mark.parametrize("n", [3, 6, 10])
def test_ring160_balances_far_better_than_the_spec_ring(n: int) -> None:
    ids = list(range(1, n + 1))
    ring = well_mixed_ring(ids)
    mixed = Counter(ring.lookup(k) for k in KEYS)
    spec = HashRing()
    for i in ids:
        spec.add(i)
    seed = Counter(spec.lookup(k) for k in KEYS)
    mean = len(KEYS) / n
    assert max(mixed.values()) / mean < 1.2
    assert max(seed.values()) / mean > 1.9  # the seed's Phi: one replica takes nearly all


def test_ring160_moves_only_the_leaving_replicas_keys() -> None:
    full, less = well_mixed_ring(range(1, 6)), well_mixed_ring([1, 2, 4, 5])
    for k in KEYS[:2000]:
        if full.lookup(k) != 3:
            assert less.lookup(k) == full.lookup(k)


@pytest.mark.parametrize("ids", [(1, 2, 3), (1, 2, 3, 4, 5), tuple(range(1, 9))])
def test_ring160_moves_no_slot_between_replicas_a_change_leaves_alone(
        ids: tuple[int, ...]) -> None:
    """A weight change, or a replica leaving, gives slots only to or from that replica. With
    linear probing a virtual server displaced by the changed one's moved with it, and its
    neighbour's keys to another unchanged replica (1 to 29 slots in these cases)."""
    def across(a: HashRing, b: HashRing, changed: int) -> int:
        return sum(x != y and changed not in (x, y) for x, y in zip(a.owners(), b.owners()))

    plain = well_mixed_ring(ids)
    for changed in ids:
        for weight in (2, 5, 10):
            heavier = well_mixed_ring(ids, weights={changed: weight})
            assert across(plain, heavier, changed) == 0, (changed, weight)
        assert across(plain, well_mixed_ring(set(ids) - {changed}), changed) == 0


# -- wiring: settings, registry, router --------------------------------------------------------
def _router(tmp_path: Path, **overrides: object) -> Router:
    settings = Settings.from_env({}, registry=str(tmp_path / "registry.json"), **overrides)
    state = initial_state(settings)
    for r in state.replicas:
        r.state, r.address = READY, f"http://127.0.0.1:{40000 + r.server_id}"
    registry = Registry(settings.registry_path)
    registry.create(state)
    return Router(settings, registry)


def test_strategies_are_selectable_by_setting() -> None:
    assert {"ring", "ring160", "maglev"} <= set(STRATEGIES)
    assert Settings.from_env({"LB_STRATEGY": "maglev"}).strategy == "maglev"
    with pytest.raises(SettingsError, match="strategy"):
        Settings.from_env({"LB_STRATEGY": "nope"})


@pytest.mark.parametrize("strategy", ["ring", "ring160", "maglev"])
def test_router_candidates_follow_the_strategys_walk(tmp_path: Path, strategy: str) -> None:
    router = _router(tmp_path, strategy=strategy, n=4)
    state = Registry(router.settings.registry_path).read()
    lookup = state.lookup(router.settings.strategy, state.routable())
    for key in KEYS[:50]:
        got = [r.server_id for r in router.candidates(key)]
        assert got == list(lookup.walk(key))[:3]
    served = Counter(router.candidates(k)[0].server_id for k in KEYS[:4000])
    if strategy != "ring":  # the spec ring is the seed's: lopsided by design
        assert max(served.values()) / 1000 < 1.2


def _tries(router: Router, key: int, fail: bool = False) -> list[Replica]:
    """The replicas ``key``'s walk tries, each answering (then only the first is tried) or,
    with ``fail``, each unreachable."""
    walk = router.walk(key)
    tried = []
    step = walk.start()
    while step is Step.TRY:
        assert walk.replica is not None
        tried.append(walk.replica)
        if not fail:
            walk.told(Outcome.ANSWERED, status=200)
            break
        step = walk.told(Outcome.UNREACHABLE, OSError("refused"))  # a suspect from now on
    return tried


@pytest.mark.parametrize("strategy", ["ring", "ring160", "maglev"])
def test_a_requests_tries_are_its_candidates_in_order(tmp_path: Path, strategy: str) -> None:
    """``RingWalk`` takes the key's own replica without a walk when it can; whatever way it
    goes, its tries are ``candidates()`` in order (suspects last), 1 + retries at most, and
    each replica that fails sends the request on along the same walk."""
    # Every replica fails over and over here: ejections (tests/test_ejections.py) are off.
    router = _router(tmp_path, strategy=strategy, n=4, retries=2, eject_after=0)
    for key in KEYS[:40]:
        router._suspects.clear()
        expected = router.candidates(key)
        assert len(expected) == 3
        assert _tries(router, key) == expected[:1]  # nothing failed: the first one
        assert _tries(router, key, fail=True) == expected
        router._suspects.clear()
        router.suspect(expected[1])
        with_suspect = router.candidates(key)
        assert with_suspect[0] == expected[0] and expected[1] not in with_suspect[:2]
        assert _tries(router, key) == with_suspect[:1]
        router._suspects.clear()
        router.suspect(expected[1])
        assert _tries(router, key, fail=True) == with_suspect
        router._suspects.clear()
        router.suspect(expected[1])
        router.suspect(expected[0])
        both = router.candidates(key)
        assert both[0] not in expected[:2]
        assert _tries(router, key) == both[:1]
        assert _tries(router, key, fail=True) == both


def test_built_from_ids_strategies_are_cached_across_registry_versions(tmp_path: Path) -> None:
    """Heartbeats rewrite the registry every round; Maglev must not be rebuilt each time."""
    router = _router(tmp_path, strategy="maglev")
    first = router.table().ring
    with Registry(router.settings.registry_path).update() as state:
        state.replicas[0].last_heartbeat = 1.0
    router.view.RACY_SECONDS = 0  # the test writes faster than the racy-stamp window
    second = router.table()
    assert second.version != 0 and second.ring is first


# -- bounded loads (the router's, over its window of recent requests: lb.bounded) -------------
def _given(router: Router, counts: dict[str, int]) -> None:
    assert router.recent is not None
    for hostname, count in counts.items():
        for _ in range(count):
            router.recent.given(hostname)


def test_bounded_loads_pass_over_a_replica_at_its_cap(tmp_path: Path) -> None:
    router = _router(tmp_path, strategy="maglev", bounded_load=1.25)
    key = KEYS[0]
    first, second, third = (r.hostname for r in router.candidates(key)[:3])
    # N=3, window 1024: own cap ceil(1.25 * 1024 / 3) = 427, guests while at most 341
    _given(router, {first: 426})
    assert router.candidates(key)[0].hostname == first  # one below its cap: home
    _given(router, {first: 1})
    order = [r.hostname for r in router.candidates(key)]
    assert order[0] == second and order[-1] == first  # at its cap: the next clockwise
    _given(router, {second: 342})
    order = [r.hostname for r in router.candidates(key)]
    assert order == [third, first, second]  # past the mean: no room for guests (then clockwise)


def test_bounded_loads_never_refuse_when_everyone_is_full(tmp_path: Path) -> None:
    router = _router(tmp_path, strategy="ring160", bounded_load=1.1)
    names = [r.hostname for r in router.candidates(KEYS[1])]
    _given(router, dict.fromkeys(names, 1000))
    assert len(router.candidates(KEYS[1])) == 3


def test_bounded_loads_cap_the_busiest_replica_of_a_lopsided_ring(tmp_path: Path) -> None:
    """The seed ring sends ~97% to one replica; with c = 1.25 no replica gets more than
    ceil(1.25 x mean) of any window of recent requests."""
    router = _router(tmp_path, bounded_load=1.25)
    chosen = []
    for k in KEYS[:3000]:
        hostname = router.candidates(k)[0].hostname
        router.count(hostname, +1)
        router.count(hostname, -1)
        chosen.append(hostname)
    for end in range(1024, 3001, 97):
        assert max(Counter(chosen[end - 1024:end]).values()) <= 427  # ceil(1.25 * 1024 / 3)
    unbounded = _router(tmp_path / "u")
    lopsided = Counter(unbounded.candidates(k)[0].hostname for k in KEYS[:3000])
    assert max(lopsided.values()) > 2500
