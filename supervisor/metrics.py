"""The supervisor's metrics: a ``SupervisorEvents`` subscriber writing Prometheus counters.

The supervisor is its own process (it loads the counters' helpers from ``lb.ops.metrics``, which
needs no HTTP library); with ``PROMETHEUS_MULTIPROC_DIR`` set (``lb-run`` sets it) its
files sit beside the balancer workers' and every scrape of /_lb/metrics includes them.
"""

from __future__ import annotations

import os
import time

from lb.events import SupervisorEvents
from lb.ops.metrics import available, multiprocess_dir
from lb.registry import Replica

# Seconds from the decision to replace a replica to its replacement's first answered heartbeat.
REPLACEMENT_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class SupervisorMetrics(SupervisorEvents):
    def __init__(self) -> None:
        self.enabled = available()
        self._pending: dict[int, float] = {}  # server id -> when its replacement was decided
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram, values

        if multiprocess_dir():
            # Files named after "supervisor-<pid>", not the bare pid: in containers (balancer
            # and supervisor sharing the folder on a volume) the pids of the two may collide.
            values.ValueClass = values.MultiProcessValue(lambda: f"supervisor-{os.getpid()}")
        reg = CollectorRegistry(auto_describe=True)
        self._missed = Counter("lb_heartbeat_failures", "Heartbeats a replica did not answer in "
                               "time, by replica and the state it was in", ["replica", "state"],
                               registry=reg)
        self._forgiven = Counter("lb_heartbeats_late_but_serving", "Heartbeats a ready "
                                 "replica answered late while balancer workers got answers "
                                 "from it: not counted as missed", ["replica"], registry=reg)
        self._down = Counter("lb_replicas_marked_down", "Replicas the supervisor declared down, "
                             "by reason (process_gone, missed_heartbeats, never_ready)",
                             ["reason"], registry=reg)
        self._replacements = Counter("lb_replacements", "Replacements started for replicas that "
                                     "were down (same server id and slots, new hostname)",
                                     registry=reg)
        self._duration = Histogram("lb_replacement_duration_seconds", "From the decision to "
                                   "replace a replica to its replacement's first answered "
                                   "heartbeat", buckets=REPLACEMENT_BUCKETS, registry=reg)
        self._start_failures = Counter("lb_replica_start_failures", "Replica starts the backend "
                                       "could not carry out", registry=reg)
        self._ticks = Counter("lb_supervisor_ticks", "Rounds of the supervisor's reconcile loop",
                              registry=reg)

    def heartbeat_missed(self, replica: Replica) -> None:
        if self.enabled:
            self._missed.labels(replica.hostname, replica.state).inc()

    def heartbeat_forgiven(self, replica: Replica) -> None:
        if self.enabled:
            self._forgiven.labels(replica.hostname).inc()

    def marked_down(self, replica: Replica, reason: str) -> None:
        if self.enabled:
            self._down.labels(reason).inc()

    def replacing(self, replica: Replica) -> None:
        if self.enabled:
            self._replacements.inc()
        # A replacement that has to be tried again still counts from the first decision.
        self._pending.setdefault(replica.server_id, time.monotonic())

    def became_ready(self, replica: Replica) -> None:
        began = self._pending.pop(replica.server_id, None)
        if self.enabled and began is not None:
            self._duration.observe(time.monotonic() - began)

    def start_failed(self, hostname: str) -> None:
        if self.enabled:
            self._start_failures.inc()

    def ticked(self) -> None:
        if self.enabled:
            self._ticks.inc()
