"""Hedged GETs: when a try has no answer within a deadline, the next candidate gets it too.

A replica that hangs (SIGSTOP'd, deadlocked) accepts connections and answers nothing; without
hedging a request sent to it waits until the supervisor notices (about 1.3 s) or
``LB_UPSTREAM_TIMEOUT``. With it, a GET or HEAD (the only routed methods, safe to repeat) not
answered within the *hedge deadline* goes to the walk's next candidate as well, and the first
answer wins (``RingWalk.hedge``; the drivers close the loser's connection). The rules, here,
with no I/O and no clock, so ``tests/test_hedging.py`` drives them without sleeping:

- *The deadline* (``Hedging.after``): ``LB_HEDGE_AFTER`` when it is > 0; else derived from the
  worker's recent answers: the 99th percentile of the last ``WINDOW`` answer-head latencies of
  single tries (a try's send to its answer's head), at least ``FLOOR``, at most
  ``LB_UPSTREAM_TIMEOUT``. Until ``MIN_SAMPLES`` answers are in, ``COLD`` stands in for it.
  The floor keeps a loaded but healthy set from being hedged for ordinary jitter (a shared
  2-core machine pauses a process for 10-30 ms now and then); p99 hedges about 1 % of the
  requests of a healthy set.
- *The budget* (``Hedging.allow``): a token bucket. Every answered request adds
  ``LB_HEDGE_SHARE`` tokens, at most ``BURST``; a hedge takes one. So at most that share of
  requests is hedged over time (hedging cannot double the load on a struggling set), while a
  sudden hang can be hedged at once. Once a replica is a suspect or ejected
  (``Router.failing``), the other requests in flight to it are hedged without a token
  (``RingWalk.hedge``): they move off a replica known to be failing, and with 32 clients on
  one hung replica they outnumber any small burst.
- *The loser.* ``SUSPECT_AFTER`` tries at a replica in a row overtaken by paid hedges make it a
  suspect (routed to last for a second): one slow answer of a healthy replica must not move
  its keys, a hang's requests (all overtaken, none answered) must. A lost try does not count
  towards ejection: measured at saturation on a loaded machine, a healthy replica's pause
  had 10 in-flight tries overtaken at once, and ejected it for 10 s; a hang is the
  supervisor's to replace within ~1.3 s, and meanwhile costs a request the deadline once a
  second. A hedge that lost counts for nothing.

Per worker, like ejections; the counts are not locked: the threads worker's races on a float
lose a token or an observation now and then, never more.
"""

from __future__ import annotations

FLOOR = 0.05  # seconds: the derived deadline is never shorter
COLD = 0.25  # seconds: the deadline until MIN_SAMPLES answers are in
WINDOW = 1024  # answers the percentile is taken over
MIN_SAMPLES = 50
EVERY = 64  # answers between two recomputations of the percentile
PERCENTILE = 0.99
BURST = 10.0  # hedges that may go out at once, before the share refills the bucket
# Tries at a replica overtaken by hedges in a row (no answer from it between) after which it
# is a suspect (routed to last for a second): a hung replica, not one slow answer.
SUSPECT_AFTER = 2


class Hedging:
    """One worker's hedge deadline and budget (``lb.settings``: hedge_after, hedge_share)."""

    __slots__ = ("_count", "_fixed", "_latencies", "_most", "_next", "after", "losses", "share",
                 "tokens")

    def __init__(self, after: float, share: float, most: float) -> None:
        self.share = share  # 0: no hedging
        self._fixed = after  # > 0: the deadline, whatever the latencies
        self._most = most  # the longest a derived deadline may be (LB_UPSTREAM_TIMEOUT)
        self.after = 0.0 if not share else after or min(COLD, most)  # 0: off
        self.tokens = BURST if share else 0.0
        self._latencies = [0.0] * WINDOW  # a ring of the last WINDOW (_count of them filled)
        self._next = 0  # where the next one goes in it
        self._count = 0  # answers observed
        self.losses: dict[str, int] = {}  # hostname -> tries overtaken in a row

    @property
    def on(self) -> bool:
        return self.share > 0

    def observe(self, seconds: float) -> None:
        """A single try's answer head came after ``seconds``: one more request for the budget,
        one more latency for the deadline."""
        # (on every request: no call that is not needed)
        tokens = self.tokens + self.share
        self.tokens = tokens if tokens < BURST else BURST  # noqa: FURB136
        if self._fixed:
            return
        self._latencies[self._next] = seconds
        self._next = (self._next + 1) % WINDOW
        count = self._count = self._count + 1
        if count % EVERY == 0 or count == MIN_SAMPLES:
            self.after = self.derived()

    def derived(self) -> float:
        """The deadline the latencies observed give (``COLD`` while there are too few)."""
        if self._count < MIN_SAMPLES:
            return min(COLD, self._most)
        ranked = sorted(self._latencies[:min(self._count, WINDOW)])
        high = ranked[min(len(ranked) - 1, int(PERCENTILE * len(ranked)))]
        return min(max(FLOOR, high), self._most)

    def overtaken(self, hostname: str) -> bool:
        """A try at ``hostname`` lost to its hedge; True when it is ``SUSPECT_AFTER`` in a row
        (an answer from it ends the row: ``RingWalk.told``)."""
        row = self.losses[hostname] = self.losses.get(hostname, 0) + 1
        if len(self.losses) > 1024:  # hostnames churn with replacements
            self.losses = {hostname: row}
        return row >= SUSPECT_AFTER

    def allow(self) -> bool:
        """A hedge may go out now (and takes its token), or the budget is spent."""
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
