"""Leases: the hold an ``/add``, an ``/rm`` or the supervisor puts on a registry entry.

A lease says who holds an entry (``holder``: an ``lb.owners`` tag naming the process, or
``"supervisor"``), what for (``purpose``, the holder's first word) and until when (``until``,
Unix time). Its rules:

- While a lease runs, the entry is *held*: the supervisor neither starts it nor finishes its
  removal, nor stops a replica of its name as an orphan; an entry an ``/add`` holds is not
  probed either, and no ``/rm`` may take it.
- A holder finds its entries by its holder, also after its lease ran out: it commits or rolls
  back only what nobody has taken from it since.
- When the holder's process is known to be gone (``holder_gone``), the supervisor releases the
  lease at once and finishes the call; where that cannot be known, ``until`` decides.
- A started replica that has not answered its heartbeat when its lease ends failed to start.
- An ``/add`` that hands its replicas to the supervisor (the etcd registry: ``WANT``) commits
  them by ending its lease; one whose lease ran out uncommitted added nothing, and the
  supervisor removes its entries.

In the registry file a lease is an entry's ``owner`` (the holder) and ``deadline`` (until).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from enum import StrEnum

from lb.backends.base import STOP_TIMEOUT
from lb.owners import owner_alive, owner_tag


class Purpose(StrEnum):
    ADD = "add"  # an /add starting new replicas
    WANT = "want"  # an /add waiting for the leading supervisor to start them (etcd registry)
    RM = "rm"  # an /rm stopping replicas
    SUPERVISOR = "supervisor"  # the supervisor (re)starting a replica, until it answers


# The supervisor's holder. No process tag: a deployment has one supervisor, and one that starts
# takes back what an earlier one reserved and never started (``Supervisor.release_own_holds``).
SUPERVISOR_HOLDER = Purpose.SUPERVISOR.value

# How much longer an /add's or an /rm's lease runs than its own wait (start_timeout for the new
# replicas' heartbeats, STOP_TIMEOUT for a graceful stop): the backend's starts, and the final
# registry write, which may wait LB_LOCK_TIMEOUT (10 s by default) for the lock. Shorter, and
# the supervisor could take over a call still under way; longer only delays the take-over of a
# call whose holder died where the supervisor cannot see it (another host or pid namespace).
CALL_MARGIN = 10.0


@dataclass(frozen=True)
class Lease:
    holder: str
    until: float

    @classmethod
    def take(cls, purpose: Purpose, start_timeout: float, now: float | None = None) -> Lease:
        """A new lease of this process for ``purpose``, running as long as that purpose needs
        (``term``) from ``now``. Each call of an ``/add`` or ``/rm`` is a holder of its own."""
        holder = SUPERVISOR_HOLDER if purpose is Purpose.SUPERVISOR else owner_tag(purpose)
        return cls(holder, (time.time() if now is None else now) + term(purpose, start_timeout))

    @property
    def purpose(self) -> Purpose:
        return Purpose(self.holder.partition(":")[0])

    def active(self, now: float) -> bool:
        return self.until > now

    def holder_gone(self) -> bool:
        """Whether the holder's process is known to have ended (False when it cannot be told)."""
        return owner_alive(self.holder) is False

    def released(self) -> Lease:
        """The same holder, no longer holding: the supervisor finishes what it began."""
        return dataclasses.replace(self, until=0.0)


def term(purpose: Purpose, start_timeout: float) -> float:
    """How long a lease for ``purpose`` runs, in seconds."""
    if purpose in (Purpose.ADD, Purpose.WANT):  # it waits start_timeout for their heartbeats
        return start_timeout + CALL_MARGIN
    if purpose is Purpose.RM:  # it lets each replica finish its requests, STOP_TIMEOUT at most
        return STOP_TIMEOUT + CALL_MARGIN
    return start_timeout  # the supervisor's start: the replica has that long to answer


def from_fields(owner: object, deadline: object) -> Lease | None:
    """The lease an entry's ``owner`` and ``deadline`` fields describe; ValueError if they
    describe none."""
    if owner is None and deadline is None:
        return None
    if owner is None:
        # Files written before the supervisor's wait for a started replica was a lease have a
        # deadline without an owner there.
        owner = SUPERVISOR_HOLDER
    if deadline is None:
        deadline = 0.0  # an owner without a deadline holds nothing
    if not (isinstance(owner, str) and owner.partition(":")[0] in set(Purpose)):
        raise ValueError("bad owner")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise ValueError("bad deadline")  # noqa: TRY004 - a ValueError names the bad field
    return Lease(owner, deadline)


def to_fields(lease: Lease | None) -> tuple[str | None, float | None]:
    """``(owner, deadline)`` for the registry file."""
    return (None, None) if lease is None else (lease.holder, lease.until)
