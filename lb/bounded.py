"""Bounded loads over a window of recent requests (``LB_BOUNDED_LOAD=c``): the replicas a
worker gave its last ``WINDOW`` requests to, and which of them may take one more.

Why a window and two caps (the rules, written once; ``Router._bounded`` walks with them):

- **A window, not in-flight counts.** In-flight counts swing with every answer: a replica at
  its cap for an instant passes over requests that a count over a window would not, so far more
  than the overload moved away from home (cache misses). Counted over the last ``WINDOW``
  requests, a hot replica stays at its cap and only the excess leaves.
- **Own keys up to c x mean, others' overflow up to the mean.** A replica takes requests whose
  home it is while it holds fewer than ``ceil(c x mean)`` of the window (``own``), and the
  overflow of other replicas only while it holds at most ``mean`` (``guest``). So spilled
  requests never push a replica to its own cap and make it spill its own keys in turn (a
  cascade moves requests twice); there is always room: ``WINDOW`` requests over ``n`` replicas
  leave one of them at ``<= floor(mean)``.
- **One key's overflow in one place.** The overflow walks clockwise from the key (the
  strategy's walk, the same for every request of the key), and goes to the first replica with
  guest room: one key spills to one replica, to a second only when the first has no room left.

The bound: while the replica set is unchanged and nothing is ejected or suspect, over any
``WINDOW`` consecutive requests of one worker no replica gets more than ``ceil(c x mean)``
(a guest lands at ``<= floor(mean) + 1``, which is at most that); with weights, ``mean`` is
each replica's part of the window, ``WINDOW x w / W``. Retries count as requests
(a failed try and the next one both count), and a replica that left keeps its share until it
slides out; that, and ejected or suspect replicas taking no share, is the slack.
Each worker bounds its own requests; the balancer's whole load is then bounded too.
"""

from __future__ import annotations

import math
from collections import deque

# Requests remembered per worker. Large enough that ``mean`` is a count with room for c's
# fraction (32 replicas: 32 each), small enough to follow a change of popularity within
# seconds; the per-request cost does not depend on it.
WINDOW = 1024


class RecentLoad:
    """How many of this worker's last ``size`` requests each replica was given."""

    __slots__ = ("_recent", "c", "counts", "size")

    def __init__(self, c: float, size: int = WINDOW) -> None:
        if c <= 1 or size < 1:
            raise ValueError("c must be > 1 and size >= 1")
        self.c = c
        self.size = size
        self.counts: dict[str, int] = {}  # hostname -> requests in the window (none: absent)
        self._recent: deque[str] = deque()

    def caps(self, share: float) -> tuple[int, int]:
        """(own, guest) for a replica whose weight gives it ``share`` of the keys (1/n of n
        equal ones): it takes its own keys while it holds fewer than ``own`` of the window,
        others' overflow while it holds at most ``guest``. (Weighted, the mean is its part of
        the window; the shares add up to 1, so one replica still always has guest room.)"""
        mean = self.size * share
        return max(1, math.ceil(self.c * mean)), int(mean)

    def room(self, hostname: str, home: bool, caps: tuple[int, int]) -> bool:
        """Whether ``hostname`` may take one more request (``home``: the key is its own)."""
        held = self.counts.get(hostname, 0)
        return held < caps[0] if home else held <= caps[1]

    def given(self, hostname: str) -> None:
        """One more request went to ``hostname``; the oldest slides out of a full window."""
        recent, counts = self._recent, self.counts
        if len(recent) >= self.size:
            old = recent.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        recent.append(hostname)
        counts[hostname] = counts.get(hostname, 0) + 1
