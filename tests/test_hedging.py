"""``lb.hedging`` (the deadline and the budget) and ``RingWalk``'s hedge step, without sockets
and without sleeping: latencies are handed in, the walk is told outcomes."""

from __future__ import annotations

import math
from typing import Any

from lb.events import RouterEvents
from lb.hedging import BURST, COLD, EVERY, FLOOR, MIN_SAMPLES, WINDOW, Hedging
from lb.registry import Replica
from lb.routing import (
    ANSWERED,
    DONE,
    GIVE_UP,
    STALE,
    TIMED_OUT,
    TRY,
    UNREACHABLE,
    WAIT,
    RingWalk,
    Router,
    RoutingTable,
)
from lb.settings import Settings
from tests.test_ring_walk import Clockwise, Store, replicas


# -- the deadline -------------------------------------------------------------------------------
def test_a_fixed_deadline_stays_whatever_the_latencies() -> None:
    hedging = Hedging(0.2, 0.05, 5.0)
    for _ in range(500):
        hedging.observe(3.0)
    assert hedging.after == 0.2


def test_off_means_no_deadline_and_no_budget() -> None:
    hedging = Hedging(0.2, 0.0, 5.0)
    assert not hedging.on and hedging.after == 0.0
    assert not hedging.allow()


def test_the_derived_deadline_is_cold_then_the_p99_with_a_floor_and_a_ceiling() -> None:
    hedging = Hedging(0.0, 0.05, 5.0)
    assert hedging.after == COLD
    for _ in range(MIN_SAMPLES - 1):
        hedging.observe(0.001)
    assert hedging.after == COLD  # too few answers to judge
    hedging.observe(0.001)
    assert hedging.after == FLOOR  # fast answers: the floor, not 1 ms
    # 2 % of the answers take 0.3 s: the p99 is 0.3 s.
    for i in range(WINDOW):
        hedging.observe(0.3 if i % 50 == 0 else 0.002)
    assert hedging.after == 0.3
    # Answers slower than LB_UPSTREAM_TIMEOUT: never a deadline past it.
    slow = Hedging(0.0, 0.05, 1.0)
    for _ in range(WINDOW):
        slow.observe(9.0)
    assert slow.after == 1.0


def test_the_window_forgets_old_answers() -> None:
    hedging = Hedging(0.0, 0.05, 5.0)
    for _ in range(WINDOW):
        hedging.observe(0.4)
    assert hedging.after == 0.4
    for _ in range(WINDOW + EVERY):
        hedging.observe(0.001)
    assert hedging.after == FLOOR


# -- the budget ---------------------------------------------------------------------------------
def test_a_burst_goes_out_at_once_then_the_share_refills_the_bucket() -> None:
    hedging = Hedging(0.0, 0.05, 5.0)
    assert sum(hedging.allow() for _ in range(50)) == BURST  # a sudden hang: hedged at once
    assert not hedging.allow()
    allowed = 0
    for _ in range(1000):  # 1,000 answered requests, each followed by a hedge asked for
        hedging.observe(0.001)
        allowed += hedging.allow()
    assert allowed == math.floor(0.05 * 1000 + 1e-9)  # the share, not more
    for _ in range(10_000):
        hedging.observe(0.001)
    assert hedging.tokens == BURST  # the bucket holds a burst at most


# -- the walk's hedge step ------------------------------------------------------------------------
class Seen(RouterEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def forwarded(self, replica: Replica, status: int, seconds: float, attempt: int) -> None:
        self.seen.append(("forwarded", replica.hostname))

    def unreachable(self, replica: Replica, error: BaseException) -> None:
        self.seen.append(("unreachable", replica.hostname))

    def hedged(self, replica: Replica) -> None:
        self.seen.append(("hedged", replica.hostname))

    def hedge_won(self, replica: Replica) -> None:
        self.seen.append(("won", replica.hostname))

    def hedge_refused(self) -> None:
        self.seen.append(("refused",))


def walk(n: int = 3, retries: int = 2, eject_after: int = 0,
         **settings: Any) -> tuple[RingWalk, Seen, Router]:
    config = Settings.from_env({}, retries=retries, eject_after=eject_after, hedge_after=0.1,
                               **settings)
    router = Router(config, Store())  # type: ignore[arg-type]
    members = replicas(n)
    table = RoutingTable(1, Clockwise(n), {r.server_id: r for r in members}, False)
    seen = Seen()
    return RingWalk(router, table, 1, seen), seen, router


def test_a_hedge_goes_to_the_next_replica_and_the_hedge_that_answers_first_wins() -> None:
    w, seen, router = walk(eject_after=2)
    assert w.start() is TRY and w.replica is not None
    first = w.replica
    assert w.hedge_after() == 0.1
    second = w.hedge()
    assert second is not None and second.hostname == "r2" and w.pending is first
    assert w.hedge_after() == 0.0  # one hedge in flight at most
    assert w.hedge() is None
    assert w.told(ANSWERED, status=200, replica=second) is DONE
    # The first had no answer in time: not yet a suspect, and no step towards ejection.
    assert seen.seen == [("hedged", "r2"), ("won", "r2"), ("forwarded", "r2")]
    assert "r1" not in router._suspects
    assert not router.ejections.streaks
    assert w.pending is None and w.replica is None
    # Overtaken twice in a row: a suspect (a hang, not one slow answer), still not ejected.
    w2 = RingWalk(router, w.table, 1, seen)
    w2.start()
    w2.told(ANSWERED, status=200, replica=w2.hedge())
    assert router._suspects.get("r1", 0) > 0 and not router.ejections.until


def test_an_answer_between_two_lost_tries_keeps_a_replica_from_suspicion() -> None:
    w, _, router = walk(eject_after=5)
    for answers_between in (False, True, False):
        w = RingWalk(router, w.table, 1, Seen())
        w.start()
        if answers_between:
            assert w.told(ANSWERED, status=200) is DONE  # r1 answered in time
            continue
        w.told(ANSWERED, status=200, replica=w.hedge())
    assert "r1" not in router._suspects and router.hedging.losses == {"r1": 1}


def test_the_first_answering_after_all_wins_and_the_hedge_counts_for_nothing() -> None:
    w, seen, router = walk(eject_after=2)
    w.start()
    first = w.replica
    second = w.hedge()
    assert first is not None and second is not None
    assert w.told(ANSWERED, status=200, replica=first) is DONE
    assert seen.seen == [("hedged", "r2"), ("forwarded", "r1")]
    assert not router._suspects and not router.ejections.streaks


def test_a_failure_while_the_other_is_in_flight_waits_for_the_other() -> None:
    w, _, _ = walk()
    w.start()
    first = w.replica
    second = w.hedge()
    assert first is not None and second is not None
    assert w.told(UNREACHABLE, replica=second) is WAIT
    assert w.replica is first and w.pending is None
    assert w.hedge_after() == 0.0  # not hedged twice
    # Then the first fails too: the walk goes on to the last replica, then gives up.
    assert w.told(TIMED_OUT) is TRY and w.replica is not None and w.replica.hostname == "r0"
    assert w.told(TIMED_OUT) is GIVE_UP
    assert w.error is not None and w.error.status == 504


def test_a_stale_hedge_is_not_the_replicas_failure() -> None:
    w, _, router = walk(eject_after=2)
    w.start()
    first = w.replica
    second = w.hedge()
    assert second is not None
    assert w.told(STALE, replica=second) is WAIT
    assert not router.ejections.streaks and "r2" not in router._suspects
    assert w.told(ANSWERED, status=200, replica=first) is DONE


def test_no_hedge_past_the_retry_limit_or_the_budget() -> None:
    w, _, _ = walk(retries=0)
    w.start()
    assert w.hedge_after() == 0.0 and w.hedge() is None
    w, seen, router = walk()
    router.hedging.tokens = 0.0
    w.start()
    assert w.hedge() is None and seen.seen == [("refused",)]
    assert w.hedge_after() == 0.2  # refused: asked again a deadline later
    router.hedging.tokens = 1.0
    assert w.hedge() is not None
    w, _, _ = walk(hedge_share=0.0)
    w.start()
    assert w.hedge_after() == 0.0 and w.hedge() is None


def test_a_hung_replica_is_skipped_after_two_tries_overtaken() -> None:
    _, _, router = walk(eject_after=3)
    members = replicas(3)
    table = RoutingTable(1, Clockwise(3), {r.server_id: r for r in members}, False)
    for _ in range(2):
        w = RingWalk(router, table, 1, Seen())
        w.start()
        assert w.replica is not None and w.replica.hostname == "r1"
        second = w.hedge()
        assert w.told(ANSWERED, status=200, replica=second) is DONE
    w = RingWalk(router, table, 1, Seen())
    w.start()
    assert w.replica is not None and w.replica.hostname != "r1"  # skipped without waiting
    assert not router.ejections.until  # (a lost try is no failure towards ejection)


def test_with_bounded_loads_both_tries_are_uncounted() -> None:
    w, _, router = walk(bounded_load=1.25)
    w.start()
    second = w.hedge()
    assert second is not None
    assert sum(router.inflight.values()) == 2
    w.told(ANSWERED, status=200, replica=second)
    assert sum(router.inflight.values()) == 0
    w, _, router = walk(bounded_load=1.25)
    w.start()
    first = w.replica
    w.hedge()
    w.told(UNREACHABLE, replica=first)
    w.told(ANSWERED, status=200)
    assert sum(router.inflight.values()) == 0


def test_a_try_at_a_replica_found_failing_is_hedged_without_a_token() -> None:
    w, seen, router = walk()
    router.hedging.tokens = 0.0
    w.start()
    assert w.replica is not None
    router.suspect(w.replica)  # it lost another request's hedge meanwhile
    assert w.hedge() is not None and seen.seen == [("hedged", "r2")]
    assert router.hedging.tokens == 0.0


def test_a_hedge_is_not_counted_as_a_retry() -> None:
    w, seen, _ = walk()
    attempts: list[int] = []
    seen.forwarded = lambda replica, status, seconds, attempt: attempts.append(attempt)  # type: ignore[method-assign]
    w.start()
    w.told(ANSWERED, status=200, replica=w.hedge())
    assert attempts == [0]
