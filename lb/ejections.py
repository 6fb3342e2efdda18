"""Passive health: a replica that fails request after request leaves routing for a while.

The supervisor's heartbeat only asks ``/heartbeat``; a replica that answers it but fails every
routed request (a bad deploy answering 500, a handler that hangs) stays routable, and every key
it owns fails for as long as it runs. ``Ejections`` is the rule that catches it, from the
outcomes of the requests a worker routes (``RingWalk.told`` reports each one), in the manner of
Envoy's outlier detection (consecutive 5xx, ejection time growing with repeats, a cap on the
share ejected at once):

- *A failure* is an answer with a 5xx status, or a try that got no whole answer (unreachable,
  timed out, stalled, broken; a kept-alive connection's first close is not one). Any other
  answer (2xx to 4xx) ends the replica's streak.
- *Ejection.* ``LB_EJECT_AFTER`` failures in a row eject the replica: ``Router`` passes it over
  as if it were not routable, so its keys go to the next replica clockwise; they come back when
  the ejection ends. Its streak starts again from zero then.
- *Growth.* The n-th ejection lasts n x ``LB_EJECT_SECONDS``, at most ``MAX_SECONDS`` (or the
  base, when that is longer). n goes down by one for each ``LB_EJECT_SECONDS`` the replica
  then spends in routing without being ejected again, so a replica that failed once long ago
  starts afresh.
- *At most a share at once.* No more than ``floor(LB_EJECT_MAX_SHARE x routable)`` replicas
  are ejected at once, and never the last routable one: 1 of 3 with the default 0.5. A
  failure that would eject one more leaves the replica in routing ("panic": it is routed to,
  its answers, 500s included, are passed back) and is logged once per streak; it is ejected
  at its next failure once room is made. If the replica set shrinks while replicas are
  ejected so that every routable replica is, ``Router.choices`` routes to them anyway.
- *Per worker.* Each balancer worker process has its own ``Router`` and so its own ejections,
  judged on the requests it routed: with W workers a bad replica is ejected by each after
  about ``LB_EJECT_AFTER`` of its own failures. The metrics add the workers up.

A 5xx answer is never retried on another replica: the contract passes the replica's answer
back, and a request the replica may have acted on is not the balancer's to send twice. It is
counted, and enough of them eject the replica for the requests after it.

The cost on the data path: an answer with a status below 500 from a replica with no streak
calls nothing here (``RingWalk.told`` looks at ``streaks`` itself); consulting (``until``) is
a look at an empty dict while nothing is ejected. No sockets and no wall clock here (``clock``
is ``time.monotonic`` unless a test hands its own), so ``tests/test_ejections.py`` drives every
rule without sleeping.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

from lb.events import RouterEvents

log = logging.getLogger(__name__)

# The longest one ejection lasts (Envoy's max_ejection_time default), unless the base is longer.
MAX_SECONDS = 300.0


class Ejections:
    """One worker's ejected replicas, by hostname, and the failure streaks that lead there.

    Readers on the data path look at ``until`` and ``streaks`` without a lock (a dict read is
    atomic); every change is made under ``_lock``, by the few calls that follow a failure or
    end a streak.
    """

    def __init__(self, after: int, seconds: float, max_share: float,
                 events: RouterEvents | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after  # failures in a row that eject; 0: never
        self.seconds = seconds
        self.max_share = max_share
        self.events = events or RouterEvents()
        self.clock = clock
        self.until: dict[str, float] = {}  # hostname -> clock() when its ejection ends
        self.streaks: dict[str, int] = {}  # hostname -> failures in a row (none: no streak)
        self.next_end = math.inf  # the earliest of ``until``: when ``sweep`` has work
        # hostname -> (ejections counted for growth, clock() when the last one ended)
        self._history: dict[str, tuple[int, float]] = {}
        self._warned: set[str] = set()  # refused an ejection this streak (logged once)
        self._lock = threading.Lock()

    # -- told by the walk --------------------------------------------------------------------
    def answered(self, hostname: str, status: int, routable: int) -> None:
        """``hostname`` answered with ``status``; ``routable``: replicas in the table."""
        if status >= 500:
            self.failed(hostname, routable)
        elif hostname in self.streaks:
            with self._lock:
                self.streaks.pop(hostname, None)
                self._warned.discard(hostname)

    def failed(self, hostname: str, routable: int) -> None:
        """A try at ``hostname`` failed (a 5xx answer, or no whole answer)."""
        if not self.after:
            return
        with self._lock:
            now = self.clock()
            if now >= self.next_end:
                self._sweep(now)
            if hostname in self.until:  # routed to while ejected (panic, in flight): no count
                return
            streak = self.streaks[hostname] = self.streaks.get(hostname, 0) + 1
            if streak < self.after:
                return
            allowed = min(math.floor(self.max_share * routable), routable - 1)
            if len(self.until) >= allowed:
                if hostname not in self._warned:
                    self._warned.add(hostname)
                    log.warning("replica %s failed %d times in a row but stays in routing: "
                                "%d of %d replicas are ejected already (LB_EJECT_MAX_SHARE %g)",
                                hostname, streak, len(self.until), routable, self.max_share)
                return
            self._eject(hostname, streak, now)

    def _eject(self, hostname: str, streak: int, now: float) -> None:
        count, ended = self._history.get(hostname, (0, now))
        count = max(0, count - int((now - ended) / self.seconds)) + 1
        seconds = min(count * self.seconds, max(MAX_SECONDS, self.seconds))
        self._history[hostname] = (count, now + seconds)
        self.until[hostname] = now + seconds
        self.next_end = min(self.next_end, now + seconds)
        self.streaks.pop(hostname, None)
        self._warned.discard(hostname)
        log.warning("replica %s ejected from routing for %.0fs after %d failures in a row "
                    "(ejection %d; its keys go to the next replica clockwise)",
                    hostname, seconds, streak, count)
        self.events.ejected(hostname, seconds)

    # -- consulted by the router -------------------------------------------------------------
    def ejected(self, hostname: str, now: float) -> bool:
        """``hostname`` is ejected at ``now`` (ejections that ended are swept first)."""
        if now >= self.next_end:
            self.sweep(now)
        return self.until.get(hostname, 0.0) > now

    def sweep(self, now: float | None = None) -> None:
        """End the ejections whose time is up (logged, and the gauge set back)."""
        with self._lock:
            self._sweep(self.clock() if now is None else now)

    def _sweep(self, now: float) -> None:
        ended = [h for h, until in self.until.items() if until <= now]
        for hostname in ended:
            del self.until[hostname]
            log.info("replica %s is back in routing: its ejection ended", hostname)
            self.events.returned(hostname)
        self.next_end = min(self.until.values(), default=math.inf)

    def keep(self, hostnames: Iterable[str]) -> None:
        """Forget replicas that are no longer routable (removed, down, replaced)."""
        names = set(hostnames)
        with self._lock:
            for hostname in [h for h in self.until if h not in names]:
                del self.until[hostname]
                log.info("replica %s left the replica set while ejected", hostname)
                self.events.returned(hostname)
            self.next_end = min(self.until.values(), default=math.inf)
            self.streaks = {h: n for h, n in self.streaks.items() if h in names}
            self._history = {h: v for h, v in self._history.items() if h in names}
            self._warned &= names

    def remaining(self) -> dict[str, float]:
        """Seconds left of each ejection now in force, by hostname."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            return {h: until - now for h, until in self.until.items()}
