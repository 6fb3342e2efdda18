"""Per-replica limits: the most requests in flight to one replica, a bounded wait queue for a
slot, and how long a request may wait in it (HAProxy's server ``maxconn``, ``maxqueue`` and
``timeout queue``).

One ``ReplicaLimits`` per balancer worker (``lb.routing.Router`` owns it; the ring walk takes and
gives back the slots): ``LB_REPLICA_MAXCONN`` requests in flight to each replica, then up to
``LB_QUEUE_SIZE`` waiting for one of them, first come first served, each at most
``LB_QUEUE_TIMEOUT`` seconds. A request that finds the queue full, or whose time runs out, is
answered 503 with ``Retry-After`` at once: an overloaded replica sheds what it cannot serve in
time instead of letting connections hang in its backlog until ``LB_UPSTREAM_TIMEOUT``.

No I/O and no sleeping here. A driver (the event loop, a thread) waits in its own way and is
woken through the ``wake`` callable it gave; ``clock`` is injectable so tests step time.

Rules, each in one place:

- *No barging.* A slot given back while someone waits goes straight to the first waiter (the
  count stays at the limit), so a newcomer's ``take`` fails while the queue is not empty: the
  fast path's check is one compare, and the order is FIFO.
- *Timeouts are FIFO too.* Every waiter waits the same ``timeout``, so deadlines grow along a
  queue: the ones past theirs are at its head, skipped (and woken, to answer 503) by ``release``.
- *A slot is given back once.* A waiter is WAITING, then GRANTED (it owns a slot: it uses it
  and releases it, or releases it unused) or GONE (timed out, or its client left: it never
  owned one); ``leave`` settles a wait that ended on the waiter's side, whichever came first.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from lb.errors import ApiError
from lb.events import RouterEvents


class Wait(enum.Enum):
    """Where a queued request stands."""

    WAITING = "waiting"  # in the queue
    GRANTED = "granted"  # handed a slot: it owns it now
    GONE = "gone"  # out of the queue without a slot (timed out, or its client left)


WAITING, GRANTED, GONE = Wait.WAITING, Wait.GRANTED, Wait.GONE


class Waiter:
    """One request queued for a slot at ``hostname``."""

    __slots__ = ("deadline", "hostname", "since", "state", "wake")

    def __init__(self, hostname: str, since: float, deadline: float,
                 wake: Callable[[], object]) -> None:
        self.hostname = hostname
        self.since = since
        self.deadline = deadline
        self.wake = wake  # called once its state leaves WAITING by another's hand
        self.state = WAITING


class AtLimit(ApiError):
    """The 503 of a request that got no slot: the queue was full or its time ran out."""

    def __init__(self, hostname: str, why: str, retry_after: int) -> None:
        super().__init__(503, f"Replica {hostname} is at its limit ({why}): try again shortly")
        self.headers = (("Retry-After", str(retry_after)),)


class ReplicaLimits:
    """Slots and queues of one balancer worker, per replica hostname (thread-safe)."""

    def __init__(self, maxconn: int, queue_size: int, timeout: float,
                 events: RouterEvents | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maxconn = maxconn  # 0: no limit (take always succeeds, nothing is counted)
        self.queue_size = queue_size
        self.timeout = timeout
        self.events = events or RouterEvents()
        self.clock = clock
        self.retry_after = max(1, math.ceil(timeout))  # whole seconds (RFC 9110 10.2.3)
        self.busy: dict[str, int] = {}  # hostname -> slots taken
        self.queues: dict[str, deque[Waiter]] = {}
        self._lock = threading.Lock()

    def take(self, hostname: str) -> bool:
        """A slot at ``hostname`` now, if one is free (never while others wait for one)."""
        if not self.maxconn:
            return True
        with self._lock:
            n = self.busy.get(hostname, 0)
            if n >= self.maxconn:
                return False
            self.busy[hostname] = n + 1
            return True

    def wait(self, hostname: str, wake: Callable[[], object]) -> Waiter | None:
        """Queue for a slot at ``hostname``; None when the queue is full (answer 503 now).
        A slot freed since ``take`` is granted at once (``wake`` is called)."""
        now = self.clock()
        with self._lock:
            waiter = Waiter(hostname, now, now + self.timeout, wake)
            n = self.busy.get(hostname, 0)
            if n < self.maxconn:
                self.busy[hostname] = n + 1
                waiter.state = GRANTED
            else:
                queue = self.queues.get(hostname) or deque()
                while queue and queue[0].deadline <= now:  # timed out: their drivers answer
                    queue.popleft().state = GONE
                if len(queue) >= self.queue_size:
                    waiter.state = GONE
                else:
                    queue.append(waiter)
                if queue:
                    self.queues[hostname] = queue
                else:
                    self.queues.pop(hostname, None)
        if waiter.state is GRANTED:
            wake()
        elif waiter.state is GONE:
            self.events.refused(hostname, "full")
            return None
        else:
            self.events.queued(hostname)
        return waiter

    def release(self, hostname: str) -> None:
        """A slot at ``hostname`` given back: to the first waiter still in time, if any."""
        if not self.maxconn:
            return
        if not self.queues:  # nobody waits anywhere (the usual case): count it down
            with self._lock:
                if not self.queues:
                    n = self.busy[hostname] - 1
                    if n:
                        self.busy[hostname] = n
                    else:
                        del self.busy[hostname]
                    return
        now = self.clock()
        late: list[Waiter] = []
        granted = None
        with self._lock:
            queue = self.queues.get(hostname)
            while queue:
                waiter = queue.popleft()
                if waiter.deadline <= now:
                    waiter.state = GONE
                    late.append(waiter)
                    continue
                waiter.state = GRANTED
                granted = waiter
                break
            if queue is not None and not queue:
                del self.queues[hostname]
            if granted is None:
                n = self.busy[hostname] - 1
                if n:
                    self.busy[hostname] = n
                else:
                    del self.busy[hostname]
        for waiter in late:  # outside the lock: a wake may take the driver's own lock
            waiter.wake()
        if granted is not None:
            self.events.waited(hostname, now - granted.since)
            granted.wake()

    def leave(self, waiter: Waiter) -> bool:
        """``waiter`` stops waiting (its time ran out, or its client left): True when it was
        granted a slot meanwhile (it owns it: use it, or ``release`` it)."""
        with self._lock:
            if waiter.state is WAITING:
                waiter.state = GONE
                queue = self.queues[waiter.hostname]
                queue.remove(waiter)
                if not queue:
                    del self.queues[waiter.hostname]
        return waiter.state is GRANTED

    def left(self, waiter: Waiter) -> float:
        """Seconds ``waiter`` may still wait."""
        return max(0.0, waiter.deadline - self.clock())

    def timed_out(self, hostname: str) -> AtLimit:
        self.events.refused(hostname, "timeout")
        return AtLimit(hostname, f"no slot within {self.timeout:g}s", self.retry_after)

    def full(self, hostname: str) -> AtLimit:
        return AtLimit(hostname, f"{self.maxconn} in flight, {self.queue_size} waiting",
                       self.retry_after)

    def load(self) -> dict[str, tuple[int, int]]:
        """In flight and waiting per replica now (for status pages)."""
        with self._lock:
            return {h: (n, len(self.queues.get(h, ()))) for h, n in self.busy.items()}
