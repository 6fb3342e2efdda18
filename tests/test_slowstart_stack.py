"""Slow start on a real stack (``LB_SLOW_START``), both data paths: a replica that joins by
``POST /add`` takes its keys gradually, and so does the supervisor's replacement of a killed one.

A fixed set of sticky keys (``LB_HASH_KEY=query:id``, hedging off, ring160) is sampled about
every second through keep-alive sessions: the joining replica's count never falls, starts well
under its full share, ends at its full share (the full map's owners, as ``LB_SLOW_START=0``
routes), and no key changes owner twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from itertools import pairwise

import pytest

from tests.conftest import RunningStack
from tests.helpers_chaos import wait_for
from tests.helpers_stack import owners_by_map, served_by
from tests.test_chaos import kill_replica, restored

pytestmark = pytest.mark.system

RAMP = 7.0  # seconds (LB_SLOW_START)
KEYS = random.Random(7).sample(range(100000, 1000000), 300)
THREADS = 6


def _ramp(stack: RunningStack, name: str, ready_since: float) -> list[dict[int, str]]:
    """Samples about every second from now until a second after ``name``'s ramp has ended;
    asserts the ramp's guarantees and returns the samples."""
    samples: list[dict[int, str]] = []
    times = []
    while True:
        now = time.time()
        samples.append(served_by(stack, KEYS, clients=THREADS))
        times.append(now - ready_since)
        if now > ready_since + RAMP + 1.0:
            break
        time.sleep(max(0.0, now + 1.0 - time.time()))
    full = owners_by_map(stack, KEYS)
    mine = sum(owner == name for owner in full.values())
    counts = [sum(owner == name for owner in s.values()) for s in samples]
    print(f"{name}: full share {mine}/{len(KEYS)}; per sample (s since ready: count) "
          + ", ".join(f"{t:.1f}: {c}" for t, c in zip(times, counts, strict=True)))
    assert mine >= 30, mine  # enough keys to see a ramp
    assert counts == sorted(counts), counts  # never falls
    assert counts[0] <= 0.4 * mine, (counts, mine)  # starts well under its full share
    assert samples[-1] == full  # ends at the full map
    for k in KEYS:
        owners = [s[k] for s in samples]
        changes = sum(a != b for a, b in pairwise(owners))
        assert changes <= 1, (k, owners)
        assert changes == 0 or owners[-1] == name, (k, owners)  # only its keys move (a ring)
    return samples


def test_a_joining_and_a_replacement_replica_ramp_up(
        make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(n=3, strategy="ring160", hash_key="query:id", hedge_share=0.0,
                       slow_start=RAMP)
    # The stack's own replicas do not ramp: nobody could take their keys meanwhile.
    assert all(r.ready_since is None for r in stack.state().members())
    before = served_by(stack, KEYS, clients=THREADS)
    reply = stack.post("/add", json={"n": 1, "hostnames": ["Joiner"]})
    assert reply.status_code == 200, reply.text
    joiner = next(r for r in stack.state().members() if r.hostname == "Joiner")
    assert joiner.ready_since is not None
    samples = _ramp(stack, "Joiner", joiner.ready_since)
    # The first sample: every key where it was before the join, or moved to the joiner.
    assert all(samples[0][k] in (before[k], "Joiner") for k in KEYS)

    # The supervisor's replacement of a killed replica (same server id, so the same keys under
    # ring160) ramps too.
    assert joiner.handle is not None
    assert kill_replica(joiner.handle, whole=True) >= 1
    wait_for(restored(stack, 4, "Joiner"), timeout=30)
    new = next(r for r in stack.state().members() if r.server_id == joiner.server_id)
    assert new.ready_since is not None and new.ready_since > joiner.ready_since
    again = _ramp(stack, new.hostname, new.ready_since)
    assert {k for k, s in again[-1].items() if s == new.hostname} == \
        {k for k, s in samples[-1].items() if s == "Joiner"}
