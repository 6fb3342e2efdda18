"""The balancer's own endpoints, under the reserved prefix ``/_lb/``, and its request hooks.

Every other GET path is routed to a replica, so the balancer keeps one prefix for itself: a
replica path under ``/_lb/`` is never reachable through the balancer, and nothing the balancer
adds later can shadow a replica's path outside it. The hooks give every request an id (the
client's ``X-Request-ID`` when well formed, else a new one), send it back in the reply's
``X-Request-ID`` (the router forwards the same id to the replica), count the reply and write one
log line for it.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import MethodNotAllowed

from lb.errors import ApiError, sentence, success
from lb.etcd import EtcdView
from lb.logs import log_access, request_id
from lb.ops.metrics import CONTENT_TYPE, BalancerMetrics, sample_sums
from lb.ops.openapi import PREFIX, openapi_document
from lb.ops.status import Counts, RateWindow, build_status
from lb.registry import READY, RegistryError, State
from lb.routing import reason_phrase
from lb.stores import Store, View

STARTED_KEY = "lb.started"
ENDPOINTS = ("healthz", "readyz", "status", "status.json", "metrics", "openapi.json")

bp = Blueprint("ops", __name__, url_prefix=PREFIX, static_folder="static",
               template_folder="templates")


def init_ops(app: Flask, metrics: BalancerMetrics) -> None:
    """Register the ``/_lb/`` endpoints and the per-request hooks on ``app``."""
    app.extensions["lb"]["metrics"] = metrics
    app.extensions["lb"]["rates"] = RateWindow()
    app.before_request(_begin)
    app.after_request(_finish)
    app.register_blueprint(bp)


# -- every request --------------------------------------------------------------------------------
def _begin() -> None:
    request.environ[STARTED_KEY] = time.perf_counter()
    request_id(request.environ, request.headers.get("X-Request-ID"))


def _finish(reply: Response) -> Response:
    # "400 Bad Request", as gunicorn's own errors and lb.aio say it (werkzeug upper-cases it).
    reply.status = f"{reply.status_code} {reason_phrase(reply.status_code)}"
    rid = request_id(request.environ, request.headers.get("X-Request-ID"))
    reply.headers["X-Request-ID"] = rid
    endpoint = request.endpoint or "none"
    _ext()["metrics"].response(endpoint, reply.status_code)
    began = request.environ.get(STARTED_KEY)
    ms = None if began is None else (time.perf_counter() - began) * 1000
    path = request.full_path.rstrip("?") if request.query_string else request.path
    log_access(request.method, path, reply.status_code, reply.headers.get("X-Served-By"), ms,
               rid, endpoint, request.remote_addr)
    return reply


def _ext() -> dict[str, Any]:
    ext: dict[str, Any] = current_app.extensions["lb"]
    return ext


def _registry() -> Store:
    registry: Store = _ext()["registry"]
    return registry


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


def _no_store(reply: Response) -> Response:
    reply.headers["Cache-Control"] = "no-store"
    return reply


# -- endpoints ------------------------------------------------------------------------------------
@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: this worker answers. Nothing else is checked, so a busy registry or a set
    of dead replicas never gets the balancer itself restarted."""
    return _no_store(jsonify(success("alive")))


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: this worker can route, i.e. it has a replica set with at least one routable
    replica. Fail static: a registry that became unreadable still leaves the last good set,
    so the balancer stays ready; ``stale`` says what is wrong (null when nothing is)."""
    router = _ext()["router"]
    try:
        state = router.view.current()
    except RegistryError as exc:
        raise ApiError(503, f"Not ready: {exc.reason}") from exc
    routable = len(state.routable())
    if routable == 0:
        raise ApiError(503, "Not ready: no routable replica")
    return _no_store(jsonify(success({"ready": True, "routable": routable,
                                      "registry_version": state.version,
                                      "stale": _staleness(router.view, state)})))


def _staleness(view: View, state: State) -> str | None:
    """Why the replica set this worker routes with may be out of date, or None.

    The supervisor writes the registry at least every ``record_seconds`` while a replica is
    ready (each miss at once, answers at that pace), so a file much older than that means
    nobody records what happens to the replicas: the supervisor is not running, or cannot
    write the registry.
    """
    now = time.time()
    if view.problem is not None:
        return (f"{sentence(view.problem.reason)}: routing with the last good state (version "
                f"{state.version}) for {now - (view.stale_since or now):.0f}s")
    settings = current_app.config["SETTINGS"]
    limit = settings.stale_seconds
    written = view.written_at
    if written is not None and now - written > limit and any(
            r.state == READY and r.handle for r in state.replicas):
        return (f"The registry has not been written for {now - written:.0f}s: replica states "
                "may be out of date (is the supervisor running, and can it write the registry?)")
    return None


def status_document() -> dict[str, Any]:
    ext = _ext()
    state = ext["router"].view.latest()
    families = list(ext["metrics"].families())
    requests = sample_sums(families, "lb_routed_requests_total", "replica")
    unreachable = sample_sums(families, "lb_upstream_unreachable_total", "replica")
    failed = sample_sums(families, "lb_routed_requests_total", "replica",
                         where=lambda labels: labels.get("code", "").startswith("5"))
    counts = {name: Counts(requests.get(name, 0.0),
                           failed.get(name, 0.0) + unreachable.get(name, 0.0))
              for name in set(requests) | set(unreachable) | {r.hostname for r in state.replicas}}
    span, rates = ext["rates"].rates(time.monotonic(), counts)
    return build_status(state, counts, rates, span, current_app.config["SETTINGS"],
                        registry=registry_facts(ext["router"].view, state))


@bp.get("/status.json")
def status_json() -> Response:
    return _no_store(jsonify(success(status_document())))


@bp.get("/status")
def status_page() -> Response:
    html = render_template("status.html", status=status_document(), prefix=PREFIX)
    return _no_store(Response(html, mimetype="text/html"))


@bp.get("/metrics")
def metrics() -> Response:
    ext = _ext()
    if not ext["metrics"].enabled:
        raise ApiError(503, "Metrics need prometheus-client: pip install 'hashlb[ops]'")
    view = ext["router"].view
    try:
        facts = registry_facts(view, view.latest())
    except RegistryError:
        facts = None  # lb_registry_up says so
    text = ext["metrics"].exposition(_registry(), current_app.config["SETTINGS"], facts)
    return _no_store(Response(text, content_type=CONTENT_TYPE))


@bp.get("/openapi.json")
def openapi() -> Response:
    try:
        version = metadata.version("hashlb")
    except metadata.PackageNotFoundError:
        version = "0"
    return jsonify(openapi_document(version))


ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@bp.route("/", defaults={"rest": ""}, methods=ANY_METHOD, strict_slashes=False)
@bp.route("/<path:rest>", methods=ANY_METHOD)
def reserved(rest: str) -> Response:
    """Anything else under the prefix is the balancer's, never a replica's."""
    if rest in ENDPOINTS or rest.startswith("static/"):
        raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
    raise ApiError(404, f"'{request.path}' is not an endpoint of the balancer "
                        f"({PREFIX}/ is reserved for it)")
