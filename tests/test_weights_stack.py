"""Weights through the public API on real stacks (``POST /weight``, ``/add``'s ``weight``), on
both data paths: the shares they give, the keys a change moves, draining with weight 0, bad
input that changes nothing, and concurrent admin calls that lose no update.

Keys are sticky (``LB_HASH_KEY=query:id``) and ``X-Served-By`` says who answered. Hedging is off
(``LB_HEDGE_SHARE=0``): a hedge is answered by the next replica, which would blur who owns a
key. Weight changes are looked at right after the call returns: the registry file is replaced
before the reply, and the workers see it before any later request (``lb.watch``).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from lb.registry import READY
from tests.conftest import RunningStack
from tests.helpers_echo import start_echo_replica
from tests.helpers_stack import owners_by_map, served_by

NAMES = ["Server1", "Server2", "Server3"]


def sticky_stack(make_stack: Callable[..., RunningStack], **overrides: Any) -> RunningStack:
    return make_stack(hash_key="query:id", hedge_share=0, **overrides)


def set_weights(stack: RunningStack, weights: dict[str, int]) -> dict[str, Any]:
    reply = stack.post("/weight", json={"weights": weights})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "successful"
    for name, weight in weights.items():
        assert body["message"]["weights"][name] == weight
    return dict(body["message"])


def fixed_keys(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.sample(range(10**11, 10**12), count)


# -- 1. shares ---------------------------------------------------------------------------------
def test_maglev_weights_1_2_3_give_a_sixth_two_sixths_three_sixths(
        make_stack: Callable[..., RunningStack]) -> None:
    """20,000 random keys: each replica's count is within 2 percentage points of w / W.

    The margin: a count is binomial; its share's standard deviation is sqrt(p(1-p)/n), at most
    0.35 points at p = 1/2 and n = 20,000, so 2 points is over 5.5 of them (a false failure
    about once in 10^7 runs); the table itself is within an entry or two of w / W (0.003
    points). A weight ignored (1:1:1 or 1:2:2) is off by 8 points or more."""
    stack = sticky_stack(make_stack, strategy="maglev")
    message = set_weights(stack, {"Server1": 1, "Server2": 2, "Server3": 3})
    want = {"Server1": 1 / 6, "Server2": 2 / 6, "Server3": 3 / 6}
    assert message["shares"] == pytest.approx(want, abs=0.005)
    began = time.monotonic()
    served = served_by(stack, fixed_keys(20_000, seed=11))
    took = time.monotonic() - began
    counts = Counter(served.values())
    shares = {name: counts[name] / len(served) for name in NAMES}
    errors = {name: round(100 * (shares[name] - want[name]), 3) for name in NAMES}
    print(f"\nmaglev 1:2:3 over {len(served)} keys in {took:.1f}s: counts {dict(counts)}, "
          f"error in points {errors}")
    assert set(counts) == set(NAMES)
    assert all(abs(e) <= 2.0 for e in errors.values()), errors


# -- 2. a weight change moves only what it must --------------------------------------------------
def moves(before: dict[int, str], after: dict[int, str]) -> Counter[tuple[str, str]]:
    return Counter((before[k], after[k]) for k in before if before[k] != after[k])


@pytest.mark.parametrize("strategy", ["ring160", "ring", "maglev"])
def test_a_weight_change_moves_only_the_keys_it_must(
        make_stack: Callable[..., RunningStack], strategy: str) -> None:
    """3,000 fixed keys; Server2's weight 1 -> 3, then back to 1.

    On the rings, exactly: keys move only to Server2 when it grows and only from it when it
    shrinks, and its old weight gives every key its old owner back. Maglev's table is filled
    again: a few entries change hands between unchanged replicas (a bound, the figure printed);
    the table is a function of the ids and weights, so the old weight gives the old table."""
    stack = sticky_stack(make_stack, strategy=strategy, hash="xxhash")
    keys = fixed_keys(3000, seed=22)
    start = served_by(stack, keys)
    assert start == owners_by_map(stack, keys)
    set_weights(stack, {"Server2": 3})
    grown = served_by(stack, keys)
    assert grown == owners_by_map(stack, keys)  # routed as the registry says, at once
    set_weights(stack, {"Server2": 1})
    back = served_by(stack, keys)
    up, down = moves(start, grown), moves(grown, back)
    across_up = sum(c for (a, b), c in up.items() if "Server2" not in (a, b))
    across_down = sum(c for (a, b), c in down.items() if "Server2" not in (a, b))
    count = Counter(start.values())["Server2"], Counter(grown.values())["Server2"]
    print(f"\n{strategy}: Server2 1 -> 3 moved {sum(up.values())} of {len(keys)} keys "
          f"({dict(up)}), {across_up} between unchanged replicas; 3 -> 1 moved "
          f"{sum(down.values())}, {across_down} between unchanged; Server2 owned {count[0]} "
          f"-> {count[1]}")
    assert count[1] > count[0] * 1.5  # it did grow (3 x its share, less what it had)
    assert back == start  # the old weight, the old owners
    if strategy == "maglev":
        assert across_up < 0.02 * len(keys) and across_down < 0.02 * len(keys)
        assert Counter(back.values())["Server2"] < count[1]  # and shrank back
    else:
        assert set(up) <= {("Server1", "Server2"), ("Server3", "Server2")}, up
        assert set(down) <= {("Server2", "Server1"), ("Server2", "Server3")}, down
        assert across_up == across_down == 0


# -- 3. weight 0 drains ------------------------------------------------------------------------
def test_weight_0_drains_a_replica_and_weight_1_brings_its_keys_back(
        make_stack: Callable[..., RunningStack]) -> None:
    """A slow request in flight to a replica when its weight becomes 0 completes with 200 from
    it; no new request goes to it; it stays in /rep and ready (its heartbeat goes on); its old
    weight gives it its keys back. An echo replica (``tests.helpers_echo``) has ``/slow``."""
    stack = sticky_stack(make_stack, n=2, hash="xxhash")
    start_echo_replica(stack.registry, stack.settings.deployment, "drain-echo")
    keys = fixed_keys(400, seed=33)
    home = served_by(stack, keys)
    mine = [k for k in keys if home[k] == "drain-echo"]
    assert len(mine) >= 20, Counter(home.values())
    results: list[tuple[int, str, str]] = []

    def slow(key: int) -> None:
        reply = requests.get(f"{stack.url}/slow?s=2&id={key}", timeout=60)
        results.append((reply.status_code, reply.headers.get("X-Served-By", ""),
                        reply.json().get("echo", "")))

    threads = [threading.Thread(target=slow, args=(k,)) for k in mine[:4]]
    for t in threads:
        t.start()
    time.sleep(0.7)  # all four are inside the echo replica now
    message = set_weights(stack, {"drain-echo": 0})
    drained_at = time.time()
    assert message["shares"]["drain-echo"] == 0.0
    assert sum(message["shares"].values()) == pytest.approx(1.0)
    after = served_by(stack, keys)
    for t in threads:
        t.join(timeout=60)
    assert results == [(200, "drain-echo", "drain-echo")] * 4
    assert "drain-echo" not in after.values(), Counter(after.values())
    assert all(after[k] == home[k] for k in keys if k not in mine)  # only its keys moved
    assert "drain-echo" in stack.rep()["replicas"]
    deadline = time.monotonic() + 20
    while True:  # heartbeats go on: recorded again since the drain, still ready
        entry = stack.state().find("drain-echo")
        assert entry is not None and entry.state == READY and entry.weight == 0
        if (entry.last_heartbeat or 0) > drained_at:
            break
        assert time.monotonic() < deadline, "no heartbeat recorded since the drain"
        time.sleep(0.2)
    status = stack.get("/_lb/status.json").json()["message"]
    assert {r["hostname"]: r for r in status["replicas"]}["drain-echo"]["share"] == 0.0
    assert served_by(stack, keys) == after  # still drained
    set_weights(stack, {"drain-echo": 1})
    assert served_by(stack, keys) == home


# -- 4. bad input changes nothing --------------------------------------------------------------
TOKEN = "weights-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

BAD_WEIGHT_BODIES: list[tuple[Any, int, str]] = [
    ({"weights": {"Server1": 1.5}}, 400, "The weight of 'Server1' must be an integer from 0"),
    ({"weights": {"Server1": "2"}}, 400, "The weight of 'Server1' must be an integer"),
    ({"weights": {"Server1": True}}, 400, "The weight of 'Server1' must be an integer"),
    ({"weights": {"Server1": -1}}, 400, "The weight of 'Server1' must be an integer"),
    ({"weights": {"Server1": 257}}, 400, "The weight of 'Server1' must be an integer"),
    ({"weights": {"Server1": 2, "Server2": 1.5}}, 400, "The weight of 'Server2'"),  # none change
    ({"weights": {"Server1": 2, "nosuch": 1}}, 409, "Replica 'nosuch' does not exist"),
    ({"weights": []}, 400, "Field 'weights' must be an object"),
    ({"weights": {"Server1": 2}, "extra": 1}, 400, "Request body must be a JSON object with one"),
    ({"weight": {"Server1": 2}}, 400, "Request body must be a JSON object with one"),
    ([{"Server1": 2}], 400, "Request body must be a JSON object with one"),
    # M = 512, K = 9: a weight of 60 needs 540 virtual servers
    ({"weights": {"Server1": 60}}, 409, "The hash map has no room for a weight of 60"),
]

BAD_ADD_BODIES: list[tuple[Any, int, str]] = [
    ({"n": 1, "weight": 0}, 400, "Field 'weight' must be an integer from 1 to 256"),
    ({"n": 1, "weight": 1.5}, 400, "Field 'weight' must be an integer from 1"),
    ({"n": 1, "weight": "2"}, 400, "Field 'weight' must be an integer from 1"),
    ({"n": 1, "weight": True}, 400, "Field 'weight' must be an integer from 1"),
    ({"n": 1, "weight": -1}, 400, "Field 'weight' must be an integer from 1"),
    ({"n": 1, "weight": 257}, 400, "Field 'weight' must be an integer from 1"),
    ({"n": 1, "weight": 2, "color": "red"}, 400, "Unknown field 'color'"),
    ({"n": 1, "hostnames": ["big"], "weight": 60}, 409, "The hash map has no room"),
]


def registry_facts(stack: RunningStack) -> list[tuple[Any, ...]]:
    """What an admin call may change (the version moves with every heartbeat record)."""
    return [(r.hostname, r.server_id, r.slots, r.weight, r.state)
            for r in stack.state().replicas]


def assert_envelope(reply: requests.Response, status: int, message: str) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"message", "status"} and body["status"] == "failure", body
    assert body["message"].startswith(f"<Error> {message}"), body


def test_bad_weights_change_nothing(make_stack: Callable[..., RunningStack]) -> None:
    """Every bad ``POST /weight`` and ``/add``: its status, the contract's envelope, the
    registry as it was. Both data paths: the async worker routes a GET of /weight itself and
    hands POSTs to the Flask app, the threads worker does both in Flask."""
    stack = sticky_stack(make_stack, admin_token=TOKEN)
    before = registry_facts(stack)
    for body, status, message in BAD_WEIGHT_BODIES:
        assert_envelope(stack.post("/weight", json=body, headers=AUTH), status, message)
    for body, status, message in BAD_ADD_BODIES:
        assert_envelope(stack.post("/add", json=body, headers=AUTH), status, message)
    malformed = stack.post("/weight", data=b'{"weights": {"Server1": 2', headers=AUTH)
    assert_envelope(malformed, 400, "")
    assert_envelope(stack.post("/weight", json={"weights": {"Server1": 2}}), 401, "")
    assert registry_facts(stack) == before

    put = requests.put(stack.url + "/weight", json={"weights": {"Server1": 2}}, headers=AUTH,
                       timeout=30)
    assert_envelope(put, 405, "")
    assert put.headers["Allow"] == "GET, HEAD, POST"
    # Only POST is the balancer's: a GET is routed, and the replicas have no /weight.
    assert_envelope(stack.get("/weight?id=7"), 400,
                    "'/weight' endpoint does not exist in server replicas")
    assert registry_facts(stack) == before
    listed = stack.post("/weight", json={"weights": {}}, headers=AUTH)  # lists, changes nothing
    assert listed.status_code == 200, listed.text
    assert listed.json()["message"]["weights"] == dict.fromkeys(NAMES, 1)
    assert registry_facts(stack) == before


# -- 5. concurrent admin calls -----------------------------------------------------------------
def test_concurrent_weight_calls_and_an_add_lose_no_update(
        make_stack: Callable[..., RunningStack]) -> None:
    """Four ``POST /weight`` (each another replica's weight, two of them the same replica's)
    and an ``/add`` with a weight, at once, through both balancer workers: each a 200, and the
    end state is that of some serial order: every change there, the spec map's virtual servers
    w x K per replica, no slot held twice."""
    stack = sticky_stack(make_stack, hash="xxhash", n=3)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/weight", {"weights": {"Server1": 2}}),
        ("/weight", {"weights": {"Server2": 3}}),
        ("/weight", {"weights": {"Server3": 4}}),
        ("/weight", {"weights": {"Server3": 5}}),
        ("/add", {"n": 1, "hostnames": ["heavy"], "weight": 2}),
    ]
    gate = threading.Barrier(len(calls))

    def call(path: str, body: dict[str, Any]) -> requests.Response:
        gate.wait(timeout=30)
        return stack.post(path, json=body)

    with ThreadPoolExecutor(len(calls)) as pool:
        replies = list(pool.map(lambda c: call(*c), calls))
    assert [r.status_code for r in replies] == [200] * len(calls), [r.text for r in replies]
    state = stack.wait_ready(4)
    weights = {r.hostname: r.weight for r in state.members()}
    assert weights["Server1"] == 2 and weights["Server2"] == 3 and weights["heavy"] == 2
    assert weights["Server3"] in (4, 5)
    k = stack.settings.virtual_per_server
    assert {r.hostname: len(r.slots) for r in state.members()} == {
        name: w * k for name, w in weights.items()}
    slots = [s for r in state.replicas for s in r.slots]
    assert len(slots) == len(set(slots))
    listed = stack.post("/weight", json={"weights": {}})
    assert listed.json()["message"]["weights"] == weights
    served = Counter(served_by(stack, fixed_keys(600, seed=55)).values())
    assert set(served) == set(weights), served  # all five route
    print(f"\nconcurrent admin: final weights {weights}; 600 keys served {dict(served)}")
