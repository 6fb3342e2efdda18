"""The supervisor's rule for late heartbeats, one round at a time (``Supervisor.tick`` over the
fake backend, as in ``tests/test_reconcile.py``): a ready replica whose heartbeat timed out is
forgiven when some balancer worker's answer counter for it changed since the previous round
(``lb.evidence``); a refusal, a process gone, or no change is never forgiven. The counters
are published through the real file store, as balancer workers do."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from lb.evidence import Evidence
from lb.heartbeat import FAILED, LATE, probe
from lb.registry import READY, Replica
from tests.test_reconcile import Recorder, World, world  # noqa: F401 - the fixture


class Forgiven(Recorder):
    def heartbeat_forgiven(self, replica: Replica) -> None:
        self.seen.append(("forgiven", replica.hostname))


@pytest.fixture
def late(world: World) -> World:  # noqa: F811 - the fixture imported above
    world.sup.events = world.events = Forgiven()
    world.ready()
    return world


def publish(w: World, source: str, **counts: int) -> None:
    w.registry.publish_answers(source, counts)


def replica_ids(w: World) -> list[tuple[str, str | None, str]]:
    return [(r.hostname, r.handle, r.state) for r in w.registry.read().replicas]


def test_a_late_heartbeat_is_forgiven_while_a_balancer_gets_answers(late: World) -> None:
    before = replica_ids(late)
    publish(late, "lb-a", Server1=10)
    late.tick()  # the first look at a source: no evidence yet, nothing late either
    late.backend.late.add("Server1")
    for n in range(20):
        publish(late, "lb-a", Server1=11 + n)
        late.tick()
    assert replica_ids(late) == before  # never down, never replaced
    assert late.backend.started == ["Server1", "Server2"]
    assert late.events.seen.count(("forgiven", "Server1")) == 20
    entry = late.registry.read().find("Server1")
    assert entry is not None and (entry.state, entry.failures) == (READY, 0)


def test_one_source_of_several_is_enough_and_a_forgiven_heartbeat_ends_the_misses(
        late: World) -> None:
    """With several balancers none sees the whole load: any source's change counts. A miss
    (late, no answers counted) followed by a forgiven one is not two misses in a row."""
    publish(late, "lb-a", Server1=5)
    publish(late, "lb-b", Server2=7)
    late.tick()
    late.backend.late.add("Server1")
    late.tick()  # late, and no counter changed: a miss
    assert late.registry.read().find("Server1").failures == 1  # type: ignore[union-attr]
    publish(late, "lb-b", Server1=1, Server2=7)  # another balancer got an answer from it
    late.tick()
    assert late.registry.read().find("Server1").failures == 0  # type: ignore[union-attr]
    late.tick()  # a miss again: one, not two
    entry = late.registry.read().find("Server1")
    assert entry is not None and (entry.state, entry.failures) == (READY, 1)


def test_a_late_heartbeat_without_new_answers_is_a_miss_as_before(late: World) -> None:
    """A hang stops the answers at once: counters that do not change forgive nothing."""
    publish(late, "lb-a", Server1=10)
    late.tick()
    late.backend.late.add("Server1")
    late.tick()
    late.tick()
    assert late.registry.read().find("Server1") is None  # down after 2 misses, replaced
    assert ("down", "Server1 missed_heartbeats") in late.events.seen


def test_a_hang_is_found_one_round_later_at_most(late: World) -> None:
    """Answers counted before the hang may forgive the first late heartbeat; then the misses
    count as before: failures + 1 rounds instead of failures."""
    publish(late, "lb-a", Server1=10)
    late.tick()
    late.backend.late.add("Server1")
    publish(late, "lb-a", Server1=12)  # answered just before it hung
    rounds = 0
    while late.registry.read().find("Server1") is not None:
        late.tick()
        rounds += 1
        assert rounds <= late.sup.settings.heartbeat_failures + 1
    assert rounds == late.sup.settings.heartbeat_failures + 1
    assert late.events.seen.count(("forgiven", "Server1")) == 1


def test_a_refused_heartbeat_or_a_process_gone_is_never_forgiven(late: World) -> None:
    publish(late, "lb-a", Server1=1, Server2=1)
    late.tick()
    late.backend.mute.add("Server1")  # refused: counted, answers or not
    late.backend.late.add("Server2")
    late.backend.die("Server2")  # gone: down at once, answers or not
    publish(late, "lb-a", Server1=2, Server2=2)
    state = late.tick()
    assert state.find("Server2") is None
    assert ("down", "Server2 process_gone") in late.events.seen
    assert state.find("Server1").failures == 1  # type: ignore[union-attr]
    publish(late, "lb-a", Server1=3, Server2=2)
    assert late.tick().find("Server1") is None
    assert not [e for e in late.events.seen if e[0] == "forgiven"]


def test_a_new_or_vanished_source_is_no_evidence(late: World) -> None:
    """A source seen for the first time may hold old counts (a worker long gone, a supervisor
    just started); one that vanished says nothing."""
    late.backend.late.add("Server1")
    publish(late, "lb-a", Server1=50)
    late.tick()  # lb-a is new: a miss
    late.registry.withdraw_answers("lb-a")
    late.tick()  # gone: a second miss
    assert late.registry.read().find("Server1") is None


def test_with_late_heartbeats_counted_the_answers_forgive_nothing(late: World) -> None:
    late.sup.settings = dataclasses.replace(late.sup.settings, late_heartbeats="count")
    publish(late, "lb-a", Server1=1)
    late.tick()
    late.backend.late.add("Server1")
    for n in range(2):
        publish(late, "lb-a", Server1=2 + n)
        late.tick()
    assert late.registry.read().find("Server1") is None


def test_evidence_is_a_change_of_some_sources_counter_since_the_last_look() -> None:
    evidence = Evidence()
    assert evidence.serving({"a": {"x": 1}}) == set()  # the first look
    assert evidence.serving({"a": {"x": 1}, "b": {"y": 3}}) == set()  # b is new
    assert evidence.serving({"a": {"x": 2}, "b": {"y": 3, "z": 1}}) == {"x", "z"}
    # A counter that stepped back (an increment lost between threads) still changed; one
    # that vanished (its replica left the routing table) says nothing.
    assert evidence.serving({"a": {"x": 1}, "b": {}}) == {"x"}
    evidence.forget()  # a round that could not look: the next one starts afresh
    assert evidence.serving({"a": {"x": 9}}) == set()


def test_probe_tells_a_late_heartbeat_from_a_failed_one() -> None:
    """A listening socket that never answers (a replica busy, or SIGSTOPped) is late; a port
    nobody listens on is a failure, at once."""
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        late_address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        refused_address = f"http://127.0.0.1:{closed.getsockname()[1]}"
        assert probe(late_address, 0.2) is LATE
        assert probe(refused_address, 0.2) is FAILED
