"""Every setting, declared once.

Each field of :class:`Settings` is one setting: its type, its default and its help text. The
environment variable is ``LB_`` + the upper-cased field name; ``lb-run --help`` and the README's
table are derived from the same declarations (``settings_table``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lb.hashring import PROBING, resolve_preset
from lb.strategies import STRATEGIES

PREFIX = "LB_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    # -- the balancer -----------------------------------------------------------------------
    host: str = _opt("127.0.0.1", "Address the balancer listens on")
    port: int = _opt(5000, "Port the balancer listens on")
    workers: int = _opt(2, "gunicorn worker processes of the balancer")
    threads: int = _opt(
        16, "Threads per balancer worker: with async, the pool that runs the Flask app (admin "
            "calls, /_lb/); with threads, the requests a worker serves at once")
    worker: str = _opt(
        "async", "Data path of the balancer's workers: async (an event loop; routed GETs never "
                 "enter Flask) or threads (gthread + Flask, the reference implementation)")
    # -- the hash map -----------------------------------------------------------------------
    n: int = _opt(3, "Replicas at start (N)")
    slots: int = _opt(512, "Slots in the consistent hash map (M)")
    virtual: int = _opt(0, "Virtual servers per replica (K); 0 means log2(M)")
    hash: str = _opt(
        "seed", "Hash functions H and Phi: a preset (seed, cs60002, xxhash), integer formulas "
                "'H=<of i>; Phi=<of i, j>' or a plug-in package.module:name "
                "(docs/hash-formulas.md)")
    probing: str = _opt("linear", "Slot conflict resolution: linear or quadratic")
    strategy: str = _opt("ring", "Lookup strategy: ring (the hash map above), ring160 (xxhash, 65536 slots, 160 virtual servers) or maglev")
    bounded_load: float = _opt(
        0.0, "Bounded loads: no replica gets more than c x its part (the mean, or its weight's "
             "share) of a worker's last 1024 requests; the overflow goes clockwise to replicas "
             "below theirs (c > 1, e.g. 1.25); 0 turns it off")
    slow_start: float = _opt(
        0.0, "Seconds over which a replica that joins (an /add, a replacement) takes its share: "
             "its keys move to it gradually, each once; 0 turns it off")
    hash_key: str = _opt(
        "random",
        "What is hashed: random (6-digit id per request), client (client address), "
        "header:NAME or query:NAME (falls back to random when absent)",
    )
    # -- replicas -----------------------------------------------------------------------------
    backend: str = _opt(
        "local", "Where replicas run: local (processes), docker (containers on one engine) or "
                 "swarm (services of a Docker Swarm, spread over its nodes)")
    deployment: str = _opt("hashlb", "Name of this deployment: labels/marks everything it starts")
    max_replicas: int = _opt(32, "Most replicas /add may bring the set to")
    start_timeout: float = _opt(20.0, "Seconds /add waits for new replicas' heartbeat")
    replica_threads: int = _opt(4, "Threads of each local replica's gunicorn worker")
    # -- routing ------------------------------------------------------------------------------
    connect_timeout: float = _opt(0.5, "Seconds to connect to a replica before trying the next; "
                                  "also how long its host may leave a request unacknowledged "
                                  "(at least 0.5 s: a node gone answers nothing)")
    upstream_timeout: float = _opt(
        5.0, "Seconds to wait for the first byte of a replica's answer once the request is "
             "sent (then 504, or the next replica while nothing of the answer has come)")
    read_timeout: float = _opt(
        5.0, "Seconds a replica may pause between two reads of an answer it has begun (then "
             "504, never retried)")
    max_reply: int = _opt(
        0, "Largest answer body passed back from a replica, in bytes (502 past it, or the "
           "connection cut once the answer has begun); 0: no limit (answers stream through "
           "bounded buffers whatever their size)")
    max_clients: int = _opt(
        0, "Client connections one balancer worker holds at once (threads: gunicorn's "
           "worker_connections); 0 derives it from the descriptor limit (RLIMIT_NOFILE), "
           "keeping the rest for replica connections, the registry and logs. Past it, new "
           "connections wait in the listen backlog")
    retries: int = _opt(
        2, "Further replicas tried (clockwise, other failure domains first) when one cannot be "
           "reached")
    eject_after: int = _opt(
        5, "Failures in a row (5xx answers, no answer) after which a balancer worker ejects a "
           "replica from routing, its keys going clockwise meanwhile; 0 turns it off")
    eject_seconds: float = _opt(
        10.0, "Seconds of a replica's first ejection; each repeat lasts as much longer (at "
              "most 300 s)")
    eject_max_share: float = _opt(
        0.5, "Most of the routable replicas ejected at once, as a share (never the last one); "
             "past it, failing replicas stay in routing")
    replica_maxconn: int = _opt(
        8, "Requests one balancer worker has in flight to one replica at most (HAProxy's "
        "maxconn, per worker); more wait in its queue; 0: no limit")
    queue_size: int = _opt(
        128, "Requests one balancer worker queues per replica at its LB_REPLICA_MAXCONN, first "
        "come first served; past it a 503 with Retry-After at once")
    queue_timeout: float = _opt(
        2.0, "Seconds a queued request may wait for a slot at its replica; then a 503 with "
        "Retry-After")
    hedge_after: float = _opt(
        0.0, "Seconds a routed GET or HEAD waits for a replica's answer before the next "
             "candidate gets it too (the first answer wins); 0 derives it: the p99 of the "
             "worker's recent answers, at least 0.05")
    hedge_share: float = _opt(
        0.05, "Most of the routed requests hedged, as a share (a token bucket, bursts of 10); "
              "0 turns hedging off")
    max_body: int = _opt(65536, "Largest admin request body, in bytes")
    client_timeout: float = _opt(
        30.0, "Seconds a client may leave the balancer waiting for the rest of its request "
              "(headers, body) or for it to take the reply; then the connection is dropped")
    admin_token: str = _opt("", "When set, /add, /rm and POST /weight need 'Authorization: Bearer <token>'")
    tls_cert: str = _opt(
        "", "PEM certificate chain for HTTPS (docs/tls.md); empty: plain HTTP only")
    tls_key: str = _opt("", "PEM private key of LB_TLS_CERT; empty: it is in LB_TLS_CERT's file")
    tls_port: int = _opt(
        0, "With LB_TLS_CERT: 0 serves HTTPS only, on LB_PORT; another port serves HTTPS there "
           "and plain HTTP stays on LB_PORT")
    # -- the supervisor -----------------------------------------------------------------------
    heartbeat_interval: float = _opt(0.5, "Seconds between heartbeat rounds")
    heartbeat_timeout: float = _opt(0.5, "Seconds a heartbeat may take")
    heartbeat_failures: int = _opt(2, "Missed heartbeats before a replica is declared down")
    late_heartbeats: str = _opt(
        "forgive", "A ready replica's heartbeat that timed out: forgive (not a miss while "
        "balancer workers get answers from it, counted through the registry) or count (a miss); "
        "refused ones and processes gone always count")
    restart_backoff: float = _opt(30.0, "Longest wait between restarts of a replica that fails")
    # -- shared state -------------------------------------------------------------------------
    registry: str = _opt(
        "", "Where replica state is shared: a JSON file (empty: <tmp>/<deployment>/registry."
            "json), or etcd://host:port,host:port/prefix for several balancers and "
            "supervisors on several hosts (prefix default /hashlb/<deployment>)")
    lock_timeout: float = _opt(10.0, "Seconds to wait for the registry lock (etcd: for the "
                                     "cluster to answer a write)")
    leader_ttl: int = _opt(
        3, "Seconds of the leading supervisor's etcd lease (etcd registry): a standby leads "
           "this long after the leader is gone")
    # -- docker and swarm backends ------------------------------------------------------------
    image: str = _opt("hashlb-server:latest", "Replica image (docker and swarm backends)")
    network: str = _opt(
        "net1", "Docker network the replicas join (docker: a bridge; swarm: an attachable "
                "overlay network)")
    replica_memory: str = _opt("256m", "Memory limit of each replica container (docker and swarm backends)")
    replica_cpus: float = _opt(0.5, "CPU limit of each replica container (docker and swarm backends)")
    docker_address: str = _opt(
        "auto", "How replicas are reached (docker backend): name (http://<hostname>:5000, "
                "inside the Docker network), ip (the container's address on it, from the host) "
                "or auto (name when this process runs in a container on that network, else ip)")
    swarm_address: str = _opt(
        "name", "How replicas are reached (swarm backend): name (http://<hostname>:5000, from a "
                "container on LB_NETWORK, as the stack's balancer and supervisor are) or "
                "published (each replica publishes port 5000 in host mode on a free port of its "
                "node, reached at the node's address: for a balancer outside the swarm)")
    swarm_constraints: str = _opt(
        "", "Placement constraints of the replicas (swarm backend), comma-separated, e.g. "
            "node.labels.role==replicas; empty: any node")
    log_level: str = _opt("info", "Log level: debug, info, warning, error")
    log_format: str = _opt(
        "text", "Log lines: text (for people) or json (one object per line, for log shippers)")

    # ------------------------------------------------------------------------------------------
    @property
    def virtual_per_server(self) -> int:
        return self.virtual or max(1, int(math.log2(self.slots)))

    @property
    def record_seconds(self) -> float:
        """The longest the supervisor leaves the registry unwritten while a replica is ready.

        A heartbeat answered is recorded when the replica's entry changes anyway, else once
        the last one on record is this old: every write makes each balancer worker read the
        file again, so writing every round (0.5 s) would cost the data path for nothing.
        """
        return max(2.0, 4 * self.heartbeat_interval)

    @property
    def stale_seconds(self) -> float:
        """A registry older than this, with a replica ready, has nobody recording it: the
        supervisor is not running or cannot write (readiness says so)."""
        return 2.5 * self.record_seconds  # max(5 s, 10 x LB_HEARTBEAT_INTERVAL)

    @property
    def etcd(self) -> EtcdAddress | None:
        """The etcd registry's address, or None for the file."""
        if not self.registry.startswith(ETCD_SCHEME):
            return None
        return EtcdAddress.parse(self.registry, self.deployment)

    @property
    def registry_path(self) -> str:
        """The registry file; with etcd, where this host keeps its own files (logs, metrics)
        beside it."""
        if self.registry and self.etcd is None:
            return os.path.abspath(self.registry)
        return os.path.join(tempfile.gettempdir(), self.deployment, "registry.json")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then ``LB_*`` variables, then explicit overrides (tests)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def to_env(self) -> dict[str, str]:
        """The settings as ``LB_*`` variables, to hand to child processes."""
        return {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self) -> None:

        checks = [
            (1 <= self.port <= 65535, "port must be 1..65535"),
            (0 <= self.tls_port <= 65535 and self.tls_port != self.port,
             "tls_port must be 0..65535 and not port"),
            (bool(self.tls_cert) or not (self.tls_key or self.tls_port),
             "tls_key and tls_port need tls_cert"),
            (self.workers >= 1 and self.threads >= 1, "workers and threads must be >= 1"),
            (self.worker in ("async", "threads"), "worker must be async or threads"),
            (self.n >= 0, "n must be >= 0"),
            (self.slots >= 2, "slots must be >= 2"),
            (self.virtual >= 0, "virtual must be >= 0"),
            (self.probing in PROBING, f"probing must be one of {', '.join(PROBING)}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (self.bounded_load == 0 or self.bounded_load > 1, "bounded_load must be 0 or > 1"),
            (_valid_hash_key(self.hash_key), "hash_key must be random, client, header:NAME or query:NAME"),
            (self.backend in ("local", "docker", "swarm"), "backend must be local, docker or swarm"),
            (self.swarm_address in ("name", "published"), "swarm_address must be name or published"),
            (self.docker_address in ("auto", "name", "ip"), "docker_address must be auto, name or ip"),
            (self.max_replicas >= 1, "max_replicas must be >= 1"),
            (self.n <= self.max_replicas, "n must not exceed max_replicas"),
            (self.n * self.virtual_per_server <= self.slots, "n * virtual must fit in slots"),
            (self.heartbeat_failures >= 1, "heartbeat_failures must be >= 1"),
            (self.retries >= 0, "retries must be >= 0"),
            (self.eject_after >= 0, "eject_after must be >= 0"),
            (0 <= self.eject_max_share <= 1, "eject_max_share must be 0..1"),
            (self.hedge_after >= 0, "hedge_after must be >= 0"),
            (0 <= self.hedge_share <= 1, "hedge_share must be 0..1"),
            (self.slow_start >= 0, "slow_start must be >= 0"),
            (self.max_reply >= 0 and self.max_clients >= 0,
             "max_reply and max_clients must be >= 0"),
            (self.replica_maxconn >= 0 and self.queue_size >= 0,
             "replica_maxconn and queue_size must be >= 0"),
            (self.log_format in ("text", "json"), "log_format must be text or json"),
            (self.late_heartbeats in ("forgive", "count"),
             "late_heartbeats must be forgive or count"),
            (min(self.heartbeat_interval, self.heartbeat_timeout, self.start_timeout,
                 self.connect_timeout, self.upstream_timeout, self.read_timeout,
                 self.lock_timeout, self.eject_seconds, self.queue_timeout,
                 self.client_timeout) > 0,
             "timeouts and intervals must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        try:
            self.etcd  # noqa: B018 - parsed for its errors
        except ValueError as exc:
            raise SettingsError(f"registry {self.registry!r}: {exc}") from None
        if self.leader_ttl < 2:
            raise SettingsError("leader_ttl must be >= 2 (etcd's shortest lease)")
        try:  # last: formulas are checked over j < K, so K must be valid first
            resolve_preset(self.hash, self.virtual_per_server)
        except ValueError as exc:  # a formula refused, a plug-in that cannot be loaded
            raise SettingsError(str(exc)) from None


ETCD_SCHEME = "etcd://"
ETCD_PORT = 2379


@dataclass(frozen=True)
class EtcdAddress:
    """``etcd://host:port,host:port/prefix``: the members and the prefix of the keys."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str

    @classmethod
    def parse(cls, url: str, deployment: str = "hashlb") -> EtcdAddress:
        """ValueError saying what is wrong with ``url``."""
        if not url.startswith(ETCD_SCHEME):
            raise ValueError(f"not an {ETCD_SCHEME} address")
        hosts, slash, prefix = url[len(ETCD_SCHEME):].partition("/")
        endpoints = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon:
                host, port = item.strip(), str(ETCD_PORT)
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad member {item.strip()!r} (use host:port)")
            endpoints.append((host.strip("[]"), int(port)))
        prefix = prefix.strip("/") if slash else ""
        return cls(tuple(endpoints), "/" + (prefix or f"hashlb/{deployment}"))

    def __str__(self) -> str:
        return ETCD_SCHEME + ",".join(f"{h}:{p}" for h, p in self.endpoints) + self.prefix


def graceful_drain(graceful_timeout: float) -> float:
    """How long a balancer worker stopping gracefully waits for its busy connections (a reply
    a client is slow to take): gunicorn's graceful timeout less a margin. The worker then ends
    them itself and exits, before the arbiter SIGKILLs it at the timeout."""
    return max(graceful_timeout / 2, graceful_timeout - 2.0)


def _valid_hash_key(value: str) -> bool:
    if value in ("random", "client"):
        return True
    kind, _, name = value.partition(":")
    return kind in ("header", "query") and bool(name)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw


def settings_table(markdown: bool = False) -> str:
    """The settings as a table, for ``--help`` and the README."""
    rows = [(PREFIX + f.name.upper(), repr(f.default) if f.default == "" else str(f.default),
             f.metadata["help"]) for f in dataclasses.fields(Settings)]
    if markdown:
        lines = ["| variable | default | meaning |", "|---|---|---|"]
        lines += [f"| `{name}` | `{default}` | {help} |" for name, default, help in rows]
        return "\n".join(lines)
    width = max(len(r[0]) for r in rows)
    dwidth = max(len(r[1]) for r in rows)
    return "\n".join(f"  {n:<{width}}  {d:<{dwidth}}  {h}" for n, d, h in rows)
