"""The OpenAPI description is true: it validates as OpenAPI 3.1, it names every route the app
has, and every response it documents is provoked (on a real stack, or in-process for the few
that need a fault injected) and checked against its schema; a reply with an undocumented
status fails the test too."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT202012

from lb.app import create_app
from lb.backends import BackendError
from lb.balancer import Balancer
from lb.ops.metrics import ENV_DIR
from lb.ops.openapi import openapi_document
from lb.registry import READY, Registry
from tests.conftest import RunningStack
from tests.helpers_echo import serve_in_thread
from tests.helpers_stack import stalled_body

SPEC = openapi_document("test")
SPEC_URI = "urn:hashlb:openapi"
TOKEN = "t0ken"


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes


class Checker:
    """Checks replies against the document and remembers which responses were seen."""

    def __init__(self) -> None:
        resource = Resource.from_contents(SPEC, default_specification=DRAFT202012)
        self.schemas = SchemaRegistry().with_resource(SPEC_URI, resource)
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, path: str, method: str, reply: Reply) -> None:
        operation = SPEC["paths"][path][method]
        code = str(reply.status)
        where = f"{method.upper()} {path} -> {code}"
        assert code in operation["responses"], f"{where} is not documented: {reply.body[:200]!r}"
        documented = operation["responses"][code]
        self.seen.add((path, method, code))
        content = documented.get("content")
        if content is None:
            return
        [media] = content
        assert reply.content_type.split(";")[0] == media, f"{where}: {reply.content_type}"
        if media == "application/json":
            pointer = "/".join(p.replace("~", "~0").replace("/", "~1") for p in
                               ["paths", path, method, "responses", code, "content", media,
                                "schema"])
            validator = Draft202012Validator({"$ref": f"{SPEC_URI}#/{pointer}"},
                                             registry=self.schemas)
            errors = [e.message for e in validator.iter_errors(json.loads(reply.body))]
            assert not errors, f"{where}: {errors}\n{reply.body[:500]!r}"
        else:
            assert reply.body, f"{where}: empty {media}"

    def request_body_ok(self, body: Any, schema: str = "ScaleRequest") -> bool:
        validator = Draft202012Validator({"$ref": f"{SPEC_URI}#/components/schemas/{schema}"},
                                         registry=self.schemas)
        return validator.is_valid(body)


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


def test_document_is_valid_openapi() -> None:
    validate_spec(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_document_names_every_route(tmp_path: Path) -> None:
    app = create_app({"registry": str(tmp_path / "registry.json")})
    documented = {(path, method.upper()) for path, ops in SPEC["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("ops.static", "ops.reserved"):
            continue  # the page's assets; the 404 for the rest of the reserved prefix
        path = "/{path}" if rule.rule in ("/", "/<path:path>") else rule.rule
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            assert (path, method) in documented, f"{method} {rule.rule} is not documented"


# -- the live stack -------------------------------------------------------------------------------
def live(stack: RunningStack, checker: Checker, path: str, method: str, url: str,
         token: bool = True, **kw: Any) -> Reply:
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    if "data" in kw:  # a refused body is left unread: the server drops that connection
        headers["Connection"] = "close"
    reply = stack.session.request(method.upper(), stack.url + url, headers=headers,
                                  timeout=60, **kw)
    out = Reply(reply.status_code, reply.headers.get("Content-Type", ""), reply.content)
    checker.check(path, method, out)
    return out


def stalled(stack: RunningStack, checker: Checker, path: str, method: str) -> Reply:
    raw = stalled_body(stack.url, method.upper(), path, f"Authorization: Bearer {TOKEN}".encode())
    out = Reply(raw.status, raw.header("Content-Type") or "", raw.body)
    checker.check(path, method, out)
    return out


@pytest.mark.system
def test_live_replies_match_the_document(make_stack: Callable[..., RunningStack],
                                         checker: Checker) -> None:
    stack = make_stack(admin_token=TOKEN, max_replicas=5, client_timeout=2)

    def call(path: str, method: str, url: str | None = None, **kw: Any) -> Reply:
        return live(stack, checker, path, method, url or path, **kw)

    assert call("/rep", "get").status == 200
    assert call("/home", "get").status == 200
    assert call("/{path}", "get", "/heartbeat").status == 200
    assert call("/{path}", "get", "/other/x?y=1").status == 400
    assert call("/home", "get", "/home?extra=1").status == 200
    for path in ("/_lb/healthz", "/_lb/readyz", "/_lb/status.json", "/_lb/status",
                 "/_lb/metrics", "/_lb/openapi.json"):
        assert call(path, "get").status == 200
    assert json.loads(call("/_lb/openapi.json", "get").body) == openapi_document(
        json.loads(call("/_lb/openapi.json", "get").body)["info"]["version"])

    body = {"n": 1, "hostnames": ["S5"], "weight": 2}
    assert checker.request_body_ok(body, "AddRequest")
    assert not checker.request_body_ok(body)  # /rm takes no weight
    assert not checker.request_body_ok({"n": 1, "weight": 0}, "AddRequest")
    assert call("/add", "post", json=body, token=False).status == 401
    assert call("/add", "post", json=body).status == 200
    assert call("/add", "post", json={"n": 1, "weight": 2.5}).status == 400
    assert call("/add", "post", json=body).status == 409  # S5 exists
    assert call("/add", "post", json={"n": 1, "hostnames": ["A", "B"]}).status == 400
    assert call("/add", "post", data=b"{" * 70000).status == 413
    assert stalled(stack, checker, "/add", "post").status == 408
    assert not checker.request_body_ok({"n": 0})
    assert call("/rm", "delete", json={"n": 1, "hostnames": ["S5"]}, token=False).status == 401
    assert call("/rm", "delete", json={"n": 1, "hostnames": ["nope"]}).status == 409
    assert call("/rm", "delete", json={"n": 1, "hostnames": ["A", "B"]}).status == 400
    assert call("/rm", "delete", data=b"[" * 70000).status == 413
    assert stalled(stack, checker, "/rm", "delete").status == 408
    # POST /weight is the balancer's; a GET of /weight is routed (no replica here serves it).
    weights = {"weights": {"Server1": 3, "S5": 0}}
    assert checker.request_body_ok(weights, "WeightsRequest")
    assert not checker.request_body_ok({"weights": {"Server1": 257}}, "WeightsRequest")
    assert call("/weight", "post", json=weights, token=False).status == 401
    reply = call("/weight", "post", json=weights)
    assert reply.status == 200
    message = json.loads(reply.body)["message"]
    assert message["weights"] == {"Server1": 3, "Server2": 1, "Server3": 1, "S5": 0}
    assert message["shares"]["S5"] == 0.0 and message["replicas"] == rep_names(stack)
    assert call("/weight", "post", json={"weights": {}}).status == 200
    assert call("/weight", "post", json={"weights": {"Server1": -1}}).status == 400
    assert call("/weight", "post", json={"weights": {"nope": 1}}).status == 409
    assert call("/weight", "post", data=b"{" * 70000).status == 413
    assert stalled(stack, checker, "/weight", "post").status == 408
    assert call("/weight", "get").status == 400
    status = json.loads(call("/_lb/status.json", "get").body)["message"]
    assert {r["hostname"]: r["weight"] for r in status["replicas"]} == message["weights"]
    assert call("/rm", "delete", json={"n": 1, "hostnames": ["S5"]}).status == 200

    # With no replica left: routed GETs and readiness fail as documented.
    assert call("/rm", "delete", json={"n": 3}).status == 200
    assert call("/home", "get").status == 503
    assert call("/{path}", "get", "/anything").status == 503
    assert call("/weight", "get").status == 503
    assert call("/_lb/readyz", "get").status == 503
    assert call("/_lb/status.json", "get").status == 200


def rep_names(stack: RunningStack) -> list[str]:
    names: list[str] = stack.get("/rep").json()["message"]["replicas"]
    return names


# -- faults injected in-process -------------------------------------------------------------------
@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    monkeypatch.delenv(ENV_DIR, raising=False)
    yield create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-openapi"})


def local(app: Flask, checker: Checker, path: str, method: str, url: str | None = None,
          **kw: Any) -> Reply:
    reply = app.test_client().open(url or path, method=method.upper(), **kw)
    out = Reply(reply.status_code, reply.headers.get("Content-Type", ""), reply.data)
    checker.check(path, method, out)
    return out


def test_fault_replies_match_the_document(app: Flask, checker: Checker,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    parts = Balancer.of(app)
    # Every replica "ready" at an address where nothing listens: routed GETs get 502.
    with parts.registry.update() as state:
        for r in state.replicas:
            r.state, r.address, r.handle = READY, "http://127.0.0.1:9", "1/x"
    assert local(app, checker, "/home", "get").status == 502
    assert local(app, checker, "/{path}", "get", "/x").status == 502
    assert local(app, checker, "/weight", "get").status == 502
    with serve_in_thread() as address:  # a replica that serves /weight: an echo of it
        with parts.registry.update() as state:
            for r in state.replicas:
                r.address = address
        served = local(app, checker, "/weight", "get")
        assert served.status == 200 and json.loads(served.body)["path"] == "/weight"

    def refuse(spec: Any) -> Any:
        raise BackendError(f"cannot start {spec.hostname}: refused for the test")

    monkeypatch.setattr(parts.admin.backend, "start", refuse)
    assert local(app, checker, "/add", "post", json={"n": 1}).status == 503

    monkeypatch.setattr(parts.metrics, "enabled", False)
    assert local(app, checker, "/_lb/metrics", "get").status == 503

    # A registry file that became unreadable: routing and readiness go on with the last good
    # state; replies about the registry itself refuse.
    assert local(app, checker, "/_lb/readyz", "get").status == 200
    assert isinstance(parts.registry, Registry)
    Path(parts.registry.path).write_text("{garbage")
    stale = local(app, checker, "/_lb/readyz", "get")
    assert stale.status == 200 and json.loads(stale.body)["message"]["stale"]
    assert local(app, checker, "/rep", "get").status == 503
    assert local(app, checker, "/rm", "delete", json={"n": 1}).status == 503
    assert local(app, checker, "/add", "post", json={"n": 1}).status == 503
    assert local(app, checker, "/weight", "post", json={"weights": {}}).status == 503
    assert local(app, checker, "/_lb/status.json", "get").status == 503

@pytest.mark.system  # the live test provokes most of them: without it, this cannot hold
def test_every_documented_response_was_seen(checker: Checker) -> None:
    """Runs after the two above (file order): together they provoke every response."""
    documented = {(path, method, code) for path, ops in SPEC["paths"].items()
                  for method, op in ops.items() for code in op["responses"] if code != "default"}
    missing = sorted(documented - checker.seen)
    assert not missing, f"documented but never provoked: {missing}"
