"""``lb.routing.RingWalk`` driven without sockets, over every sequence of outcomes.

Small rings (0 to 4 replicas), 0 to 2 retries, every set of suspects, loads bounded or not,
failure domains known or not: for each, every sequence of ``Outcome`` values a driver may tell
the walk, until it says DONE or GIVE_UP. Each sequence is checked against the rules the walk's
docstring argues for, and against a model of the order written here from the rules alone
(non-suspects clockwise from the key, then suspects and full replicas clockwise, within each
of the two a domain no earlier replica had first, 1 + retries at most).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from lb.bounded import WINDOW, RecentLoad
from lb.events import RouterEvents
from lb.registry import READY, Replica
from lb.routing import (
    ANSWERED,
    BROKEN,
    DONE,
    GIVE_UP,
    RESEND,
    STALE,
    STALLED,
    TIMED_OUT,
    TRY,
    UNREACHABLE,
    Outcome,
    RingWalk,
    Router,
    RoutingTable,
    Step,
    UpstreamError,
)
from lb.settings import Settings

KEY = 1  # the key's own replica is replica 1 % n
BOUND = 1.25
PRESET = {"r0": 2}  # requests of other clients in flight, with bounded loads
RECENT = {"r0": 600}  # ... and r0's share of the worker's recent requests (lb.bounded)
ERRORS = {
    UNREACHABLE: UpstreamError("refused"),
    STALE: UpstreamError("closed before an answer", before_reply=True),
    TIMED_OUT: UpstreamError("no answer", timed_out=True),
    STALLED: UpstreamError("stalled", began=True, timed_out=True),
    BROKEN: UpstreamError("broken", began=True),
}


class Clockwise:
    """A ring of ``n`` servers, ids 0 to n - 1, walked clockwise from ``key % n``."""

    layout = "ring"

    def __init__(self, n: int) -> None:
        self.n = n

    def lookup(self, key: int) -> int | None:
        return key % self.n if self.n else None

    def walk(self, key: int, skip: Iterable[int] = ()) -> Iterator[int]:
        return iter([(key + i) % self.n for i in range(self.n)])


class Store:
    """No registry: the walk is given its table."""

    def view(self) -> None:
        return None


class Recorder(RouterEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def forwarded(self, replica: Replica, status: int, seconds: float, attempt: int) -> None:
        self.seen.append(("forwarded", replica.hostname, status, attempt))

    def unreachable(self, replica: Replica, error: BaseException) -> None:
        self.seen.append(("unreachable", replica.hostname, error))

    def exhausted(self, tried: list[str]) -> None:
        self.seen.append(("exhausted", list(tried)))


# Failure domains of r0, r1, ...: none known (local processes), or nodes as Swarm's, one of
# them unknown (an entry written before domains were recorded). From the key (r1): A, A, None, B.
NO_DOMAINS: tuple[str | None, ...] = ()
NODES: tuple[str | None, ...] = ("B", "A", "A", None)


def replicas(n: int, domains: tuple[str | None, ...] = NO_DOMAINS) -> list[Replica]:
    return [Replica(f"r{i}", i, [], READY, f"http://127.0.0.1:{40000 + i}",
                    domain=domains[i] if domains else None) for i in range(n)]


def expected_order(n: int, retries: int, suspects: set[str], bounded: bool,
                   domains: tuple[str | None, ...] = NO_DOMAINS) -> tuple[list[str], set[str]]:
    """The replicas a walk whose every try fails goes to, from the rules alone, and those that
    go last (suspects, and with bounded loads those at their cap)."""
    ring = [f"r{(KEY + i) % n}" for i in range(n)]
    late = set(suspects)
    if bounded and n:
        own, guest = math.ceil(BOUND * WINDOW / n), WINDOW // n  # home / the others
        late |= {h for i, h in enumerate(ring)
                 if RECENT.get(h, 0) >= (own if i == 0 else guest + 1)}
    domain = {f"r{i}": domains[i] if domains else None for i in range(n)}
    order: list[str] = []
    for tier in ([h for h in ring if h not in late], [h for h in ring if h in late]):
        while tier:  # the first whose domain is known and new, else the first
            seen = {domain[h] for h in order}
            pick = next((h for h in tier if domain[h] is None or domain[h] not in seen), tier[0])
            order.append(pick)
            tier.remove(pick)
    return order[:1 + retries], late


class Case:
    """One ring, its settings and its suspects; ``run`` replays a sequence of outcomes."""

    def __init__(self, n: int, retries: int, suspects: set[str], bounded: bool,
                 domains: tuple[str | None, ...] = NO_DOMAINS) -> None:
        self.n, self.retries, self.suspects, self.bounded = n, retries, suspects, bounded
        # Sequences replayed on one router would add up to ejections (tests/test_ejections.py
        # holds the walk to that rule): off here, each sequence meets the same router.
        settings = Settings.from_env({}, retries=retries, bounded_load=BOUND if bounded else 0,
                                     eject_after=0)
        self.router = Router(settings, Store())  # type: ignore[arg-type]
        members = replicas(n, domains)
        self.table = RoutingTable(1, Clockwise(n), {r.server_id: r for r in members}, False)
        self.order, self.late = expected_order(n, retries, suspects, bounded, domains)

    def run(self, outcomes: list[Outcome]) -> tuple[RingWalk, Recorder, list[tuple[Step, str]],
                                                    Step]:
        router = self.router
        router._suspects = {h: math.inf for h in self.suspects}
        router.inflight = dict(PRESET) if self.bounded else {}
        if self.bounded:
            router.recent = RecentLoad(BOUND)
            for hostname, count in RECENT.items():
                for _ in range(count):
                    router.recent.given(hostname)
        events = Recorder()
        walk = RingWalk(router, self.table, KEY, events)
        trace: list[tuple[Step, str]] = []
        step = walk.start()
        for outcome in outcomes:
            assert step is TRY or step is RESEND, (outcomes, trace, step)
            assert walk.replica is not None
            trace.append((step, walk.replica.hostname))
            step = walk.told(outcome, ERRORS.get(outcome), status=200)
        return walk, events, trace, step

    def sequences(self, prefix: list[Outcome] | None = None) -> Iterator[list[Outcome]]:
        """Every sequence of outcomes that takes the walk to its end, depth first."""
        prefix = prefix or []
        _, _, _, step = self.run(prefix)
        if step is DONE or step is GIVE_UP:
            yield prefix
            return
        for outcome in Outcome:
            yield from self.sequences([*prefix, outcome])

    def check(self, outcomes: list[Outcome]) -> None:
        walk, events, trace, step = self.run(outcomes)
        router = self.router
        where = (self.n, self.retries, sorted(self.suspects), self.bounded, outcomes, trace)
        # In flight: back to what other requests hold, whatever happened.
        held = {h: c for h, c in router.inflight.items() if c}
        assert held == (PRESET if self.bounded else {}), where
        assert walk.replica is None, where
        with pytest.raises(RuntimeError):
            walk.told(ANSWERED, status=200)
        if self.n == 0:
            assert outcomes == [] and step is GIVE_UP, where
            assert walk.error is not None and walk.error.status == 503, where
            assert events.seen == [] and walk.tried == [], where
            return
        # Each replica once, in the model's order; a RESEND right after a first STALE, once.
        tries = [h for s, h in trace if s is TRY]
        assert len(set(tries)) == len(tries) <= 1 + self.retries, where
        assert tries == self.order[:len(tries)] == walk.tried, where
        resent: set[str] = set()
        for i, (s, h) in enumerate(trace):
            if s is RESEND:
                assert i > 0 and trace[i - 1][1] == h and outcomes[i - 1] is STALE, where
                assert trace[i - 1][0] is TRY and h not in resent, where
                resent.add(h)
        # Suspects (and full replicas) after the others: the model's order says so; and the
        # order tried never goes back from a late replica to one that is not.
        late = [h in self.late for h in tries]
        assert late == sorted(late), where
        failures = [(o, h) for o, (s, h) in zip(outcomes, trace, strict=True)
                    if o is not ANSWERED and not (o is STALE and s is TRY)]
        unreachable = [(e[1], e[2]) for e in events.seen if e[0] == "unreachable"]
        assert unreachable == [(h, ERRORS[o]) for o, h in failures], where
        for _, h in failures:
            assert router._suspects.get(h, 0) > 0, where
        last = outcomes[-1]
        # An answer that began and then failed ends the walk: no other replica gets it.
        assert STALLED not in outcomes[:-1] and BROKEN not in outcomes[:-1], where
        if step is DONE:
            assert last is ANSWERED and walk.error is None, where
            assert events.seen[-1] == ("forwarded", tries[-1], 200, len(tries) - 1), where
            if tries[-1] not in self.suspects:
                assert tries[-1] not in router._suspects, where  # an answer is no failure
            return
        assert step is GIVE_UP and walk.error is not None, where
        assert events.seen[-1] == ("exhausted", tries), where
        assert walk.error.status == (504 if last in (TIMED_OUT, STALLED) else 502), where
        if last not in (STALLED, BROKEN):  # the walk went as far as it could
            assert len(tries) == min(1 + self.retries, self.n), where


CASES = [(n, retries, frozenset(suspects), bounded, domains)
         for n in range(5) for retries in range(3) for bounded in (False, True)
         for domains in (NO_DOMAINS, NODES)
         for k in range(n + 1) for suspects in itertools.combinations(
             [f"r{i}" for i in range(n)], k)]


@pytest.mark.parametrize(("n", "retries", "suspects", "bounded", "domains"), CASES)
def test_every_sequence_of_outcomes_keeps_the_rules(n: int, retries: int,
                                                    suspects: frozenset[str], bounded: bool,
                                                    domains: tuple[str | None, ...]) -> None:
    case = Case(n, retries, set(suspects), bounded, domains)
    count = 0
    for outcomes in case.sequences():
        case.check(outcomes)
        count += 1
    assert count >= (1 if n == 0 else 6)  # at least each outcome of the first try


@pytest.mark.parametrize(("error", "reused", "outcome"), [
    (UpstreamError("refused"), False, UNREACHABLE),
    (UpstreamError("refused"), True, UNREACHABLE),  # a cut answer: the replica's failure
    (UpstreamError("closed", before_reply=True), True, STALE),
    (UpstreamError("closed", before_reply=True), False, UNREACHABLE),  # a new connection
    (UpstreamError("late", timed_out=True), True, TIMED_OUT),
    (UpstreamError("stalled", began=True, timed_out=True), True, STALLED),
    (UpstreamError("broken", began=True), False, BROKEN),
])
def test_what_an_upstream_error_means(error: UpstreamError, reused: bool,
                                      outcome: Outcome) -> None:
    assert Outcome.of(error, reused) is outcome


def test_a_walk_starts_once_and_is_told_only_while_it_tries() -> None:
    case = Case(2, 1, set(), False)
    walk = RingWalk(case.router, case.table, KEY, RouterEvents())
    with pytest.raises(RuntimeError):
        walk.told(ANSWERED, status=200)
    assert walk.start() is TRY
    with pytest.raises(RuntimeError):
        walk.start()


def test_the_fast_paths_first_try_is_the_walks_first_step() -> None:
    """``first()`` then ``told``: the same tries as ``start()`` then ``told``."""
    case = Case(3, 2, set(), False)
    walk = RingWalk(case.router, case.table, KEY, RouterEvents())
    first = walk.first()
    assert first is not None and first.hostname == case.order[0]
    assert walk.told(UNREACHABLE, ERRORS[UNREACHABLE]) is TRY
    assert walk.replica is not None and walk.replica.hostname == case.order[1]
    case.router._suspects.clear()
    case.router._suspects["r1"] = math.inf  # the key's own: the fast path needs the walk
    walk = RingWalk(case.router, case.table, KEY, RouterEvents())
    assert walk.first() is None and walk.start() is TRY
    assert walk.replica is not None and walk.replica.hostname == "r2"


def failing_walk(case: Case, suspects: frozenset[str] = frozenset()) -> tuple[RingWalk, Step]:
    """A walk every try of which finds its replica unreachable, through the fast path's first
    step as the workers take it."""
    case.router._suspects = {h: math.inf for h in suspects}
    walk = RingWalk(case.router, case.table, KEY, RouterEvents())
    step = TRY if walk.first() is not None else walk.start()
    while step is TRY:
        step = walk.told(UNREACHABLE, ERRORS[UNREACHABLE])
    return walk, step


def test_a_retry_goes_to_another_node_not_the_first_ones_other_replica() -> None:
    """r1 and r2 on node A, r0 on B, one retry: r1 unreachable (its node stopped), the retry
    goes to B's r0, not to r2 after it on the ring."""
    case = Case(3, 1, set(), False, ("B", "A", "A"))
    walk, step = failing_walk(case)
    assert walk.tried == ["r1", "r0"] and step is GIVE_UP  # 1 + retries, no more
    assert walk.error is not None and walk.error.status == 502
    case.router._suspects.clear()  # the order as ``candidates`` gives it, before any failure
    assert [r.hostname for r in case.router.choices(case.table, KEY)] == ["r1", "r0"]
    bounded = Case(3, 1, set(), True, ("B", "A", "A"))
    assert failing_walk(bounded)[0].tried == ["r1", "r0"]  # no replica at its cap here


def test_each_retry_goes_to_a_node_not_tried_yet_then_back_in_ring_order() -> None:
    case = Case(6, 5, set(), False, ("C", "A", "A", "B", "B", "C"))
    assert failing_walk(case)[0].tried == ["r1", "r3", "r5", "r2", "r4", "r0"]


def test_without_domains_the_order_is_the_rings() -> None:
    """Local processes and one Docker engine record no domain: the walk is the one it was."""
    case = Case(4, 3, set(), False)
    assert failing_walk(case)[0].tried == ["r1", "r2", "r3", "r0"]
    assert case.table.domains == {}
    one_node = Case(4, 3, set(), False, ("A", "A", "A", "A"))  # a one-node swarm: the same
    assert failing_walk(one_node)[0].tried == ["r1", "r2", "r3", "r0"]


def test_suspects_stay_last_whatever_their_node() -> None:
    """r0, the only replica on another node, is a suspect: the replicas of the first one's
    node that are not come before it."""
    case = Case(4, 3, set(), False, ("B", "A", "A", "A"))
    walk, _ = failing_walk(case, frozenset({"r0"}))
    assert walk.tried == ["r1", "r2", "r3", "r0"]
    # Among the suspects, too, another node first.
    case = Case(4, 2, set(), False, ("B", "A", "A", "A"))
    walk, _ = failing_walk(case, frozenset({"r0", "r2", "r3"}))
    assert walk.tried == ["r1", "r0", "r2"]
