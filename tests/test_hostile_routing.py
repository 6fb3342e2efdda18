"""Hostile requests on the routed path, sent byte for byte to a real stack (gunicorn in front).

The stack has one replica: an echo server registered like any other (see ``helpers_echo``),
which answers with what it received, so each test sees exactly what the balancer forwarded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RunningStack
from tests.helpers_chaos import report
from tests.helpers_echo import start_echo_replica
from tests.helpers_stack import RawReply, get_request, raw_http, running_stack

pytestmark = pytest.mark.system
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, lb_worker: str) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("hostile"), lb_worker, n=0) as running:
        start_echo_replica(running.registry, running.settings.deployment, "echo-1")
        yield running
        report("hostile routed requests", inputs_tried=sum(TRIED.values()), **TRIED)


def send(stack: RunningStack, kind: str, target: bytes, *headers: bytes) -> RawReply:
    TRIED[kind] = TRIED.get(kind, 0) + 1
    reply = raw_http(stack.url, get_request(target, *headers))
    assert reply.status < 500 or kind == "replica-error", (target[:100], reply.status,
                                                         reply.body[:300])
    return reply


def echoed(reply: RawReply) -> dict[str, Any]:
    assert reply.status == 200, reply.body[:300]
    assert reply.header("X-Served-By") == "echo-1"
    data: dict[str, Any] = json.loads(reply.body)
    return data


def received_headers(reply: RawReply) -> dict[str, str]:
    return {k.lower(): v for k, v in echoed(reply)["headers"]}


def upper_escapes(target: str) -> str:
    """``%2e`` and ``%2E`` are the same octet (RFC 3986 section 6.2.2.1)."""
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), target)


@pytest.mark.parametrize("target", [
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc/passwd", "/a/./b/../c",
    "/home/../heartbeat", "/%2E%2E%5C..%5Cwin.ini", "/echo/%41%2F%25%00?q=%FF&x=a+b",
    "//double//slash", "/x?a=1&a=2&b=%26&c", "/~user/%7Euser", "/x;param=1", "/%E2%82%AC",
    "/" + "a" * 3000, "/x?" + "q=1&" * 700,
])
def test_the_target_reaches_the_replica_as_the_client_sent_it(stack: RunningStack,
                                                               target: str) -> None:
    """No decoding, no dot-segment removal: what the client sent is what the replica gets.

    (The router used to let requests "prepare" the URL: "/%2e%2e/x" reached the replica as a
    literal "/../x", and "/a/./b/../c" as "/a/c".)
    """
    reply = send(stack, "path", target.encode())
    assert upper_escapes(echoed(reply)["raw_uri"]) == upper_escapes(target)


def test_an_absolute_form_target_is_routed_by_its_path_only(stack: RunningStack) -> None:
    reply = send(stack, "path", b"http://internal.example:8080/admin?x=1")
    data = echoed(reply)
    assert data["raw_uri"] == "/admin?x=1"
    assert "internal.example" not in received_headers(reply)["host"]


@pytest.mark.parametrize(("target", "headers", "status"), [
    (b"/caf\xc3\xa9", (), 400),  # raw non-ASCII in the request line
    (b"/sp ace", (), 400),
    (b"*", (), 400),
    (b"/" + b"a" * 5000, (), 414),  # longer than gunicorn's request line limit (4094)
    (b"/x", (b"X-Big: " + b"y" * 9000,), 431),  # one header longer than the limit (8190)
    (b"/x", tuple(f"X-H{i}: v".encode() for i in range(120)), 431),  # more than 100 headers
    (b"/x", (b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),  # smuggling attempt
    (b"/x", (b"Content-Length: 1", b"Content-Length: 2"), 400),
    (b"/x", (b"Bad Header: v",), 400),
    (b"/x", (b"X-Ctl: a\x01b",), 400),
])
def test_malformed_requests_are_refused_in_the_contract_envelope(
        stack: RunningStack, target: bytes, headers: tuple[bytes, ...], status: int) -> None:
    """gunicorn refuses these before the app sees them; its reply is still the JSON envelope
    (lb.threads.worker), its connection closed, and the balancer goes on serving."""
    reply = send(stack, "malformed", target, *headers)
    assert reply.status == status, reply.body[:300]
    assert reply.header("Content-Type") == "application/json"
    assert reply.header("Connection") == "close"
    body = json.loads(reply.body)
    assert body["status"] == "failure" and set(body) == {"message", "status"}
    assert body["message"].startswith("<Error> "), body
    assert echoed(send(stack, "path", b"/after"))["raw_uri"] == "/after"  # still serving


def test_hop_by_hop_headers_stay_on_their_hop(stack: RunningStack) -> None:
    reply = send(stack, "headers", b"/hop",
                 b"Connection: keep-alive, X-Drop-Me", b"X-Drop-Me: secret",
                 b"Keep-Alive: timeout=5", b"TE: trailers", b"Upgrade: websocket",
                 b"Proxy-Authorization: Basic eDp5", b"Proxy-Connection: keep-alive",
                 b"Trailer: X-T", b"X-Keep: yes", b"Authorization: Bearer end-to-end")
    got = received_headers(reply)
    for name in ("x-drop-me", "keep-alive", "te", "upgrade", "proxy-authorization",
                 "proxy-connection", "trailer", "transfer-encoding"):
        assert name not in got, (name, got)
    assert "x-drop-me" not in got.get("connection", "").lower()
    assert got["x-keep"] == "yes"
    assert got["authorization"] == "Bearer end-to-end"  # end-to-end: the replica's business


def test_x_forwarded_for_appends_the_client_address(stack: RunningStack) -> None:
    plain = received_headers(send(stack, "headers", b"/xff"))
    assert plain["x-forwarded-for"] == "127.0.0.1"
    spoofed = received_headers(send(stack, "headers", b"/xff", b"X-Forwarded-For: 6.6.6.6"))
    assert [a.strip() for a in spoofed["x-forwarded-for"].split(",")] == ["6.6.6.6", "127.0.0.1"]
    two = received_headers(send(stack, "headers", b"/xff", b"X-Forwarded-For: 6.6.6.6",
                                b"X-Forwarded-For: 7.7.7.7, 8.8.8.8"))
    assert [a.strip() for a in two["x-forwarded-for"].split(",")] == \
        ["6.6.6.6", "7.7.7.7", "8.8.8.8", "127.0.0.1"]
    underscored = received_headers(send(stack, "headers", b"/xff",
                                        b"X_Forwarded_For: 9.9.9.9"))
    assert "9.9.9.9" not in json.dumps(underscored)


def test_spoofed_forwarding_headers_are_overwritten(stack: RunningStack) -> None:
    got = received_headers(send(stack, "headers", b"/fwd", b"X-Forwarded-Host: evil.example",
                                b"X-Forwarded-Proto: https", b"X-Forwarded-Ssl: on"))
    assert got["x-forwarded-host"] == "balancer.test"  # the Host the client asked for
    # The balancer speaks plain HTTP: no loopback client may make it claim https (gunicorn
    # trusted X-Forwarded-Proto from 127.0.0.1 by default and the replica was told "https").
    assert got["x-forwarded-proto"] == "http"
    for claim in ("Forwarded: for=6.6.6.6;proto=https", "X-Real-IP: 6.6.6.6",
                  "X-Forwarded-Protocol: ssl"):
        got = received_headers(send(stack, "headers", b"/fwd", claim.encode()))
        assert claim.split(":")[0].lower() not in got, got
    host = received_headers(send(stack, "headers", b"/fwd"))["host"]
    assert host.startswith("127.0.0.1:")  # the replica's own address, not the client's Host


def test_request_ids_are_kept_only_when_harmless(stack: RunningStack) -> None:
    kept = received_headers(send(stack, "headers", b"/rid", b"X-Request-ID: abc-123.x:y"))
    assert kept["x-request-id"] == "abc-123.x:y"
    for bad in (b"a b", b"<script>", b"x" * 200, b"\xc3\xa9"):
        got = received_headers(send(stack, "headers", b"/rid", b"X-Request-ID: " + bad))
        assert re.fullmatch(r"[0-9a-f]{32}", got["x-request-id"]), got["x-request-id"]


def test_only_get_is_routed(stack: RunningStack) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE", "TRACE"):
        TRIED["methods"] = TRIED.get("methods", 0) + 1
        request = f"{method} /home HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n" \
                  "Connection: close\r\n\r\n".encode()
        reply = raw_http(stack.url, request)
        assert reply.status == 405, (method, reply.status)
        assert json.loads(reply.body)["status"] == "failure"


@pytest.mark.parametrize("target", [
    "/%2e%2e/x", "/a%2fb%2Fc", "/%zz", "/%", "/x%4", "/%7euser?q=%2e&r=%zz", "/%c3%A9",
])
def test_the_target_is_forwarded_byte_for_byte(stack: RunningStack, target: str) -> None:
    """Not even escapes are normalised: ``%2e`` stays lower-case, ``%zz`` is not re-escaped
    as ``%25zz`` (the HTTP client library under the threads path did both)."""
    assert echoed(send(stack, "path", target.encode()))["raw_uri"] == target


def test_an_absolute_form_target_without_a_path_is_routed_as_the_root(
        stack: RunningStack) -> None:
    """``GET http://evil.example HTTP/1.1`` used to answer a 308 whose Location came from the
    client's Host header; no reply of the balancer is a redirect built from client input."""
    for target in (b"http://evil.example", b"http://evil.example?x=1", b"//double//slash"):
        reply = send(stack, "path", target)
        assert reply.status == 200, (target, reply.status, reply.header("Location"))
        assert reply.header("Location") is None
    assert echoed(send(stack, "path", b"http://evil.example"))["raw_uri"] == "/"


def test_what_the_balancer_adds_never_pushes_a_request_over_the_replicas_limits(
        stack: RunningStack) -> None:
    """A request at the balancer's own limits (100 header fields, a field line of 8,190 bytes
    with its CRLF) still fits the replica after the balancer adds its X-Forwarded-* and
    X-Request-ID headers; one byte more is the balancer's own 431."""
    many = tuple(f"X-H{i}: v".encode() for i in range(98))  # + Host + Connection = 100
    assert echoed(send(stack, "headers", b"/many", *many))["method"] == "GET"
    name = b"X-Forwarded-For: "
    big = name + b"1" * (8188 - len(name))  # with its CRLF exactly the limit (as gunicorn counts)
    got = received_headers(send(stack, "headers", b"/bigxff", big))
    assert got["x-forwarded-for"].endswith(", 127.0.0.1")
    assert send(stack, "headers", b"/bigxff", big + b"1").status == 431


def test_a_replicas_error_page_reaches_the_client_only_as_the_envelope(
        stack: RunningStack) -> None:
    for code in (431, 500, 503):
        reply = send(stack, "replica-error", f"/status?code={code}".encode())
        assert reply.status == code
        assert reply.header("Content-Type") == "application/json"
        assert json.loads(reply.body) == {
            "message": f"<Error> Replica echo-1 answered {code} {reply.reason}",
            "status": "failure"}


@pytest.mark.parametrize(("coding", "status"), [
    (b"gzip", 400), (b"chunked, gzip", 400), (b"chunked, chunked", 400),
    (b"gzip, chunked", 501), (b"foo, chunked", 501),
])
def test_transfer_codings_are_answered_as_rfc_9112_says(stack: RunningStack, coding: bytes,
                                                        status: int) -> None:
    """Without chunked as the final coding a body has no length: 400. A coding before it that
    the balancer does not implement: 501, "Not Implemented" (gzip used to be silently ignored,
    and gunicorn's own 501 said "Bad Request")."""
    body = b"2\r\n{}\r\n0\r\n\r\n" if coding.endswith(b"chunked") else b"{}"
    request = (b"POST /add HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding +
               b"\r\nConnection: close\r\n\r\n" + body)
    TRIED["codings"] = TRIED.get("codings", 0) + 1
    before = stack.rep()
    reply = raw_http(stack.url, request)
    assert (reply.status, reply.reason) == (status, {400: "Bad Request",
                                                     501: "Not Implemented"}[status])
    message = json.loads(reply.body)["message"]
    assert message.startswith("<Error> ")
    if status == 501:  # worded by whichever refused it first (gunicorn knows no "foo" at all)
        assert "transfer" in message.lower() and "coding" in message.lower(), message
    assert stack.rep() == before  # nothing was added
