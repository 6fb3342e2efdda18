"""Weights by themselves: the maps a weight scales, what a weight change moves, the room rules,
the registry's field, and the admin's rules. Pure: no process is started (the stack tests are
in test_weights_stack.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.admin import Admin, parse_weight, parse_weights_request
from lb.bootstrap import initial_state
from lb.errors import ApiError
from lb.hashring import HashRing, RingError
from lb.registry import READY, Registry, Replica, State
from lb.settings import Settings
from lb.strategies import (
    MAGLEV_TABLE_SIZE,
    MAX_WEIGHT,
    RING160_VIRTUAL,
    Maglev,
    build_lookup,
    room,
    well_mixed_ring,
)

_rng = random.Random(29)
KEYS = [_rng.randint(100000, 999999) for _ in range(20_000)]

weight_lists = st.lists(st.integers(1, 40), min_size=1, max_size=10)


@settings(max_examples=40, deadline=None)
@given(weights=weight_lists)
def test_maglev_gives_each_replica_its_weights_part_of_the_table_within_a_few_entries(
        weights: list[int]) -> None:
    ids = list(range(1, len(weights) + 1))
    table = Maglev(ids, weights=dict(zip(ids, weights)))
    total = sum(weights)
    for server_id, share in table.shares().items():
        want = MAGLEV_TABLE_SIZE * weights[server_id - 1] / total
        # The table fills up part-way through a cycle of rounds (the lightest claims once per
        # heaviest/lightest rounds): that many claims either side, out of 65,537.
        slack = 1 + max(weights) / min(weights)
        assert abs(share * MAGLEV_TABLE_SIZE - want) <= slack, (server_id, share, want)


@pytest.mark.parametrize("strategy", ["maglev", "ring160"])
def test_equal_weights_give_exactly_the_unweighted_map(strategy: str) -> None:
    ids = [1, 2, 3, 7]
    plain = build_lookup(strategy, lambda: HashRing(), ids)
    for w in (1, 3):
        weighted = build_lookup(strategy, lambda: HashRing(), ids, dict.fromkeys(ids, w))
        if w == 1:
            assert list(weighted.owners()) == list(plain.owners())
        else:  # ring160: 3 x 160 each is another ring; maglev: the same turns, the same table
            assert weighted.shares().keys() == plain.shares().keys()
    assert list(Maglev(ids, weights=dict.fromkeys(ids, 5)).table) == list(Maglev(ids).table)


@pytest.mark.parametrize("strategy", ["maglev", "ring160"])
def test_weights_one_two_three_share_the_keys_one_two_three(strategy: str) -> None:
    lookup = build_lookup(strategy, lambda: HashRing(), [1, 2, 3], {1: 1, 2: 2, 3: 3})
    counts = {1: 0, 2: 0, 3: 0}
    for key in KEYS:
        owner = lookup.lookup(key)
        assert owner is not None
        counts[owner] += 1
    for server_id, want in ((1, 1 / 6), (2, 2 / 6), (3, 3 / 6)):
        # 20,000 keys: a binomial standard deviation of at most 0.35 points; ring160's own
        # spread with 160-960 virtual servers adds about 2.
        assert abs(counts[server_id] / len(KEYS) - want) < 0.03, counts


def _owners(lookup: object, keys: list[int]) -> list[int | None]:
    return [lookup.lookup(k) for k in keys]  # type: ignore[attr-defined]


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.integers(1, 6), min_size=2, max_size=6), which=st.integers(0, 5),
       to=st.integers(1, 8))
def test_a_ring_weight_change_moves_keys_only_to_or_from_that_replica(
        weights: list[int], which: int, to: int) -> None:
    ids = list(range(1, len(weights) + 1))
    changed = ids[which % len(ids)]
    before = well_mixed_ring(ids, weights=dict(zip(ids, weights)))
    after = well_mixed_ring(ids, weights={**dict(zip(ids, weights)), changed: to})
    keys = KEYS[:4000]
    for key, old, new in zip(keys, _owners(before, keys), _owners(after, keys)):
        if old != new:
            assert changed in (old, new), (key, old, new)
            assert (new == changed) == (to > weights[ids.index(changed)])


def test_a_maglev_weight_change_moves_few_keys_between_unchanged_replicas() -> None:
    before = Maglev([1, 2, 3, 4], weights={1: 1, 2: 2, 3: 3, 4: 1})
    after = Maglev([1, 2, 3, 4], weights={1: 1, 2: 2, 3: 4, 4: 1})
    between = sum(a != b and 3 not in (a, b) for a, b in zip(before.table, after.table))
    grew = sum(b == 3 for b in after.table) - sum(a == 3 for a in before.table)
    assert grew > 0
    # The table is filled again: a few entries change hands elsewhere too (0.04 % here).
    assert between < 0.01 * MAGLEV_TABLE_SIZE, between


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(1, 500), min_size=2, max_size=6, unique=True),
       which=st.integers(0, 5), count=st.integers(1, 40))
def test_resizing_one_server_moves_no_other_virtual_server_and_back_restores(
        ids: list[int], which: int, count: int) -> None:
    ring = HashRing(4096, 8, "xxhash")
    for server_id in ids:
        ring.add(server_id)
    resized = ids[which % len(ids)]
    before = ring.placement()
    ring.resize(resized, count)
    assert len(ring.placement()[resized]) == count
    assert ring.placement()[resized][:min(8, count)] == before[resized][:min(8, count)]
    for server_id in ids:
        if server_id != resized:
            assert ring.placement()[server_id] == before[server_id]
    ring.resize(resized, 8)
    assert ring.placement() == before
    with pytest.raises(RingError):
        ring.resize(resized, 0)


def test_room_is_the_strategies_own() -> None:
    most_ring160 = 65536 // RING160_VIRTUAL
    assert room("ring160", [most_ring160]) is None
    assert "409" in (room("ring160", [most_ring160, 1]) or "")
    assert room("maglev", [MAX_WEIGHT, MAX_WEIGHT, 143]) is None
    assert "655" in (room("maglev", [MAX_WEIGHT, MAX_WEIGHT, 144]) or "")
    assert room("ring", [MAX_WEIGHT] * 10) is None  # judged by placing: RingFull


# -- the registry's field --------------------------------------------------------------------
def test_weight_and_ready_since_are_written_only_when_set() -> None:
    plain = Replica("a", 1, [1, 2])
    assert "weight" not in plain.to_dict() and "ready_since" not in plain.to_dict()
    heavy = Replica("b", 2, [3], weight=3, ready_since=12.5)
    data = heavy.to_dict()
    assert data["weight"] == 3 and data["ready_since"] == 12.5
    assert Replica.from_dict(data) == heavy
    drained = Replica("c", 3, [4], weight=0)
    assert Replica.from_dict(drained.to_dict()).weight == 0


@pytest.mark.parametrize("bad", [-1, MAX_WEIGHT + 1, 1.5, "2", True, None])
def test_a_registry_entry_with_a_bad_weight_is_refused(bad: object) -> None:
    data = Replica("a", 1, [1]).to_dict()
    data["weight"] = bad
    with pytest.raises(ValueError, match="bad weight"):
        Replica.from_dict(data)


# -- the admin's rules -----------------------------------------------------------------------
@pytest.mark.parametrize("value,drain,ok", [
    (1, False, True), (MAX_WEIGHT, False, True), (0, False, False), (0, True, True),
    (-1, True, False), (MAX_WEIGHT + 1, True, False), (2.0, True, False), ("2", True, False),
    (True, True, False), (None, True, False),
])
def test_a_weight_is_an_integer_in_range(value: object, drain: bool, ok: bool) -> None:
    if ok:
        assert parse_weight(value, "w", drain) == value
    else:
        with pytest.raises(ApiError) as caught:
            parse_weight(value, "w", drain)
        assert caught.value.status == 400


@pytest.mark.parametrize("body", [[], {}, {"weights": []}, {"weights": {"a": 1}, "x": 1},
                                  {"weight": {"a": 1}}, {"weights": {"a": -2}}])
def test_a_weights_request_that_is_not_one_is_a_400(body: object) -> None:
    with pytest.raises(ApiError) as caught:
        parse_weights_request(body)
    assert caught.value.status == 400


def _admin(tmp_path: Path, strategy: str, **more: object) -> tuple[Admin, Registry]:
    settings_ = Settings(strategy=strategy, registry=str(tmp_path / "r.json"),
                         hash="xxhash", **more)  # type: ignore[arg-type]
    registry = Registry(settings_.registry)
    state = initial_state(settings_)
    for i, r in enumerate(state.replicas):
        r.state, r.address = READY, f"http://127.0.0.1:{20000 + i}"
    registry.create(state)
    return Admin(settings_, registry, backend=None), registry


def test_on_the_spec_map_a_weight_resizes_that_replicas_virtual_servers(tmp_path: Path) -> None:
    admin, registry = _admin(tmp_path, "ring")
    before = {r.hostname: list(r.slots) for r in registry.read().replicas}
    state = admin.set_weights({"Server2": 3})
    after = {r.hostname: list(r.slots) for r in state.replicas}
    k = state.ring.virtual
    assert len(after["Server2"]) == 3 * k and after["Server2"][:k] == before["Server2"]
    assert after["Server1"] == before["Server1"] and after["Server3"] == before["Server3"]
    state = admin.set_weights({"Server2": 0})  # drained: it keeps its virtual servers
    assert len(state.find("Server2").slots) == 3 * k  # type: ignore[union-attr]
    assert state.lookup("ring", state.routable()).shares().keys() == {1, 3}
    state = admin.set_weights({"Server2": 1})
    assert [r.slots for r in state.replicas] == [before[h] for h in before]


@pytest.mark.parametrize("strategy,weights,why", [
    ("ring", {"Server1": 60}, "no room"),  # 60 x 9 virtual servers > 512 slots
    ("ring160", {"Server1": 256, "Server2": 200}, "ring160 has room"),
    ("maglev", {"Server1": 256, "Server2": 256, "Server3": 200}, "maglev has room"),
    ("maglev", {"nobody": 2}, "does not exist"),
])
def test_weights_beyond_the_maps_room_or_for_nobody_are_a_409_and_change_nothing(
        tmp_path: Path, strategy: str, weights: dict[str, int], why: str) -> None:
    admin, registry = _admin(tmp_path, strategy)
    before = registry.read_bytes()
    with pytest.raises(ApiError, match=why) as caught:
        admin.set_weights({"Server3": 2, **weights})
    assert caught.value.status == 409
    assert registry.read_bytes() == before


def test_a_weight_given_at_add_fits_the_room_or_is_a_409(tmp_path: Path) -> None:
    admin, registry = _admin(tmp_path, "ring160")
    before = registry.read_bytes()
    with pytest.raises(ApiError, match="ring160 has room") as caught:
        admin.add(2, [], weight=MAX_WEIGHT)
    assert caught.value.status == 409
    assert registry.read_bytes() == before


def test_state_lookup_leaves_out_drained_replicas(tmp_path: Path) -> None:
    state = State.from_dict(_admin(tmp_path, "maglev")[1].read().to_dict())
    state.replicas[0].weight = 0
    lookup = state.lookup("maglev", state.routable())
    assert set(lookup.shares()) == {2, 3}
    assert all(lookup.lookup(k) != 1 for k in KEYS[:2000])


# -- bounded loads with weights ----------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 5), min_size=2, max_size=6),
       homes=st.lists(st.integers(0, 5), min_size=1, max_size=1500))
def test_bounded_loads_cap_each_replica_at_c_times_its_weights_part(
        weights: list[int], homes: list[int]) -> None:
    """``Router._bounded``'s rule over a window, a replica's mean being its weight's part:
    however the keys' homes fall, no replica holds more than ceil(c x its part) of the window,
    and there is always one with room (the walk here: home first, then the others in order)."""
    from lb.bounded import RecentLoad

    c, total = 1.25, sum(weights)
    load = RecentLoad(c, size=256)
    names = [f"r{i}" for i in range(len(weights))]
    caps = {h: load.caps(w / total) for h, w in zip(names, weights)}
    for home in homes:
        walk = names[home % len(names):] + names[:home % len(names)]
        chosen = next(h for i, h in enumerate(walk) if load.room(h, i == 0, caps[h]))
        load.given(chosen)
        for h in names:
            assert load.counts.get(h, 0) <= caps[h][0], (h, load.counts, caps)
