"""Hot keys through the public API: sticky keys of Zipf popularity on a real stack (N=8,
Maglev, ``LB_HASH_KEY=query:k``, ``LB_BOUNDED_LOAD=1.25``, one balancer worker), on both data
paths. The bound holds over every window of the worker's recent requests, and little more than
the least the bound requires moves away from home (``bench/hot_keys.py`` has the figures of the
methods side by side, with concurrent clients)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable

from lb.bounded import WINDOW
from lb.routing import Router
from tests.conftest import RunningStack
from tests.test_bounded import zipf

C = 1.25
N = 8
REQUESTS = 3000


def test_hot_keys_are_bounded_and_move_little(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(n=N, strategy="maglev", hash_key="query:k", bounded_load=C, workers=1)
    keys = zipf(REQUESTS, 10_000, 1.1, seed=5)
    # Each key's home: the replica the same table gives it with loads not bounded.
    plain = Router(dataclasses.replace(stack.settings, bounded_load=0.0), stack.registry)
    home = {k: plain.candidates(k)[0].hostname for k in set(keys)}
    off = Counter(home[k] for k in keys)
    least = sum(max(0.0, v - C * REQUESTS / N) for v in off.values()) / REQUESTS
    assert max(off.values()) / (REQUESTS / N) > 1.5 and least > 0.05  # skewed enough

    served = []  # one client, one worker: the worker routes them in this order
    for k in keys:
        reply = stack.get(f"/home?k={k}")
        assert reply.status_code == 200, reply.text
        served.append(reply.headers["X-Served-By"])
    cap = math.ceil(C * WINDOW / N)
    for end in range(WINDOW, REQUESTS + 1, 16):
        window = Counter(served[end - WINDOW:end])
        assert max(window.values()) <= cap, (end, window)
    away = [(k, s) for k, s in zip(keys, served, strict=True) if s != home[k]]
    assert 0.9 * least <= len(away) / REQUESTS <= 1.5 * least, (len(away), least)
    spill: dict[int, set[str]] = defaultdict(set)
    for k, s in away:
        spill[k].add(s)
    hot = sorted(spill)[:10]  # the lowest keys are the hottest
    assert sum(len(spill[k]) for k in hot) / len(hot) <= 3.0, {k: spill[k] for k in hot}
