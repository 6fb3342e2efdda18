"""Prometheus metrics of the balancer's workers and of the supervisor, served at /_lb/metrics.

gunicorn runs several worker processes and the supervisor is another process, so counters live
in prometheus-client's *multiprocess mode*: every process writes its own memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` (``lb-run`` makes one per deployment beside the registry and empties
it at start) and a scrape, whichever worker answers it, adds up the files of every process.
Without that variable (a bare ``create_app()`` in tests) each process counts for itself.

Figures about the replica set (desired, ready, down, weights, shares of the ring, slow start's
ramps, the hash map's parameters) are not counted anywhere: a collector reads them from the registry at scrape time.

prometheus-client is the optional ``ops`` extra: without it everything here is a no-op and
/_lb/metrics answers 503.
"""

from __future__ import annotations

import bisect
import glob
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from lb.events import RouterEvents
from lb.ops.status import key_space
from lb.registry import Registry, RegistryError, Replica, ReplicaState, State
from lb.settings import Settings
from lb.strategies import Lookup

if TYPE_CHECKING:
    from lb.stores import Store

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError:  # pragma: no cover - the "ops" extra is not installed
    prometheus_client = None  # type: ignore[assignment]

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKET_BOUNDS = (*LATENCY_BUCKETS, float("inf"))  # a histogram's buckets, +Inf included
CHILDREN_KEPT = 4096  # labelled series a worker keeps at hand


def available() -> bool:
    return prometheus_client is not None


def multiprocess_dir() -> str | None:
    """The shared folder of this process's metrics, when it runs in multiprocess mode; created
    if missing (a container given the variable but not the folder still starts)."""
    folder = os.environ.get(ENV_DIR) or None
    if folder:
        os.makedirs(folder, exist_ok=True)
    return folder


def prepare_multiprocess_dir(registry_path: str) -> str:
    """``<registry folder>/metrics``, created and emptied of an earlier run's files.

    Only ``*.db`` files are removed: the folder is ours, but a person may have pointed it
    somewhere unexpected, and nothing else in it is ours to delete.
    """
    folder = os.path.join(os.path.dirname(os.path.abspath(registry_path)), "metrics")
    os.makedirs(folder, exist_ok=True)
    for path in glob.glob(os.path.join(folder, "*.db")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return folder


def mark_process_dead(pid: int) -> None:
    """gunicorn's ``child_exit``: drop a dead worker's live gauges (counters stay counted)."""
    if prometheus_client is not None and multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class BalancerMetrics(RouterEvents):
    """The worker's counters; it is also the router's ``RouterEvents`` subscriber.

    Each count is written at once: in multiprocess mode that takes a lock and packs a float
    into a memory map, several times per request. The event-driven worker's loop counts
    through ``batched()`` instead (``LoopCounts``), the threads around it (the Flask pool)
    here.
    """

    def __init__(self) -> None:
        self.enabled = available()
        self.multiprocess = self.enabled and multiprocess_dir() is not None
        self._children: dict[tuple[object, ...], Any] = {}
        if not self.enabled:
            return
        # In multiprocess mode the files are the registry; a private one avoids duplicate
        # registration when a process builds more than one app (tests).
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._routed = Counter("lb_routed_requests", "Requests a replica answered, by replica "
                               "hostname and the status code it answered with",
                               ["replica", "code"], registry=reg)
        self._latency = Histogram("lb_upstream_latency_seconds", "Time a replica took to "
                                  "answer a routed request (connect to last byte)", ["replica"],
                                  buckets=LATENCY_BUCKETS, registry=reg)
        self._unreachable = Counter("lb_upstream_unreachable", "Attempts that could not reach "
                                    "a replica (refused, reset, timed out)", ["replica"],
                                    registry=reg)
        self._retries = Counter("lb_retries", "Requests passed on to a further replica "
                                "clockwise after one could not be reached", registry=reg)
        self._exhausted = Counter("lb_exhausted", "Requests that no replica could serve (502)",
                                  registry=reg)
        self._ejections = Counter("lb_replica_ejections", "Times a balancer worker ejected a "
                                  "replica from routing after failures in a row (passive "
                                  "health)", ["replica"], registry=reg)
        self._hedges = Counter("lb_hedges", "Routed requests sent to a further replica too "
                               "after no answer within the hedge deadline", registry=reg)
        self._hedges_won = Counter("lb_hedges_won", "Hedged requests the further replica "
                                   "answered first", registry=reg)
        self._hedges_refused = Counter("lb_hedges_refused", "Hedges not sent: the budget "
                                       "(LB_HEDGE_SHARE) was spent", registry=reg)
        # Per process, added up over the live ones: a dead worker's ejections are gone too.
        self._ejected = Gauge("lb_replica_ejected", "Balancer workers that route around a "
                              "replica now (ejected)", ["replica"], registry=reg,
                              multiprocess_mode="livesum")
        # Per-replica limits (lb.limits): the slow path only, written at once.
        self._queued = Counter("lb_queued_requests", "Requests that waited for a slot at a "
                               "replica at its LB_REPLICA_MAXCONN", ["replica"], registry=reg)
        self._queue_wait = Histogram("lb_queue_wait_seconds", "Time a queued request waited "
                                     "for its slot (those that got one)", ["replica"],
                                     buckets=LATENCY_BUCKETS, registry=reg)
        self._refused = Counter("lb_limit_refusals", "Requests answered 503 for want of a slot: "
                                "the queue was full, or LB_QUEUE_TIMEOUT ran out",
                                ["replica", "reason"], registry=reg)
        self._responses = Counter("lb_responses", "Replies of the balancer, by endpoint (rep, "
                                  "add, rm, route, ops.*, none) and status code",
                                  ["endpoint", "code"], registry=reg)

    def batched(self) -> LoopCounts:
        """Counts for one thread (an event loop) to add up and write with ``flush()``."""
        return LoopCounts(self) if self.enabled else LoopCounts(None)

    # -- RouterEvents --------------------------------------------------------------------------
    def forwarded(self, replica: Replica, status: int, seconds: float, attempt: int) -> None:
        if not self.enabled:
            return
        self._child(self._routed, replica.hostname, status).inc()
        self._child(self._latency, replica.hostname).observe(seconds)
        if attempt:
            self._retries.inc(attempt)

    def unreachable(self, replica: Replica, error: BaseException) -> None:
        if self.enabled:
            self._unreachable.labels(replica.hostname).inc()

    def exhausted(self, tried: list[str]) -> None:
        if not self.enabled:
            return
        self._exhausted.inc()
        if len(tried) > 1:
            self._retries.inc(len(tried) - 1)

    def hedged(self, replica: Replica) -> None:
        if self.enabled:  # a few per cent of requests at most (the budget): written at once
            self._hedges.inc()

    def hedge_won(self, replica: Replica) -> None:
        if self.enabled:
            self._hedges_won.inc()

    def hedge_refused(self) -> None:
        if self.enabled:
            self._hedges_refused.inc()

    def ejected(self, hostname: str, seconds: float) -> None:
        if self.enabled:  # rare, from any thread: written at once (the metrics lock)
            self._ejections.labels(hostname).inc()
            self._ejected.labels(hostname).set(1)

    def returned(self, hostname: str) -> None:
        if self.enabled:
            self._ejected.labels(hostname).set(0)

    def queued(self, hostname: str) -> None:
        if self.enabled:
            self._queued.labels(hostname).inc()

    def waited(self, hostname: str, seconds: float) -> None:
        if self.enabled:
            self._queue_wait.labels(hostname).observe(seconds)

    def refused(self, hostname: str, why: str) -> None:
        if self.enabled:
            self._refused.labels(hostname, why).inc()

    # -- the balancer's replies ----------------------------------------------------------------
    def response(self, endpoint: str, status: int) -> None:
        if self.enabled:
            self._child(self._responses, endpoint, status).inc()

    def _child(self, metric: Any, *labels: object) -> Any:
        """``metric.labels(*labels)``, remembered: it is on every routed request's path, and
        ``labels()`` builds and validates the label tuple each time."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > CHILDREN_KEPT:  # hostnames churn with replacements
                self._children.clear()
            child = self._children[key] = metric.labels(*(str(v) for v in labels))
        return child

    # -- reading -------------------------------------------------------------------------------
    def families(self) -> Iterable[Metric]:
        """What this process (or, in multiprocess mode, every process) has counted."""
        if not self.enabled:
            return []
        if self.multiprocess:
            return MultiProcessCollector(None).collect()
        return self.registry.collect()

    def exposition(self, registry: Store, settings: Settings,
                   facts: dict[str, Any] | None, lookup: Callable[[State], Lookup]) -> bytes:
        """The Prometheus text of everything: counted figures plus the registry's.
        ``lookup``: the router's lookup for a state (``blueprint.routing_lookup``)."""
        if not self.enabled:
            raise RuntimeError("prometheus-client is not installed")
        out = CollectorRegistry(auto_describe=False)
        if self.multiprocess:
            MultiProcessCollector(out)
        else:
            out.register(_Families(self.registry))
        out.register(ReplicaSetCollector(registry, self.multiprocess, settings, facts, lookup))
        return prometheus_client.generate_latest(out)


class LoopCounts(RouterEvents):
    """What one event loop counts (every routed request: a reply, a replica's answer and its
    latency), added up in plain dicts and written to the ``BalancerMetrics`` by ``flush()``,
    which the loop calls ten times a second. Only that loop's thread may use it: nothing here
    takes a lock. Without prometheus-client (``metrics`` None) it counts nothing.
    """

    def __init__(self, metrics: BalancerMetrics | None) -> None:
        self.metrics = metrics
        self._counts: dict[tuple[Any, ...], float] = {}  # (metric, *labels) -> to add
        self._latencies: dict[str, list[float]] = {}  # replica -> [sum, bucket counts...]

    def forwarded(self, replica: Replica, status: int, seconds: float, attempt: int) -> None:
        if self.metrics is None:
            return
        counts, hostname = self._counts, replica.hostname
        key = (self.metrics._routed, hostname, status)
        counts[key] = counts.get(key, 0) + 1
        latency = self._latencies.get(hostname)
        if latency is None:
            latency = self._latencies[hostname] = [0.0] * (len(BUCKET_BOUNDS) + 1)
        latency[0] += seconds
        latency[1 + bisect.bisect_left(BUCKET_BOUNDS, seconds)] += 1
        if attempt:
            retries = (self.metrics._retries,)
            counts[retries] = counts.get(retries, 0) + attempt

    def unreachable(self, replica: Replica, error: BaseException) -> None:
        if self.metrics is not None:  # rare: written at once
            self.metrics.unreachable(replica, error)

    def exhausted(self, tried: list[str]) -> None:
        if self.metrics is not None:
            self.metrics.exhausted(tried)

    def hedged(self, replica: Replica) -> None:
        if self.metrics is not None:  # bounded by LB_HEDGE_SHARE: written at once
            self.metrics.hedged(replica)

    def hedge_won(self, replica: Replica) -> None:
        if self.metrics is not None:
            self.metrics.hedge_won(replica)

    def hedge_refused(self) -> None:
        if self.metrics is not None:
            self.metrics.hedge_refused()

    def response(self, endpoint: str, status: int) -> None:
        if self.metrics is None:
            return
        key = (self.metrics._responses, endpoint, status)
        self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self) -> None:
        """Write what was counted since the last flush."""
        metrics = self.metrics
        if metrics is None:
            return
        counts, self._counts = self._counts, {}
        for (metric, *labels), n in counts.items():
            (metrics._child(metric, *labels) if labels else metric).inc(n)
        latencies, self._latencies = self._latencies, {}
        for hostname, (total, *buckets) in latencies.items():
            child = metrics._child(metrics._latency, hostname)
            # What Histogram.observe() does per value, per bucket (prometheus-client 0.26,
            # pinned; tests/test_ops.py checks both ways give the same exposition).
            child._sum.inc(total)
            for i, n in enumerate(buckets):
                if n:
                    child._buckets[i].inc(n)


class _Families:
    """A collector that yields another registry's metrics (single-process mode)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()


class ReplicaSetCollector:
    """Gauges read from the registry at scrape time: they are facts about the state, not
    events, so the workers need not agree on them."""

    def __init__(self, registry: Store, multiprocess: bool, settings: Settings,
                 facts: dict[str, Any] | None, lookup: Callable[[State], Lookup]) -> None:
        self.registry = registry
        self.multiprocess = multiprocess
        self.settings = settings
        self.facts = facts  # blueprint.registry_facts: what this worker applied
        self.lookup = lookup  # the router's for a state, ramps included

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("lb_registry_up", "1 when the registry could be read")
        mode = GaugeMetricFamily("lb_metrics_multiprocess", "1 when counters add up every "
                                 "process of the deployment (PROMETHEUS_MULTIPROC_DIR is set)")
        mode.add_metric([], 1.0 if self.multiprocess else 0.0)
        yield mode
        try:
            state = self.registry.read()
        except RegistryError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        version = GaugeMetricFamily("lb_registry_version", "Writes the registry has seen")
        version.add_metric([], float(state.version))
        yield version
        yield from self._applied()
        stamp = self.registry.stamp() if isinstance(self.registry, Registry) else None
        if stamp is not None:
            # The supervisor rewrites it every heartbeat round while a replica is ready: a
            # growing age means nobody records what happens to the replicas.
            age = GaugeMetricFamily("lb_registry_age_seconds", "Seconds since the registry "
                                    "was last written")
            age.add_metric([], max(0.0, time.time() - stamp[1] / 1e9))
            yield age
        desired = GaugeMetricFamily("lb_replicas_desired", "Replicas wanted (N of /rep)")
        desired.add_metric([], float(len(state.members())))
        yield desired
        by_state = GaugeMetricFamily("lb_replicas", "Registry entries by state", labels=["state"])
        for name in ReplicaState:
            by_state.add_metric([name], float(sum(r.state == name for r in state.replicas)))
        yield by_state
        yield from self._key_space(state)
        missed = GaugeMetricFamily("lb_replica_heartbeat_failures", "Consecutive heartbeats a "
                                   "replica has missed", labels=["replica"])
        age = GaugeMetricFamily("lb_replica_heartbeat_age_seconds", "Seconds since a replica's "
                                "last answered heartbeat", labels=["replica"])
        now = time.time()
        for r in state.members():
            missed.add_metric([r.hostname], float(r.failures))
            if r.last_heartbeat is not None:
                age.add_metric([r.hostname], max(0.0, now - r.last_heartbeat))
        yield missed
        yield age
        ring = state.ring
        info = GaugeMetricFamily("lb_hash_map_info", "The hash map: hash (a preset name, "
                                 "formulas or a plug-in), probing, M slots, K virtual servers "
                                 "per replica, and the strategy that routes (value always 1)",
                                 labels=["preset", "probing", "slots", "virtual", "strategy"])
        info.add_metric([ring.hash, ring.probing, str(ring.slots), str(ring.virtual),
                         self.settings.strategy], 1.0)
        yield info
        slots = GaugeMetricFamily("lb_hash_map_slots", "Slots in the hash map (M)")
        slots.add_metric([], float(ring.slots))
        yield slots
        virtual = GaugeMetricFamily("lb_hash_map_virtual_per_server", "Virtual servers per "
                                    "replica (K)")
        virtual.add_metric([], float(ring.virtual))
        yield virtual


    def _key_space(self, state: State) -> Iterator[Metric]:
        """Weights, and shares and ramps as the router has them now: the lookup it routes
        with, through the interface (``status.key_space``) the status page reads too."""
        weight = GaugeMetricFamily("lb_replica_weight", "A replica's weight: its share of the "
                                   "keys relative to the others' (0: drained)",
                                   labels=["replica", "server_id"])
        for r in state.members():
            weight.add_metric([r.hostname, str(r.server_id)], float(r.weight))
        yield weight
        space = key_space(self.lookup(state))
        share = GaugeMetricFamily("lb_replica_share", "Fraction of the routing strategy's "
                                  "key space (ring slots or Maglev table entries) a routable "
                                  "replica answers for now (less while slow start ramps it "
                                  "up)", labels=["replica", "server_id"])
        ramp = GaugeMetricFamily("lb_replica_ramp", "How far a replica's slow start has gone "
                                 "(0..1; only replicas that ramp up now)", labels=["replica"])
        for r in state.routable():
            share.add_metric([r.hostname, str(r.server_id)], space.shares.get(r.server_id, 0.0))
            if r.server_id in space.ramps:
                ramp.add_metric([r.hostname], space.ramps[r.server_id])
        yield share
        yield ramp

    def _applied(self) -> Iterator[Metric]:
        """Which store, the revision this worker routes from, who leads, how old the last
        change applied is: the figures that show several balancers in step."""
        store = GaugeMetricFamily("lb_registry_info", "The registry's store (value always 1)",
                                  labels=["store"])
        store.add_metric([self.registry.kind], 1.0)
        yield store
        if self.facts is None:
            return
        revision = GaugeMetricFamily("lb_registry_revision", "The registry revision this "
                                     "worker has applied (etcd: the state key's revision)")
        revision.add_metric([], float(self.facts["revision"]))
        yield revision
        if self.facts["change_age"] is not None:
            change = GaugeMetricFamily("lb_registry_change_age_seconds", "Seconds since this "
                                       "worker applied the last change of the registry")
            change.add_metric([], float(self.facts["change_age"]))
            yield change
        if self.registry.kind == "etcd":
            leader = GaugeMetricFamily("lb_supervisor_leader", "1 for the supervisor that "
                                       "leads (etcd), none while no supervisor leads",
                                       labels=["leader"])
            if self.facts["leader"]:
                leader.add_metric([self.facts["leader"]], 1.0)
            yield leader


def sample_sums(families: Iterable[Metric], name: str, by: str,
                where: Callable[[dict[str, str]], bool] | None = None) -> dict[str, float]:
    """Sum the samples called ``name`` (whose labels pass ``where``) by their label ``by``."""
    sums: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            if s.name == name and (where is None or where(s.labels)):
                key = s.labels.get(by, "")
                sums[key] = sums.get(key, 0.0) + s.value
    return sums
