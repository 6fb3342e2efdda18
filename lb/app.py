"""The balancer's Flask app: the contract's admin endpoints and the routed GET."""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from flask import Flask, Request, Response, jsonify, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import (
    ClientDisconnected,
    HTTPException,
    MethodNotAllowed,
    RequestEntityTooLarge,
    RequestTimeout,
)

from lb.admin import (
    ADD_TOO_MANY,
    RM_TOO_MANY,
    parse_scale_request,
    parse_weight,
    parse_weights_request,
    weights_message,
)
from lb.backends import BackendError
from lb.balancer import build_balancer
from lb.errors import ApiError, envelope, success
from lb.logs import request_id
from lb.ops.blueprint import init_ops
from lb.registry import RegistryBusy, RegistryError, RegistryUnreadable
from lb.routing import (
    JSON_TYPE,
    bodiless,
    error_body,
    forward_headers,
    header_value,
    origin_target,
    registry_trouble,
    request_key,
    transfer_coding_error,
)
from lb.settings import Settings
from lb.threads.forward import Upstream

log = logging.getLogger(__name__)
# The methods that act, per path: they need the admin token when one is set.
ADMIN_METHODS = {"/add": ["POST"], "/rm": ["DELETE"], "/weight": ["POST"]}
READ_METHODS = ["GET", "HEAD"]  # every other path: /rep, routed GETs, /_lb/ endpoints
# A GET of /weight is routed like any path but the contract's: only its POST is the balancer's.
ROUTED_TOO = frozenset({"/weight"})


def allowed_methods(path: str) -> list[str]:
    """The methods ``path`` takes: one answer per path, whatever method was refused. OPTIONS
    is not among them: the balancer has no CORS or other options to describe, so it is a 405
    like any method a path does not take."""
    acting = ADMIN_METHODS.get(path)
    if acting is None:
        return READ_METHODS
    return READ_METHODS + acting if path in ROUTED_TOO else acting


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Defaults, then ``LB_*`` environment variables, then ``config`` (setting names as keys).

    The worker's parts are built by ``lb.balancer.build_balancer`` and registered on the app:
    ``Balancer.of(app)`` returns them (the event-driven worker takes them from there)."""
    settings = Settings.from_env(**dict(config or {}))
    app = Flask("lb", static_folder=None)  # no /static/ route: every GET path but /_lb/ is routed
    # "//x" goes to the replicas as "//x": no redirect to "/x" built from the client's Host.
    app.url_map.merge_slashes = False
    app.wsgi_app = _empty_path_is_root(app.wsgi_app)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # OPTIONS is a 405 too: see allowed_methods
    balancer = build_balancer(settings)
    balancer.register(app)  # every other reader: Balancer.of(app)
    router, admin, forwarder = balancer.router, balancer.admin, balancer.forwarder
    init_ops(app, balancer)  # /_lb/ endpoints, request ids, access log, reply counts

    @app.get("/rep")
    def rep() -> Response:
        return jsonify(success(router.view.latest().rep()))

    @app.before_request
    def refuse_unimplemented_codings() -> None:
        # gunicorn answers 400 itself when chunked is not the final coding; "gzip, chunked"
        # it accepts and ignores the gzip (lb.aio refuses the same with the same rule).
        coding = request.headers.get("Transfer-Encoding")
        error = transfer_coding_error(coding) if coding else None
        if error is not None:
            raise error

    @app.before_request
    def require_admin_token() -> None:
        # Only the method that acts needs the token: GET /add is a 405 either way.
        if (settings.admin_token and request.method in ADMIN_METHODS.get(request.path, ())
                and not _slashed(request)):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.admin_token}".encode()):
                raise ApiError(401, "Missing or wrong admin token (Authorization: Bearer ...)")

    @app.before_request
    def leading_slashes_name_a_path_of_their_own() -> Response | None:
        # werkzeug matches "//rep" (and "//add") as "/rep": a path that begins with "//" is
        # not the balancer's own, but one for the replicas like "//double//slash".
        if not _slashed(request):
            return None
        if request.method in READ_METHODS:
            return route(request.path[1:])
        raise MethodNotAllowed(valid_methods=READ_METHODS)

    @app.post("/add")
    def add() -> Response:
        body = _json_body(request)
        n, hostnames = parse_scale_request(body, ADD_TOO_MANY, weighted=True)
        weight = parse_weight(body.get("weight", 1), "Field 'weight'", drain=False)
        return jsonify(success(admin.add(n, hostnames, weight).rep()))

    @app.post("/weight")
    def weight() -> Response:
        state = admin.set_weights(parse_weights_request(_json_body(request)))
        return jsonify(success(weights_message(state, settings.strategy)))

    @app.delete("/rm")
    def rm() -> Response:
        n, hostnames = parse_scale_request(_json_body(request), RM_TOO_MANY)
        return jsonify(success(admin.remove(n, hostnames).rep()))

    @app.get("/", defaults={"path": ""})
    @app.get("/<path:path>")
    def route(path: str) -> Response:
        if (request.path in ADMIN_METHODS and request.path not in ROUTED_TOO
                and not _slashed(request)):  # GET /add: a mistake
            raise MethodNotAllowed(valid_methods=ADMIN_METHODS[request.path])
        target = origin_target(_raw_target(request.environ))
        if target is None:
            raise ApiError(400, "Not a request target the balancer routes (use a path)")
        key = request_key(settings.hash_key, request.headers.get, request.args.get,
                          request.remote_addr)
        headers = forward_headers(
            request.headers.items(), request.remote_addr or "", request.host,
            request_id(request.environ, request.headers.get("X-Request-ID")),
            _scheme(request.environ))
        if request.method == "HEAD":  # as HEAD: the replica's own answer head, no body
            upstream = forwarder.forward(target, headers, key, _path(request), method="HEAD")
        else:
            upstream = forwarder.forward(target, headers, key, _path(request))
        return passed_back(upstream)

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int]:
        reply = Response(error_body(exc.message), mimetype=JSON_TYPE)  # the bytes lb.aio sends
        if exc.status == 401:
            reply.headers["WWW-Authenticate"] = "Bearer"
        reply.headers.extend(exc.headers)
        return reply, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        reply = jsonify(envelope(f"{exc.name}: {request.method} {_path(request)}"
                                 if code in (404, 405) else str(exc.description or exc.name)))
        if code == 405:
            # werkzeug's list is every method of every rule the path matched (POST /rm matches
            # DELETE /rm and the routed GET /<path>): the path's own list instead.
            reply.headers["Allow"] = ", ".join(allowed_methods(_path(request)))
        return reply, code

    @app.errorhandler(RegistryBusy)
    def busy(exc: RegistryBusy) -> tuple[Response, int]:
        log.warning("registry busy: %s", exc)
        return jsonify(envelope("The balancer is busy (registry locked); try again")), 503

    @app.errorhandler(RegistryError)
    def registry_error(exc: RegistryError) -> tuple[Response, int]:
        # The log names the file; the reply says what is wrong without it. The view's own line
        # covers an unreadable file once per change, so here only the rest is logged.
        if isinstance(exc, RegistryUnreadable):
            try:
                router.view.current()  # so the view notices, and logs the change once
            except RegistryError:
                pass
        else:
            log.error("%s %s: %s", request.method, request.path, exc)
        return jsonify(envelope(registry_trouble(exc))), 503

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError) -> tuple[Response, int]:
        log.error("%s %s: %s", request.method, request.path, exc, exc_info=exc)
        return jsonify(envelope("The replica backend failed; see the balancer's log")), 503

    return app


def passed_back(upstream: Upstream) -> Response:
    """A replica's answer as the client gets it: a small body whole, a large one streamed
    (``direct_passthrough``: werkzeug neither buffers nor measures it). The replica's
    Content-Length goes with a HEAD answer and a streamed one; none ever goes with a 1xx,
    204 or 304 (werkzeug adds none to those, and none is added here)."""
    body: Any = upstream.body if upstream.stream is None else upstream.stream
    if request.method == "HEAD" and upstream.length is None:
        body = iter(())  # no length known: werkzeug would say 0
    reply = Response(body, status=upstream.status, headers=upstream.headers,
                     direct_passthrough=upstream.stream is not None)
    if header_value(upstream.headers, "Content-Type") is None:
        del reply.headers["Content-Type"]  # passed back as it is: no default added
    if bodiless(upstream.status):
        del reply.headers["Content-Length"]
    elif upstream.length is not None:
        reply.headers["Content-Length"] = str(upstream.length)
    reply.headers["X-Served-By"] = upstream.replica.hostname
    return reply


def _empty_path_is_root(wsgi_app: Any) -> Any:
    """``GET http://host HTTP/1.1`` (absolute form, no path) has an empty ``PATH_INFO``; werkzeug
    would answer with a redirect to ``/`` built from the client's Host. It is ``/``."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if not environ.get("PATH_INFO"):
            environ["PATH_INFO"] = "/"
        return wsgi_app(environ, start_response)

    return app


def _json_body(req: Request) -> Any:
    """The body as JSON whatever the Content-Type (``curl -d`` sends a form type)."""
    limit = req.max_content_length
    try:
        raw = req.get_data(cache=False)
        # Without a Content-Length (chunked), werkzeug stops reading at the limit without a
        # word: a longer body would be cut there and obeyed. One byte more tells.
        too_long = limit is not None and len(raw) >= limit and req.environ["wsgi.input"].read(1)
    except ParseException as exc:
        # gunicorn's chunked reader met a body it cannot frame (a bad size, a bare LF): what
        # follows cannot be told from a next request, so the connection ends with this answer.
        _close_after(req)
        raise ApiError(400, f"Bad Request: malformed chunked body ({exc})") from exc
    except (BlockingIOError, ClientDisconnected) as exc:
        # SO_RCVTIMEO expired (lb.threads.worker): the client went quiet. werkzeug reports it as a
        # disconnect, raised while handling the BlockingIOError.
        if isinstance(exc, BlockingIOError) or isinstance(exc.__context__, BlockingIOError):
            raise RequestTimeout("The request body did not arrive within LB_CLIENT_TIMEOUT") \
                from exc
        raise
    if too_long:
        raise RequestEntityTooLarge()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"Malformed JSON body: {str(exc)[:100]}") from exc


def _path(req: Request) -> str:
    """The decoded path as the client sent it: werkzeug's ``request.path`` folds leading
    slashes into one (``//rep`` is ``/rep`` to it and to its routing)."""
    raw = req.environ.get("PATH_INFO", "")
    leading = len(raw) - len(raw.lstrip("/"))
    return "/" * max(leading, 1) + req.path.lstrip("/")


def _slashed(req: Request) -> bool:
    """The path begins with ``//``: none of the balancer's own endpoints."""
    return str(req.environ.get("PATH_INFO", "")).startswith("//")


def _close_after(req: Request) -> None:
    """Tell gunicorn (threads worker) to end the connection after this reply: its request
    object is reached through the body reader it gave as ``wsgi.input``."""
    reader = getattr(req.environ.get("wsgi.input"), "reader", None)
    gunicorn_request = getattr(reader, "req", None)
    if gunicorn_request is not None:
        gunicorn_request.must_close = True


def _scheme(environ: dict[str, Any]) -> str:
    """https for a request on the TLS listener: the threads worker wraps that socket itself
    (gunicorn's own TLS would make every listener TLS), so gunicorn's url_scheme says http."""
    if isinstance(environ.get("gunicorn.socket"), ssl.SSLSocket):
        return "https"
    return str(environ.get("wsgi.url_scheme") or "http")


def _raw_target(environ: dict[str, Any]) -> str:
    """The request target as the client sent it (no decode/re-encode round trip): gunicorn's
    ``RAW_URI``, or the ASGI scope's ``raw_path`` when the event-driven worker calls the app."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    scope = environ.get("asgi.scope") or {}
    query = scope.get("query_string", b"")
    raw_path = scope.get("raw_path") or environ.get("PATH_INFO", "/").encode("latin-1")
    return (raw_path + (b"?" + query if query else b"")).decode("latin-1")
