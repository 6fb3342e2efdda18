"""lb.limits by itself: slots, the FIFO queue, its bound, its timeout, a slot given back once.
No sockets and no sleeping: the clock is a number the tests move."""

from __future__ import annotations

import itertools

import pytest

from lb.events import RouterEvents
from lb.limits import GONE, GRANTED, WAITING, AtLimit, ReplicaLimits, Waiter
from lb.registry import Replica
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
    WAIT,
    Outcome,
    RingWalk,
    Router,
    RoutingTable,
)
from lb.settings import Settings
from tests.test_ring_walk import ERRORS, KEY, NO_DOMAINS, Clockwise, Store, replicas


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limits(maxconn: int = 1, queue_size: int = 2, timeout: float = 0.5) -> tuple[ReplicaLimits, Clock]:
    clock = Clock()
    return ReplicaLimits(maxconn, queue_size, timeout, clock=clock), clock


def waiter(lim: ReplicaLimits, woken: list[int], n: int, host: str = "S1") -> Waiter | None:
    return lim.wait(host, lambda: woken.append(n))


def test_no_limit_takes_always_and_counts_nothing() -> None:
    lim, _ = limits(maxconn=0)
    assert all(lim.take("S1") for _ in range(1000))
    lim.release("S1")
    assert lim.busy == {}


@pytest.mark.parametrize("maxconn", [1, 2, 5])
def test_slots_up_to_maxconn_per_replica(maxconn: int) -> None:
    lim, _ = limits(maxconn=maxconn)
    assert [lim.take("S1") for _ in range(maxconn + 1)] == [True] * maxconn + [False]
    assert lim.take("S2")  # another replica has its own slots
    lim.release("S1")
    assert lim.take("S1") and not lim.take("S1")


def test_queue_is_first_come_first_served() -> None:
    lim, _ = limits(maxconn=1, queue_size=3)
    assert lim.take("S1")
    woken: list[int] = []
    waiters = [waiter(lim, woken, n) for n in range(3)]
    assert all(w is not None and w.state is WAITING for w in waiters)
    for n in range(3):
        lim.release("S1")  # the slot goes to the first waiter, never back to the pool
        assert woken == list(range(n + 1))
        assert not lim.take("S1")  # no barging while the slot is handed on
    assert [w.state for w in waiters if w] == [GRANTED] * 3
    lim.release("S1")
    assert lim.busy == {} and lim.queues == {}


def test_past_the_queue_size_none_and_a_503_with_retry_after() -> None:
    lim, _ = limits(maxconn=1, queue_size=2, timeout=0.5)
    lim.take("S1")
    woken: list[int] = []
    assert waiter(lim, woken, 1) and waiter(lim, woken, 2)
    assert waiter(lim, woken, 3) is None
    error = lim.full("S1")
    assert isinstance(error, AtLimit) and error.status == 503
    assert error.headers == (("Retry-After", "1"),)
    assert "Replica S1 is at its limit" in error.message


@pytest.mark.parametrize(("timeout", "retry_after"), [(0.1, "1"), (1.0, "1"), (2.5, "3")])
def test_retry_after_is_whole_seconds(timeout: float, retry_after: str) -> None:
    lim, _ = limits(timeout=timeout)
    assert lim.timed_out("S1").headers == (("Retry-After", retry_after),)


def test_queue_size_zero_refuses_at_once() -> None:
    lim, _ = limits(maxconn=1, queue_size=0)
    lim.take("S1")
    assert lim.wait("S1", lambda: None) is None


def test_a_slot_freed_since_take_is_granted_at_once() -> None:
    lim, _ = limits(maxconn=1)
    woken: list[int] = []
    w = waiter(lim, woken, 1)
    assert w is not None and w.state is GRANTED and woken == [1]
    assert lim.leave(w) is True  # owns the slot
    assert not lim.take("S1")


def test_timed_out_waiters_are_skipped_and_woken() -> None:
    lim, clock = limits(maxconn=1, queue_size=3, timeout=0.5)
    lim.take("S1")
    woken: list[int] = []
    first = waiter(lim, woken, 1)
    clock.now += 0.3
    second = waiter(lim, woken, 2)
    clock.now += 0.3  # the first is past its deadline, the second is not
    lim.release("S1")
    assert first is not None and second is not None
    assert (first.state, second.state) == (GONE, GRANTED) and woken == [1, 2]
    assert lim.leave(first) is False and lim.leave(second) is True


def test_timed_out_waiters_leave_room_in_the_queue() -> None:
    lim, clock = limits(maxconn=1, queue_size=1, timeout=0.5)
    lim.take("S1")
    assert waiter(lim, [], 1) is not None
    assert waiter(lim, [], 2) is None
    clock.now += 0.6
    assert waiter(lim, [], 3) is not None


def test_leave_while_waiting_frees_the_place_and_owns_nothing() -> None:
    lim, _ = limits(maxconn=1, queue_size=1)
    lim.take("S1")
    woken: list[int] = []
    w = waiter(lim, woken, 1)
    assert w is not None and lim.leave(w) is False and w.state is GONE
    assert lim.leave(w) is False  # twice: still nothing
    assert waiter(lim, woken, 2) is not None  # its place is free
    lim.release("S1")
    assert woken == [2]


def test_when_all_are_gone_the_slot_goes_back() -> None:
    lim, clock = limits(maxconn=1, queue_size=2, timeout=0.5)
    lim.take("S1")
    w = waiter(lim, [], 1)
    clock.now += 1
    lim.release("S1")
    assert w is not None and w.state is GONE
    assert lim.busy == {} and lim.queues == {}
    assert lim.take("S1")


@pytest.mark.parametrize("order", list(itertools.permutations(["release", "leave", "time"])))
def test_every_order_of_release_leave_and_timeout_gives_the_slot_back_once(
        order: tuple[str, ...]) -> None:
    """Whatever happens first to a waiter, afterwards exactly the slots owned are counted:
    once everyone who owns one releases it, the replica is idle again."""
    lim, clock = limits(maxconn=1, queue_size=1, timeout=0.5)
    assert lim.take("S1")
    w = waiter(lim, [], 1)
    assert w is not None
    owners = 1  # the first taker
    for event in order:
        if event == "release" and owners:
            lim.release("S1")
            owners -= 1
            if w.state is GRANTED:
                owners += 1
        elif event == "leave":
            lim.leave(w)
        elif event == "time":
            clock.now += 1
    for _ in range(owners):
        lim.release("S1")
    assert lim.busy == {} and lim.queues == {}


def test_load_reports_in_flight_and_waiting() -> None:
    lim, _ = limits(maxconn=2, queue_size=5)
    lim.take("S1"), lim.take("S1"), lim.take("S2")
    lim.wait("S1", lambda: None)
    assert lim.load() == {"S1": (2, 1), "S2": (1, 0)}


def test_nobody_waiting_leaves_no_queue_behind() -> None:
    """An empty queue left in place would send every release down the slow path."""
    lim, _ = limits(maxconn=1, queue_size=0)
    lim.take("S1")
    assert lim.wait("S1", lambda: None) is None and lim.queues == {}
    lim, _ = limits(maxconn=1, queue_size=2)
    lim.take("S1")
    w = lim.wait("S1", lambda: None)
    assert w is not None and lim.leave(w) is False and lim.queues == {}
    lim.release("S1")
    assert lim.busy == {} and lim.queues == {}


# -- the ring walk takes and gives back the slots (lb.routing.RingWalk) ------------------------
def walk_router(maxconn: int = 1, queue_size: int = 1, retries: int = 2) -> tuple[Router, Clock]:
    settings = Settings.from_env({}, retries=retries, eject_after=1, replica_maxconn=maxconn,
                                 queue_size=queue_size, queue_timeout=0.5)
    router = Router(settings, Store())  # type: ignore[arg-type]
    members = replicas(3, NO_DOMAINS)
    router._table = RoutingTable(1, Clockwise(3), {r.server_id: r for r in members}, False)
    clock = Clock()
    router.limits.clock = clock
    return router, clock


def new_walk(router: Router) -> RingWalk:
    assert router._table is not None
    return RingWalk(router, router._table, KEY, RouterEvents())


OUTCOMES = [ANSWERED, UNREACHABLE, STALE, TIMED_OUT, STALLED, BROKEN]


@pytest.mark.parametrize("outcomes", [list(o) for n in range(1, 4)
                                      for o in itertools.product(OUTCOMES, repeat=n)])
def test_every_walk_holds_one_slot_while_it_tries_and_none_at_its_end(
        outcomes: list[Outcome]) -> None:
    router, _ = walk_router(maxconn=1)
    walk = new_walk(router)
    step = walk.start()
    for outcome in outcomes:
        if step is not TRY and step is not RESEND:
            break
        assert walk.replica is not None and walk.slotted
        assert router.limits.busy == {walk.replica.hostname: 1}
        step = walk.told(outcome, ERRORS.get(outcome), status=200)
    if step is DONE or step is GIVE_UP:
        assert router.limits.busy == {}
    walk.abandon()
    walk.abandon()  # twice: nothing more
    assert router.limits.busy == {}


def test_at_the_limit_the_walk_queues_and_gets_the_slot_when_given_back() -> None:
    router, _ = walk_router(maxconn=1, queue_size=1)
    first, second = new_walk(router), new_walk(router)
    assert first.start() is TRY and first.slotted
    assert second.start() is TRY and not second.slotted  # same key: same replica, no slot
    woken: list[bool] = []
    assert second.queue(lambda: woken.append(True)) is not None
    assert first.told(ANSWERED, status=200) is DONE
    assert woken == [True]
    assert second.waited() is TRY and second.slotted
    assert second.told(ANSWERED, status=200) is DONE
    assert router.limits.busy == {} and router.limits.queues == {}


@pytest.mark.parametrize("why", ["full", "timeout"])
def test_no_slot_is_a_503_and_no_failure_of_the_replica(why: str) -> None:
    router, clock = walk_router(maxconn=1, queue_size=0 if why == "full" else 1)
    holder, late = new_walk(router), new_walk(router)
    holder.start()
    assert late.start() is TRY and not late.slotted
    replica = late.replica
    assert replica is not None
    waiter = late.queue(lambda: None)
    if why == "full":
        assert waiter is None
    else:
        assert waiter is not None
        clock.now += 1
        assert late.waited() is GIVE_UP
    assert isinstance(late.error, AtLimit) and late.error.status == 503
    assert late.tried == [replica.hostname]  # no other replica was given the overload
    assert router._suspects == {} and not router.ejections.streaks  # (eject_after=1)
    holder.told(ANSWERED, status=200)
    assert router.limits.busy == {} and router.limits.queues == {}


def test_abandon_while_queued_leaves_the_queue() -> None:
    router, _ = walk_router(maxconn=1, queue_size=1)
    holder, waiting = new_walk(router), new_walk(router)
    holder.start(), waiting.start()
    assert waiting.queue(lambda: None) is not None
    waiting.abandon()  # its client left
    assert router.limits.queues == {}
    holder.told(ANSWERED, status=200)
    assert router.limits.busy == {}


# -- hedges and slots: each try in flight holds its own -----------------------------------------
def hedged_walk(maxconn: int = 2) -> tuple[Router, RingWalk, Replica, Replica]:
    """A walk whose first try is in flight and hedged: its router, the walk, both replicas."""
    router, _ = walk_router(maxconn=maxconn)
    walk = new_walk(router)
    assert walk.start() is TRY and walk.slotted
    first = walk.replica
    assert first is not None
    hedge = walk.hedge()
    assert hedge is not None and walk.pending is first and walk.replica is hedge
    assert walk.slotted and walk.pending_slotted
    assert router.limits.busy == {first.hostname: 1, hedge.hostname: 1}  # a slot each
    return router, walk, first, hedge


@pytest.mark.parametrize("winner", ["first", "hedge"])
def test_the_winner_and_the_loser_each_give_their_slot_back_once(winner: str) -> None:
    router, walk, first, hedge = hedged_walk(maxconn=1)
    won = first if winner == "first" else hedge
    assert walk.told(ANSWERED, status=200, replica=won) is DONE
    assert router.limits.busy == {}  # the loser's too: the driver closes it
    walk.abandon()
    walk.abandon()  # (a second release of a slot at 0 would raise)
    assert router.limits.busy == {}


@pytest.mark.parametrize("failed", ["first", "hedge"])
@pytest.mark.parametrize("outcome", [UNREACHABLE, STALE, TIMED_OUT])
def test_a_try_that_fails_gives_its_slot_back_and_the_other_keeps_its_own(
        failed: str, outcome: Outcome) -> None:
    router, walk, first, hedge = hedged_walk(maxconn=1)
    gone, other = (first, hedge) if failed == "first" else (hedge, first)
    assert walk.told(outcome, ERRORS.get(outcome), replica=gone) is WAIT
    assert router.limits.busy == {other.hostname: 1}
    assert walk.replica is other and walk.slotted and walk.pending is None
    assert walk.told(ANSWERED, status=200, replica=other) is DONE
    assert router.limits.busy == {}
    walk.abandon()
    assert router.limits.busy == {}


def test_both_tries_failing_give_both_slots_back_and_the_walk_goes_on() -> None:
    router, walk, first, hedge = hedged_walk(maxconn=1)
    assert walk.told(UNREACHABLE, ERRORS[UNREACHABLE], replica=first) is WAIT
    assert walk.told(UNREACHABLE, ERRORS[UNREACHABLE], replica=hedge) is TRY
    third = walk.replica
    assert third is not None and third.hostname not in (first.hostname, hedge.hostname)
    assert router.limits.busy == {third.hostname: 1} and walk.slotted
    assert walk.told(ANSWERED, status=200) is DONE
    assert router.limits.busy == {}


def test_no_hedge_to_a_replica_without_a_free_slot_and_no_token_spent() -> None:
    router, _ = walk_router(maxconn=1, queue_size=4)
    walk = new_walk(router)
    assert walk.start() is TRY
    first = walk.replica
    assert first is not None
    # The next candidate (the one a hedge would go to) is at its limit, with a request queued.
    nxt = next(r for r in router.choices(walk.table, KEY, [first.hostname])
               if r.hostname != first.hostname)
    assert router.limits.take(nxt.hostname)
    queued = router.limits.wait(nxt.hostname, lambda: None)
    assert queued is not None
    tokens, after = router.hedging.tokens, walk.hedge_after()
    assert walk.hedge() is None  # a hedge never queues
    assert walk.pending is None and walk.replica is first and walk.tried == [first.hostname]
    assert router.hedging.tokens == tokens  # no budget spent
    assert router.limits.busy == {first.hostname: 1, nxt.hostname: 1}
    assert list(router.limits.queues[nxt.hostname]) == [queued]  # nobody joined the queue
    assert walk.hedge_after() == 2 * after  # asked again a deadline later
    # Once a slot is free there, the same candidate gets the hedge (it was not skipped).
    assert router.limits.leave(queued) is False
    router.limits.release(nxt.hostname)
    hedge = walk.hedge()
    assert hedge is not None and hedge.hostname == nxt.hostname
    assert walk.told(ANSWERED, status=200, replica=first) is DONE
    assert router.limits.busy == {}


def test_a_refused_hedge_leaves_its_candidate_next_for_a_retry() -> None:
    router, _ = walk_router(maxconn=1)
    walk = new_walk(router)
    walk.start()
    first = walk.replica
    assert first is not None
    nxt = next(r for r in router.choices(walk.table, KEY, [first.hostname])
               if r.hostname != first.hostname)
    assert router.limits.take(nxt.hostname)
    assert walk.hedge() is None
    router.limits.release(nxt.hostname)
    assert walk.told(UNREACHABLE, ERRORS[UNREACHABLE]) is TRY
    assert walk.replica is not None and walk.replica.hostname == nxt.hostname and walk.slotted
    walk.told(ANSWERED, status=200)
    assert router.limits.busy == {}


def test_a_try_waiting_for_a_slot_is_not_hedged() -> None:
    router, _ = walk_router(maxconn=1, queue_size=1)
    holder, late = new_walk(router), new_walk(router)
    holder.start()
    assert late.start() is TRY and not late.slotted
    assert late.hedge_after() == 0.0 and late.hedge() is None  # not in flight yet
    assert late.queue(lambda: None) is not None
    holder.told(ANSWERED, status=200)
    assert late.waited() is TRY and late.slotted
    assert late.hedge_after() > 0  # in flight now: its deadline counts from here
    late.abandon()
    assert router.limits.busy == {}


def test_abandon_with_a_hedge_in_flight_gives_back_both_slots() -> None:
    router, walk, first, hedge = hedged_walk(maxconn=1)
    walk.abandon()  # the client left while both tries were in flight
    assert router.limits.busy == {}
    walk.abandon()
    assert router.limits.busy == {}
    # Both replicas have their one slot free for the next request.
    assert router.limits.take(first.hostname) and router.limits.take(hedge.hostname)
