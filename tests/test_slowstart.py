"""Slow start (``lb.slowstart``): the guarantees its docstring states, on every strategy.

No sockets: a fake clock. ``_table`` builds the lookup the way ``Router.lookup_for`` does at each
table rebuild (the ramps and the maps recomputed from the join times and the time), so a test
that samples it over time sees what a router rebuilding its table at each sample routes.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.bootstrap import initial_state
from lb.hashring import HashRing
from lb.registry import READY, Registry
from lb.routing import Router
from lb.settings import Settings
from lb.slowstart import Ramped, fallbacks, gate, joining_order, ramping
from lb.strategies import REQUEST_IDS, Lookup, build_lookup

PERIOD = 10.0
STRATEGIES = ["ring160", "ring", "maglev"]
RINGS = ["ring160", "ring"]
KEYS = random.Random(29).sample(REQUEST_IDS, 5000)  # request ids, as the spec has them
OLD = -1000.0  # ready long before any sample: not ramping


def _map(strategy: str, ids: list[int]) -> Lookup:
    """The strategy's map of ``ids``; ``ring``: the spec map with the xxhash preset."""
    def spec() -> HashRing:
        ring = HashRing(512, 9, "xxhash")
        for server_id in sorted(ids):
            ring.add(server_id)
        return ring
    return build_lookup(strategy, spec, ids)


def _table(strategy: str, since: Mapping[int, float], now: float,
           period: float = PERIOD) -> Lookup:
    """What ``Router.lookup_for`` builds at ``now`` for the replicas that joined by then."""
    joined = {i: t for i, t in since.items() if t <= now}
    full = _map(strategy, list(joined))
    ramps = ramping(joined, period, now)
    base = [i for i in joined if i not in ramps]
    if not ramps or not base:
        return full
    order = joining_order(ramps)
    maps = {i: _map(strategy, base + order[:i]) for i in fallbacks(ramps)}
    return Ramped({**maps, len(order): full}, ramps, period, clock=lambda: now)


def _owners(strategy: str, since: Mapping[int, float], times: list[float],
            period: float = PERIOD) -> list[list[int | None]]:
    """Each sample's owner of every key in ``KEYS``."""
    out = []
    for now in times:
        table = _table(strategy, since, now, period)
        out.append([table.lookup(k) for k in KEYS])
    return out


def _moves(samples: list[list[int | None]]) -> list[list[int | None]]:
    """Each key's owners in turn, a repeat dropped: the owners it moved through."""
    seqs: list[list[int | None]] = [[] for _ in KEYS]
    for owners in samples:
        for seq, owner in zip(seqs, owners):
            if not seq or seq[-1] != owner:
                seq.append(owner)
    return seqs


def _times(start: float, end: float, step: float = 0.5) -> list[float]:
    return [start + i * step for i in range(int((end - start) / step) + 1)]


# -- one replica joins ---------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_joining_replicas_share_grows_to_its_full_share(strategy: str) -> None:
    since = {1: OLD, 2: OLD, 3: OLD, 4: OLD, 5: 0.0}
    times = _times(0.0, PERIOD + 2)
    samples = _owners(strategy, since, times)
    full = [_map(strategy, [1, 2, 3, 4, 5]).lookup(k) for k in KEYS]
    mine = full.count(5)
    counts = [owners.count(5) for owners in samples]
    assert counts[0] == 0
    assert counts == sorted(counts), counts  # never falls
    for now, count in zip(times, counts):
        f = min(1.0, now / PERIOD)
        # ~ f x the full share: a binomial draw over the full owner's keys (gates uniform)
        assert abs(count - f * mine) <= 4 * math.sqrt(mine * f * (1 - f)) + 1, (now, count)
    assert samples[times.index(PERIOD)] == full  # the full map itself from the ramp's end on


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_key_moves_at_most_once_during_a_ramp(strategy: str) -> None:
    since = {1: OLD, 2: OLD, 3: OLD, 4: OLD, 5: 0.0}
    before = [_map(strategy, [1, 2, 3, 4]).lookup(k) for k in KEYS]
    samples = [before, *_owners(strategy, since, _times(0.0, PERIOD + 1))]
    final = samples[-1]
    seqs = _moves(samples)
    assert max(len(seq) for seq in seqs) == 2
    for seq, owner in zip(seqs, final):
        if owner != 5 and strategy in RINGS:
            assert len(seq) == 1  # on a ring only the new replica's keys move
    # Maglev moves a few keys between the others, at once: at the join, not during the ramp.
    for k in range(len(KEYS)):
        if final[k] != 5:
            assert samples[1][k] == final[k]


# -- ramps that overlap --------------------------------------------------------------------------
OVERLAPS = {
    "two": {1: OLD, 2: OLD, 3: OLD, 4: OLD, 5: 0.0, 6: 4.0},
    "three": {1: OLD, 2: OLD, 3: OLD, 4: OLD, 5: 0.0, 6: 4.0, 7: 9.0},
    "same time": {1: OLD, 2: OLD, 3: OLD, 5: 0.0, 6: 3.0, 7: 3.0},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_ramps_move_a_key_no_more_than_the_maps_do(strategy: str,
                                                               case: str) -> None:
    """B joins while A ramps; A's ramp ends while B's goes on (the table rebuilt at every
    sample). A key moves once per join at most, no more often than the maps without slow start
    move it, and never back to a replica it left. One that moves twice went to A before B
    joined, as the maps move it: nobody could know B would come."""
    since = OVERLAPS[case]
    last = max(since.values())
    times = _times(-1.0, last + PERIOD + 1)
    samples = _owners(strategy, since, times)
    plain = _moves(_owners(strategy, since, times, period=0.0))
    seqs = _moves(samples)
    joins = sorted(set(since.values()) - {OLD})
    for k, (seq, without) in enumerate(zip(seqs, plain)):
        assert len(seq) <= len(without), (seq, without)
        if len(without) == len(set(without)):  # (Maglev's own maps send a few keys back)
            assert len(seq) == len(set(seq)), (seq, without)  # never back
        if strategy in RINGS:
            assert seq[-1] == without[-1] and set(seq) <= set(without), (seq, without)
        # Within each stretch from one join to the next: one move at most.
        for start, end in zip(joins, [*joins[1:], math.inf]):
            stretch = [owners[k] for now, owners in zip(times, samples) if start <= now < end]
            assert sum(a != b for a, b in pairwise(stretch)) <= 1
    ramping_last = [s for s, t in since.items() if t == last]
    for server_id in ramping_last:
        counts = [owners.count(server_id) for now, owners in zip(times, samples) if now >= last]
        assert counts[0] == 0 and counts == sorted(counts), counts
    assert samples[-1] == [_map(strategy, list(since)).lookup(k) for k in KEYS]


def test_a_key_that_an_earlier_ramp_took_stays_there_until_the_next_gate_opens() -> None:
    """The case the chain of maps is for: A (5) took a key; B (6) joins and its full map gives
    B that key. It stays with A until B's gate opens; it does not go back to the base."""
    since = {1: OLD, 2: OLD, 3: OLD, 4: OLD, 5: 0.0, 6: 5.0}
    at_b = _table("ring160", since, 5.0)
    before_b = _table("ring160", since, 4.999)
    taken = [k for k in KEYS if before_b.lookup(k) == 5 and
             _map("ring160", [1, 2, 3, 4, 5, 6]).lookup(k) == 6]
    assert taken  # some keys went to A and are B's in the full map
    for k in taken:
        assert at_b.lookup(k) == 5
        assert _table("ring160", since, 5.0 + gate(k) * PERIOD + 0.01).lookup(k) == 6


# -- ramping(): which replicas ramp ----------------------------------------------------------------
def test_ramping_edge_cases() -> None:
    old = {1: OLD, 2: OLD, 3: None}
    assert ramping({**old, 4: 0.0}, 0.0, 1.0) == {}  # period 0: off
    assert ramping(old, PERIOD, 0.0) == {}  # nothing recent
    assert ramping({}, PERIOD, 0.0) == {}
    assert ramping({1: None}, PERIOD, 0.0) == {}
    assert ramping({**old, 4: 0.0}, PERIOD, PERIOD) == {}  # its ramp has ended
    assert ramping({**old, 4: 0.0}, PERIOD, 3.0) == {4: 0.0}
    # A's ramp ended before B joined: A is the base's.
    assert ramping({**old, 4: 0.0, 5: PERIOD}, PERIOD, PERIOD + 1) == {5: PERIOD}
    # A's ramp ended after B joined: A stays in the ramp until B's ends.
    assert ramping({**old, 4: 0.0, 5: 5.0}, PERIOD, 12.0) == {4: 0.0, 5: 5.0}
    assert ramping({**old, 4: 0.0, 5: 5.0}, PERIOD, 15.0) == {}
    # A fresh stack: every replica joined within the period of the next.
    fresh = {1: 0.0, 2: 0.4, 3: 0.9}
    assert ramping(fresh, PERIOD, 2.0) == fresh


def test_replicas_that_join_together_need_only_the_base_and_the_full_map() -> None:
    assert fallbacks({5: 0.0, 6: 0.0, 7: 0.0}) == {0}  # one /add of three
    assert fallbacks({5: 0.0, 6: 4.0, 7: 4.0}) == {0, 1}
    full, base = _map("maglev", [1, 2, 5, 6]), _map("maglev", [1, 2])
    Ramped({0: base, 2: full}, {5: 0.0, 6: 0.0}, PERIOD)
    with pytest.raises(ValueError, match="a map missing"):
        Ramped({0: base, 2: full}, {5: 0.0, 6: 1.0}, PERIOD)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(1, 9), st.floats(0, 50), min_size=1),
       st.floats(0.1, 20), st.floats(0, 80))
def test_ramping_is_the_last_join_and_the_overlapping_chain_before_it(
        since: dict[int, float], period: float, now: float) -> None:
    chain = ramping(since, period, now)
    joined = sorted(since.values())
    if now - joined[-1] >= period:
        assert chain == {}
        return
    assert max(chain.values()) == joined[-1]
    times = sorted(chain.values())
    assert all(a + period > b for a, b in pairwise(times))  # each overlaps the next
    left = [t for t in since.values() if t < times[0]]
    assert not left or max(left) + period <= times[0]  # the one before ended before it began
    assert all(chain[i] == since[i] for i in chain)


def test_a_fresh_stack_gets_the_plain_lookup(tmp_path: Path) -> None:
    router = _router(tmp_path, {1: -2.0, 2: -1.5, 3: -1.0})
    assert not isinstance(router.table().ring, Ramped)
    router = _router(tmp_path, {1: -100.0, 2: -100.0, 3: -2.0})
    lookup = router.table().ring
    assert isinstance(lookup, Ramped) and lookup.ramps.keys() == {3}
    assert 3 not in lookup.base.shares() and 3 in lookup.full.shares()
    assert 0.1 < lookup.fraction(3) < 0.3
    router = _router(tmp_path, {1: -100.0, 2: -100.0, 3: -100.0}, slow_start=0.0)
    assert not isinstance(router.table().ring, Ramped)


def _router(tmp_path: Path, ready: dict[int, float], slow_start: float = PERIOD) -> Router:
    """A router over replicas 1..3 that became ready at those times from now."""
    settings = Settings.from_env({}, registry=str(tmp_path / f"r{time.monotonic_ns()}.json"),
                                 n=3, strategy="ring160", slow_start=slow_start)
    state = initial_state(settings)
    for r in state.replicas:
        r.state, r.address = READY, f"http://127.0.0.1:{40000 + r.server_id}"
        r.ready_since = time.time() + ready[r.server_id]
    registry = Registry(settings.registry_path)
    registry.create(state)
    return Router(settings, registry)


# -- the Lookup interface -----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("now", [0.0, 2.5, 6.0, 9.9])
def test_walk_starts_at_lookup_and_visits_every_server_once(strategy: str, now: float) -> None:
    since = OVERLAPS["three"]
    table = _table(strategy, since, now + 4.0)
    assert isinstance(table, Ramped)
    servers = set(table.full.shares())
    rnd = random.Random(now)
    for k in KEYS[:1500]:
        walk = list(table.walk(k))
        assert walk[0] == table.lookup(k)
        assert sorted(walk) == sorted(servers)
        skip = set(rnd.sample(sorted(servers), 2))
        assert sorted(table.walk(k, skip)) == sorted(servers - skip)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("now", [0.0, 3.0, 5.0, 8.0, 12.0])
def test_shares_sum_to_one_and_match_the_keys(strategy: str, now: float) -> None:
    since = OVERLAPS["two"]
    table = _table(strategy, since, now)
    shares = table.shares()
    assert math.isclose(sum(shares.values()), 1.0)
    counts = Counter(table.lookup(k) for k in KEYS)
    for server_id, share in shares.items():
        # the keys' owners agree with the shares within sampling noise
        assert abs(counts[server_id] / len(KEYS) - share) < 0.03, (server_id, share)
    if isinstance(table, Ramped):
        full = table.full.shares()
        last = joining_order(table.ramps)[-1]
        assert math.isclose(shares[last], table.fraction(last) * full[last])
