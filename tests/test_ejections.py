"""Passive ejection (``lb.ejections``) without sockets: the rule on a clock of the test's own,
then the router and the ring walk that consult it and tell it."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytest

from lb.ejections import MAX_SECONDS, Ejections
from lb.events import RouterEvents
from lb.routing import ANSWERED, DONE, TIMED_OUT, TRY, UNREACHABLE, RingWalk, Router, RoutingTable
from lb.settings import Settings, SettingsError
from tests.test_ring_walk import Clockwise, Store, replicas


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Seen(RouterEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def ejected(self, hostname: str, seconds: float) -> None:
        self.seen.append(("ejected", hostname, seconds))

    def returned(self, hostname: str) -> None:
        self.seen.append(("returned", hostname))


def rule(after: int = 5, seconds: float = 10.0,
         share: float = 0.5) -> tuple[Ejections, Clock, Seen]:
    clock, seen = Clock(), Seen()
    return Ejections(after, seconds, share, seen, clock), clock, seen


def fail(ejections: Ejections, hostname: str, times: int, routable: int = 3) -> None:
    for _ in range(times):
        ejections.failed(hostname, routable)


def test_a_streak_of_failures_ejects_and_the_ejection_ends() -> None:
    ejections, clock, seen = rule()
    fail(ejections, "a", 4)
    assert not ejections.ejected("a", clock.now) and ejections.streaks == {"a": 4}
    ejections.answered("a", 503, 3)  # a 5xx answer is a failure like no answer at all
    assert ejections.ejected("a", clock.now)
    assert seen.seen == [("ejected", "a", 10.0)] and ejections.streaks == {}
    clock.now += 9.9
    assert ejections.ejected("a", clock.now)
    clock.now += 0.1
    assert not ejections.ejected("a", clock.now)
    assert seen.seen[-1] == ("returned", "a") and ejections.until == {}
    assert ejections.next_end == math.inf


@pytest.mark.parametrize("status", [200, 204, 304, 404, 429])
def test_any_answer_below_500_ends_the_streak(status: int) -> None:
    ejections, clock, seen = rule()
    fail(ejections, "a", 4)
    ejections.answered("a", status, 3)
    assert ejections.streaks == {}
    fail(ejections, "a", 4)
    assert not ejections.ejected("a", clock.now) and seen.seen == []
    fail(ejections, "a", 1)
    assert ejections.ejected("a", clock.now)


def test_streaks_are_per_replica() -> None:
    ejections, clock, _ = rule(after=3)
    for _ in range(2):
        fail(ejections, "a", 1)
        fail(ejections, "b", 1)
        ejections.answered("c", 200, 3)  # another replica's answer ends nobody else's streak
    fail(ejections, "b", 1)
    assert ejections.ejected("b", clock.now) and not ejections.ejected("a", clock.now)


def test_each_repeat_lasts_longer_up_to_the_cap_and_good_time_wins_it_back() -> None:
    ejections, clock, seen = rule(after=1, seconds=100.0)
    lengths = []
    for _ in range(5):
        fail(ejections, "a", 1)
        lengths.append(ejections.remaining()["a"])
        clock.now = ejections.until["a"]  # ends; fails again at once
    assert lengths == [100.0, 200.0, 300.0, MAX_SECONDS, MAX_SECONDS]
    # Routed to without failing for 4 bases: 5 ejections counted go down to 1.
    clock.now += 4 * 100.0
    fail(ejections, "a", 1)
    assert ejections.remaining()["a"] == 200.0
    assert [s for s in seen.seen if s[0] == "ejected"][-1] == ("ejected", "a", 200.0)


def test_a_base_longer_than_the_cap_is_the_cap() -> None:
    ejections, clock, _ = rule(after=1, seconds=600.0)
    fail(ejections, "a", 1)
    clock.now = ejections.until["a"]
    fail(ejections, "a", 1)
    assert ejections.remaining()["a"] == 600.0


def test_at_most_the_share_is_ejected_then_the_rest_stay_in_routing(
        caplog: pytest.LogCaptureFixture) -> None:
    """With 3 replicas and the default 0.5, one: a bad deploy on all three keeps two routed."""
    caplog.set_level(logging.INFO, "lb.ejections")
    ejections, clock, seen = rule()
    fail(ejections, "a", 5)
    fail(ejections, "b", 5)  # panic: b would be the second of 3
    fail(ejections, "b", 3)
    assert list(ejections.until) == ["a"] and ejections.streaks == {"b": 8}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # a's ejection, b's refusal: once for its whole streak
    assert "replica a ejected from routing for 10s after 5 failures" in warnings[0]
    assert "replica b failed 5 times in a row but stays in routing: 1 of 3" in warnings[1]
    clock.now += 10  # a's ejection ends: room for b at its next failure
    fail(ejections, "b", 1)
    assert list(ejections.until) == ["b"]
    assert [s[:2] for s in seen.seen] == [("ejected", "a"), ("returned", "a"), ("ejected", "b")]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["replica a is back in routing: its ejection ended"]


@pytest.mark.parametrize(("routable", "share", "most"), [
    (1, 0.5, 0), (2, 0.5, 1), (3, 0.5, 1), (4, 0.5, 2), (5, 0.5, 2), (10, 0.1, 1),
    (3, 1.0, 2), (1, 1.0, 0), (4, 0.0, 0),
])
def test_the_share_rounds_down_and_never_takes_the_last(routable: int, share: float,
                                                         most: int) -> None:
    ejections, _, _ = rule(after=1, share=share)
    for i in range(routable):
        fail(ejections, f"r{i}", 1, routable)
    assert len(ejections.until) == most


def test_zero_turns_ejection_off() -> None:
    ejections, _, seen = rule(after=0)
    fail(ejections, "a", 100)
    ejections.answered("a", 500, 3)
    assert ejections.until == {} and ejections.streaks == {} and seen.seen == []


def test_failures_while_ejected_do_not_count() -> None:
    ejections, clock, _ = rule(after=2)
    fail(ejections, "a", 2)
    fail(ejections, "a", 5)  # requests in flight as it was ejected
    clock.now = ejections.until["a"]
    fail(ejections, "a", 1)
    assert not ejections.ejected("a", clock.now) and ejections.streaks == {"a": 1}


def test_replicas_that_leave_the_set_are_forgotten() -> None:
    ejections, _, seen = rule(after=2)
    fail(ejections, "a", 2)
    fail(ejections, "b", 1)
    ejections.keep(["c"])
    assert ejections.until == {} and ejections.streaks == {}
    assert seen.seen[-1] == ("returned", "a") and ejections.next_end == math.inf


def test_settings_declare_and_check_it() -> None:
    defaults = Settings()
    assert (defaults.eject_after, defaults.eject_seconds, defaults.eject_max_share) == (5, 10.0,
                                                                                      0.5)
    env = {"LB_EJECT_AFTER": "3", "LB_EJECT_SECONDS": "2.5", "LB_EJECT_MAX_SHARE": "0.34"}
    assert Settings.from_env(env).eject_max_share == 0.34
    for bad in ({"LB_EJECT_AFTER": "-1"}, {"LB_EJECT_SECONDS": "0"},
                {"LB_EJECT_MAX_SHARE": "1.5"}):
        with pytest.raises(SettingsError):
            Settings.from_env(bad)


# -- the router and the walk -----------------------------------------------------------------------
def router_on(n: int, **settings: Any) -> tuple[Router, RoutingTable]:
    router = Router(Settings.from_env({}, **settings), Store())  # type: ignore[arg-type]
    members = replicas(n)
    return router, RoutingTable(1, Clockwise(n), {r.server_id: r for r in members}, False)


def tried(router: Router, table: RoutingTable, key: int, status: int = 200) -> list[str]:
    """The hostnames ``key``'s walk tries, every try answered with ``status``."""
    walk = RingWalk(router, table, key, RouterEvents())
    assert walk.start() is TRY
    assert walk.replica is not None
    hostname = walk.replica.hostname
    assert walk.told(ANSWERED, status=status) is DONE  # a 5xx answer is passed back, not retried
    return [hostname]


def test_a_replica_answering_500_is_ejected_and_its_keys_go_clockwise_then_return() -> None:
    router, table = router_on(3, eject_after=3, eject_seconds=0.2)
    assert [tried(router, table, 1, 500) for _ in range(3)] == [["r1"]] * 3
    assert "r1" in router.ejections.until
    assert router.first_choice(table, 1) is None  # the fast path leaves it to the walk
    assert [r.hostname for r in router.choices(table, 1)] == ["r2", "r0"]
    assert tried(router, table, 1) == ["r2"]
    assert tried(router, table, 0) == ["r0"]  # other keys stay where they are
    time.sleep(0.25)
    assert router.first_choice(table, 1) is not None
    assert tried(router, table, 1) == ["r1"] and router.ejections.until == {}


def test_failed_tries_count_too_and_an_answer_in_between_resets() -> None:
    router, table = router_on(3, eject_after=2, retries=0)

    def replay(*outcomes: Any) -> bool:
        for outcome in outcomes:
            router._suspects.clear()  # the key's own replica is tried each time
            walk = RingWalk(router, table, 1, RouterEvents())
            assert walk.start() is TRY
            walk.told(outcome, status=200)
        return "r1" in router.ejections.until

    assert not replay(UNREACHABLE, ANSWERED, TIMED_OUT)
    assert router.ejections.streaks == {"r1": 1}
    assert replay(UNREACHABLE)


def test_when_every_replica_left_is_ejected_they_are_routed_to_anyway() -> None:
    router, table = router_on(2, retries=2)
    far = time.monotonic() + 60
    router.ejections.until.update({"r0": far, "r1": far})  # as if the set shrank under them
    router.ejections.next_end = far
    assert router.first_choice(table, 1) is None
    assert [r.hostname for r in router.choices(table, 1)] == ["r1", "r0"]
    assert tried(router, table, 1, 500) == ["r1"]
    bounded, table = router_on(2, retries=2, bounded_load=1.25)
    bounded.ejections.until.update({"r0": far, "r1": far})
    bounded.ejections.next_end = far
    assert [r.hostname for r in bounded.choices(table, 1)] == ["r1", "r0"]


def test_a_success_with_no_streak_calls_nothing_of_the_rule() -> None:
    """The hot path's promise: a routed GET answered below 500 while no replica has a streak
    leaves the rule alone (``RingWalk.told`` looks at ``streaks`` itself)."""
    router, table = router_on(3)
    calls: list[str] = []
    router.ejections.answered = lambda *a: calls.append("answered")  # type: ignore[method-assign]
    router.ejections.ejected = lambda *a: calls.append("ejected") or False  # type: ignore
    assert tried(router, table, 1) == ["r1"]
    assert calls == []
