"""The balancer's own endpoints, under the reserved prefix ``/_lb/``, and its request hooks.

Every other GET path is routed to a replica, so the balancer keeps one prefix for itself: a
replica path under ``/_lb/`` is never reachable through the balancer, and nothing the balancer
adds later can shadow a replica's path outside it. The hooks give every request an id (the
client's ``X-Request-ID`` when well formed, else a new one), send it back in the reply's
``X-Request-ID`` (the router forwards the same id to the replica), count the reply and write one
log line for it.

The endpoints read the worker's parts (``lb.balancer.Balancer``) through ``OpsParts``, handed to
``init_ops``: this package cannot import ``lb.balancer``, which builds its metrics.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any, Protocol

from flask import Blueprint, Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import MethodNotAllowed

from lb.errors import ApiError, sentence, success
from lb.etcd import EtcdView
from lb.logs import log_access, request_id
from lb.ops.metrics import CONTENT_TYPE, BalancerMetrics, sample_sums
from lb.ops.openapi import PREFIX, openapi_document
from lb.ops.status import Counts, RateWindow, build_status
from lb.registry import READY, RegistryError, State
from lb.routing import Router, reason_phrase
from lb.settings import Settings
from lb.stores import Store, View
from lb.strategies import Lookup

STARTED_KEY = "lb.started"
ENDPOINTS = ("healthz", "readyz", "status", "status.json", "metrics", "openapi.json")


class OpsParts(Protocol):
    """What the ``/_lb/`` endpoints read; ``lb.balancer.Balancer`` is one."""

    @property
    def settings(self) -> Settings: ...
    @property
    def registry(self) -> Store: ...
    @property
    def router(self) -> Router: ...
    @property
    def metrics(self) -> BalancerMetrics: ...


def init_ops(app: Flask, parts: OpsParts) -> None:
    """Register the ``/_lb/`` endpoints and the per-request hooks on ``app``, over ``parts``."""
    endpoints = OpsEndpoints(parts)
    app.before_request(_begin)
    app.after_request(endpoints.finish)
    app.register_blueprint(endpoints.blueprint())


# -- every request --------------------------------------------------------------------------------
def _begin() -> None:
    request.environ[STARTED_KEY] = time.perf_counter()
    request_id(request.environ, request.headers.get("X-Request-ID"))


def registry_facts(view: View, state: State) -> dict[str, Any]:
    """The status's ``registry``: the store, the revision this worker applied, the leading
    supervisor (etcd; a read of its key, so only for replies about the registry) and the
    time since this worker applied the last change."""
    written = view.written_at
    facts: dict[str, Any] = {
        "store": view.registry.kind, "revision": state.version, "leader": None,
        "change_age": None if written is None else max(0.0, time.time() - written)}
    if isinstance(view, EtcdView):
        facts["revision"] = view.revision
        try:
            facts["leader"] = view.registry.leader()
        except RegistryError:
            pass  # unknown while etcd cannot be reached; the view says why elsewhere
    return facts


def routing_lookup(router: Router, state: State) -> Lookup:
    """The lookup ``router`` routes ``state`` with: its current table's (slow start's ramps
    included), or, when the registry changed in between, the one it will build for ``state``
    (the same method), so that shares and ramps are never worked out twice."""
    try:
        table = router.table()
    except RegistryError:
        table = None  # the view cannot give a state now: this one is what there is
    if table is not None and table.version == state.version:
        return table.ring
    return router.lookup_for(state, state.routable())


def _no_store(reply: Response) -> Response:
    reply.headers["Cache-Control"] = "no-store"
    return reply


# -- endpoints ------------------------------------------------------------------------------------
class OpsEndpoints:
    """One app's ``/_lb/`` endpoints and reply hook, over the parts they were handed."""

    def __init__(self, parts: OpsParts) -> None:
        self.parts = parts
        self.rates = RateWindow()  # the status page's rates: this worker's, between its replies

    def blueprint(self) -> Blueprint:
        """The endpoints under ``/_lb/``. Each is named after its view (``ops.readyz``): the
        name labels its replies in the metrics and the access log."""
        bp = Blueprint("ops", __name__, url_prefix=PREFIX, static_folder="static",
                       template_folder="templates")
        views = {"/healthz": healthz, "/readyz": self.readyz, "/status.json": self.status_json,
                 "/status": self.status_page, "/metrics": self.metrics,
                 "/openapi.json": openapi}
        for rule, view in views.items():
            bp.get(rule)(view)
        bp.route("/<path:rest>", methods=ANY_METHOD)(reserved)
        bp.route("/", defaults={"rest": ""}, methods=ANY_METHOD, strict_slashes=False)(reserved)
        return bp

    def finish(self, reply: Response) -> Response:
        """Every reply: its status line, its request id, its count and its log line."""
        # "400 Bad Request", as gunicorn's own errors and lb.aio say it (werkzeug upper-cases it).
        reply.status = f"{reply.status_code} {reason_phrase(reply.status_code)}"
        rid = request_id(request.environ, request.headers.get("X-Request-ID"))
        reply.headers["X-Request-ID"] = rid
        endpoint = request.endpoint or "none"
        self.parts.metrics.response(endpoint, reply.status_code)
        began = request.environ.get(STARTED_KEY)
        ms = None if began is None else (time.perf_counter() - began) * 1000
        path = request.full_path.rstrip("?") if request.query_string else request.path
        log_access(request.method, path, reply.status_code, reply.headers.get("X-Served-By"), ms,
                   rid, endpoint, request.remote_addr)
        return reply

    def readyz(self) -> Response:
        """Readiness: this worker can route, i.e. it has a replica set with at least one
        routable replica. Fail static: a registry that became unreadable still leaves the last
        good set, so the balancer stays ready; ``stale`` says what is wrong (null when nothing
        is)."""
        view = self.parts.router.view
        try:
            state = view.current()
        except RegistryError as exc:
            raise ApiError(503, f"Not ready: {exc.reason}") from exc
        routable = len(state.routable())
        if routable == 0:
            raise ApiError(503, "Not ready: no routable replica")
        stale = _staleness(view, state, self.parts.settings.stale_seconds)
        return _no_store(jsonify(success({"ready": True, "routable": routable,
                                          "registry_version": state.version, "stale": stale})))

    def status_document(self) -> dict[str, Any]:
        view = self.parts.router.view
        state = view.latest()
        families = list(self.parts.metrics.families())
        requests = sample_sums(families, "lb_routed_requests_total", "replica")
        unreachable = sample_sums(families, "lb_upstream_unreachable_total", "replica")
        failed = sample_sums(families, "lb_routed_requests_total", "replica",
                             where=lambda labels: labels.get("code", "").startswith("5"))
        ejections = sample_sums(families, "lb_replica_ejections_total", "replica")
        counts = {name: Counts(requests.get(name, 0.0),
                               failed.get(name, 0.0) + unreachable.get(name, 0.0),
                               ejections.get(name, 0.0))
                  for name in (set(requests) | set(unreachable)
                               | {r.hostname for r in state.replicas})}
        span, rates = self.rates.rates(time.monotonic(), counts)
        now = time.time()
        ejected = {hostname: now + left
                   for hostname, left in self.parts.router.ejections.remaining().items()}
        return build_status(state, counts, rates, span, self.parts.settings, now=now,
                            registry=registry_facts(view, state), ejected=ejected,
                            load=self.parts.router.limits.load(),
                            lookup=routing_lookup(self.parts.router, state))

    def status_json(self) -> Response:
        return _no_store(jsonify(success(self.status_document())))

    def status_page(self) -> Response:
        html = render_template("status.html", status=self.status_document(), prefix=PREFIX)
        return _no_store(Response(html, mimetype="text/html"))

    def metrics(self) -> Response:
        metrics = self.parts.metrics
        if not metrics.enabled:
            raise ApiError(503, "Metrics need prometheus-client: pip install 'hashlb[ops]'")
        view = self.parts.router.view
        try:
            facts = registry_facts(view, view.latest())
        except RegistryError:
            facts = None  # lb_registry_up says so
        router = self.parts.router
        text = metrics.exposition(self.parts.registry, self.parts.settings, facts,
                                  lambda state: routing_lookup(router, state))
        return _no_store(Response(text, content_type=CONTENT_TYPE))


def _staleness(view: View, state: State, limit: float) -> str | None:
    """Why the replica set this worker routes with may be out of date, or None.

    The supervisor writes the registry at least every ``record_seconds`` while a replica is
    ready (each miss at once, answers at that pace), so a file much older than that (``limit``,
    ``Settings.stale_seconds``) means nobody records what happens to the replicas: the
    supervisor is not running, or cannot write the registry.
    """
    now = time.time()
    if view.problem is not None:
        return (f"{sentence(view.problem.reason)}: routing with the last good state (version "
                f"{state.version}) for {now - (view.stale_since or now):.0f}s")
    written = view.written_at
    if written is not None and now - written > limit and any(
            r.state == READY and r.handle for r in state.replicas):
        return (f"The registry has not been written for {now - written:.0f}s: replica states "
                "may be out of date (is the supervisor running, and can it write the registry?)")
    return None


def healthz() -> Response:
    """Liveness: this worker answers. Nothing else is checked, so a busy registry or a set
    of dead replicas never gets the balancer itself restarted."""
    return _no_store(jsonify(success("alive")))


def openapi() -> Response:
    try:
        version = metadata.version("hashlb")
    except metadata.PackageNotFoundError:
        version = "0"
    return jsonify(openapi_document(version))


ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def reserved(rest: str) -> Response:
    """Anything else under the prefix is the balancer's, never a replica's."""
    if rest in ENDPOINTS or rest.startswith("static/"):
        raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
    raise ApiError(404, f"'{request.path}' is not an endpoint of the balancer "
                        f"({PREFIX}/ is reserved for it)")
