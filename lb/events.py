"""What the balancer's router and the supervisor report, as interfaces whose default ignores it.

The processes call these; metrics and logs subscribe by subclassing (``lb.ops.metrics`` for the
router, ``supervisor.metrics`` for the supervisor). Here, apart from both, so a subscriber needs
neither the HTTP app nor the supervisor.
"""

from __future__ import annotations

from lb.registry import Replica


class RouterEvents:
    """What the router reports (metrics and logs subscribe here); the default ignores it."""

    def forwarded(self, replica: Replica, status: int, seconds: float, attempt: int) -> None:
        """A replica answered (any status) after ``seconds``; ``attempt`` 0 is the first try."""

    def unreachable(self, replica: Replica, error: BaseException) -> None:
        """A replica could not be reached; the next candidate gets the request."""

    def exhausted(self, tried: list[str]) -> None:
        """No candidate could serve the request."""

    def hedged(self, replica: Replica) -> None:
        """A try had no answer in time: ``replica``, the next candidate, gets it too."""

    def hedge_won(self, replica: Replica) -> None:
        """``replica``'s hedged try answered before the try it hedged."""

    def hedge_refused(self) -> None:
        """A try had no answer in time, but the hedging budget was spent (LB_HEDGE_SHARE)."""

    def ejected(self, hostname: str, seconds: float) -> None:
        """This worker ejected ``hostname`` from routing for ``seconds`` (``lb.ejections``)."""

    def returned(self, hostname: str) -> None:
        """An ejection of ``hostname`` ended (its time was up, or it left the replica set)."""

    def queued(self, hostname: str) -> None:
        """A request waits for a slot at ``hostname`` (``lb.limits``: at LB_REPLICA_MAXCONN)."""

    def waited(self, hostname: str, seconds: float) -> None:
        """A request queued for ``hostname`` got its slot after ``seconds``."""

    def refused(self, hostname: str, why: str) -> None:
        """A request got no slot at ``hostname`` (``why``: full, timeout) and is answered 503."""


class SupervisorEvents:
    """What the supervisor reports (metrics subscribe here); the default ignores it."""

    def heartbeat_missed(self, replica: Replica) -> None:
        """``replica`` did not answer a heartbeat (or its process is gone)."""

    def heartbeat_forgiven(self, replica: Replica) -> None:
        """``replica``'s heartbeat was late, but balancer workers got answers from it since
        the last round (``lb.evidence``): not a miss."""

    def marked_down(self, replica: Replica, reason: str) -> None:
        """``replica`` is down: ``process_gone``, ``missed_heartbeats`` or ``never_ready``."""

    def replacing(self, replica: Replica) -> None:
        """A down replica's replacement (same server id, new hostname) is about to start."""

    def became_ready(self, replica: Replica) -> None:
        """``replica`` answered its first heartbeat."""

    def start_failed(self, hostname: str) -> None:
        """The backend could not start ``hostname``."""

    def ticked(self) -> None:
        """One round of the reconcile loop is done."""
