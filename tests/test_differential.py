"""The two data paths side by side: the same requests through the event-driven worker and the
threads worker, over the same registry and the same replica, must get the same replies.

One ``lb-run`` stack (``LB_WORKER=async``) and a second balancer (``LB_WORKER=threads``, its
own gunicorn on another port) read one registry; the only replica is an echo server, which
answers with what it received. Each request carries a fixed ``X-Request-ID``, so even the echoed
bodies are byte for byte comparable. Compared: status, body and headers (but ``Date``);
for requests refused before any app sees them (malformed, over a limit) the status and the
envelope's shape, since the two HTTP parsers word their complaints differently.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.helpers_echo import start_echo_replica
from tests.helpers_stack import RawReply, raw_http, running_stack, threads_balancer

pytestmark = pytest.mark.system

RID = b"X-Request-ID: differential-1"


def request(method: str, target: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: balancer.test", RID,
             *headers, b"Connection: close"]
    if body and not any(h.lower().startswith(b"transfer-encoding") for h in headers):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


# Requests both paths must answer identically.
SAME = {
    "home": request("GET", b"/home"),
    "root": request("GET", b"/"),
    "query": request("GET", b"/x?a=1&a=2&b=%26&c"),
    "escapes": request("GET", b"/%2e%2e/%2E%2e/etc/passwd?q=%FF&x=a+b"),
    "bad escape": request("GET", b"/%zz/%"),
    "double slash": request("GET", b"//double//slash"),
    "absolute form": request("GET", b"http://internal.example:8080/admin?x=1"),
    "absolute, no path": request("GET", b"http://evil.example"),
    "unknown path": request("GET", b"/other"),
    "decoded unknown": request("GET", b"/caf%C3%A9"),
    "replica error page": request("GET", b"/status?code=431"),
    "replica 500": request("GET", b"/status?code=500"),
    "big reply": request("GET", b"/big?n=3000000"),
    "empty reply": request("GET", b"/big?n=0"),
    "headers": request("GET", b"/hdr", b"X-Forwarded-For: 6.6.6.6",
                       b"X-Forwarded-For: 7.7.7.7, 8.8.8.8", b"X-Dup: a", b"X-Dup: b",
                       b"Forwarded: for=1.2.3.4", b"X-Real-IP: 1.2.3.4",
                       b"X-Forwarded-Proto: https", b"X-Forwarded-Host: evil",
                       b"X_Underscore: no", b"Keep-Alive: 5", b"TE: trailers", b"Authorization: Bearer x",
                       b"Cookie: a=b; c=d", b"X-Raw: \xb2"),
    "no host": b"GET /nohost HTTP/1.1\r\n" + RID + b"\r\nConnection: close\r\n\r\n",
    "http/1.0": b"GET /old HTTP/1.0\r\n" + RID + b"\r\n\r\n",
    "close among options": (b"GET /home HTTP/1.1\r\nHost: balancer.test\r\n" + RID
                            + b"\r\nConnection: keep-alive, close\r\n\r\n"),
    "close in a second header": (b"GET /home HTTP/1.1\r\nHost: balancer.test\r\n" + RID
                                 + b"\r\nConnection: keep-alive\r\nConnection: Close\r\n\r\n"),
    "head routed": request("HEAD", b"/home"),
    "rep": request("GET", b"/rep"),
    "encoded rep": request("GET", b"/%72ep"),
    "post routed path": request("POST", b"/home", body=b"{}"),
    "put": request("PUT", b"/x", body=b"x"),
    "get add": request("GET", b"/add"),
    "delete rep": request("DELETE", b"/rep"),
    "add bad json": request("POST", b"/add", body=b"{nope"),
    "add too many": request("POST", b"/add", body=b'{"n": 1, "hostnames": ["a1", "b2"]}'),
    "rm too many": request("DELETE", b"/rm", body=b'{"n": 1, "hostnames": ["a1", "b2"]}'),
    "rm unknown": request("DELETE", b"/rm", body=b'{"n": 1, "hostnames": ["nobody"]}'),
    "add chunked bad": request("POST", b"/add", b"Transfer-Encoding: chunked",
                               body=chunked(b'{"n": "x"}')),
    "add too large": request("POST", b"/add", body=b" " * 70000),
    "add too large chunked": request("POST", b"/add", b"Transfer-Encoding: chunked",
                                     body=chunked(b" " * 70000)),
    "add expect": request("POST", b"/add", b"Expect: 100-continue", body=b'{"n": 0}'),
    "reserved": request("GET", b"/_lb/nope"),
    "reserved post": request("POST", b"/_lb/healthz", body=b"x"),
    "healthz": request("GET", b"/_lb/healthz"),
    "get with body": request("GET", b"/withbody", body=b"hello"),
    "te gzip chunked": request("POST", b"/add", b"Transfer-Encoding: gzip, chunked",
                               body=chunked(b"{}")),
}
# Requests refused before any app sees them: same status, both in the envelope, both closed.
REFUSED = {
    "non-ascii target": request("GET", b"/caf\xc3\xa9"),
    "space in target": request("GET", b"/sp ace"),
    "asterisk": request("GET", b"*"),
    "line too long": request("GET", b"/" + b"a" * 5000),
    "header too big": request("GET", b"/x", b"X-Big: " + b"y" * 9000),
    "too many headers": request("GET", b"/x", *(f"X-H{i}: v".encode() for i in range(120))),
    "smuggling": request("GET", b"/x", b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    "two lengths": request("GET", b"/x", b"Content-Length: 1", b"Content-Length: 2"),
    "bad header name": request("GET", b"/x", b"Bad Header: v"),
    "control char": request("GET", b"/x", b"X-Ctl: a\x01b"),
    "te gzip": request("POST", b"/add", b"Transfer-Encoding: gzip", body=b"x"),
    "te chunked gzip": request("POST", b"/add", b"Transfer-Encoding: chunked, gzip",
                               body=b"x"),
    "te chunked twice": request("POST", b"/add", b"Transfer-Encoding: chunked, chunked",
                                body=b"x"),
}
IGNORED = {"date"}


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(async URL, threads URL) over one registry with one echo replica."""
    with running_stack(tmp_path_factory.mktemp("diff"), "async", n=0) as stack:
        start_echo_replica(stack.registry, stack.settings.deployment, "echo-1")
        proc, threads_url = threads_balancer(stack)
        try:
            yield stack.url, threads_url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def comparable(reply: RawReply, url: str) -> tuple[object, ...]:
    """What must be equal; the balancer's own address (in ``X-Forwarded-Host`` when the
    client sent no Host) is the one thing that differs by design."""
    own = url.removeprefix("http://")
    headers = sorted((k.lower(), v.replace(own, "BALANCER")) for k, v in reply.headers
                     if k.lower() not in IGNORED)
    return (reply.status, reply.reason, reply.interim, headers,
            reply.body.replace(own.encode(), b"BALANCER"))


@pytest.mark.parametrize("name", list(SAME))
def test_both_workers_give_the_same_reply(balancers: tuple[str, str], name: str) -> None:
    async_url, threads_url = balancers
    raw = SAME[name]
    fast, reference = raw_http(async_url, raw), raw_http(threads_url, raw)
    assert comparable(fast, async_url) == comparable(reference, threads_url), name
    # 5xx only for the balancer's own trouble: here, a replica's 500, or a coding it lacks.
    assert fast.status < 500 or name in ("replica 500", "te gzip chunked"), fast.body[:300]


@pytest.mark.parametrize("name", list(REFUSED))
def test_both_workers_refuse_the_same_requests_in_the_envelope(balancers: tuple[str, str],
                                                              name: str) -> None:
    replies = [raw_http(url, REFUSED[name]) for url in balancers]
    assert replies[0].status == replies[1].status, [(r.status, r.body[:200]) for r in replies]
    for reply in replies:
        assert 400 <= reply.status < 600
        assert reply.header("Content-Type") == "application/json"
        assert reply.header("Connection") == "close"
        body = json.loads(reply.body)
        assert set(body) == {"message", "status"} and body["status"] == "failure"
        assert body["message"].startswith("<Error> ")


@pytest.mark.parametrize("connection", [b"keep-alive, close", b"keep-alive\r\nConnection: Close"],
                         ids=["among options", "in a second header"])
def test_close_anywhere_in_connection_ends_the_connection(balancers: tuple[str, str],
                                                          connection: bytes) -> None:
    """RFC 9112 section 9.6: the reply says so and the server closes (well before the 5 s
    keep-alive time would; gunicorn alone honours only a first header that is exactly close)."""
    for url in balancers:
        reply = raw_http(url, b"GET /home HTTP/1.1\r\nHost: x\r\nConnection: " + connection
                         + b"\r\n\r\n", timeout=3)
        assert reply.status == 200 and reply.header("Connection") == "close", url


def test_a_body_in_a_later_packet_of_a_last_request_is_read(balancers: tuple[str, str]) -> None:
    """``Connection: close`` (or HTTP/1.0) makes a request the connection's last; its body
    still counts when it arrives after the headers."""
    for url in balancers:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /add HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Length: 10\r\n\r\n")
            time.sleep(0.3)
            sock.sendall(b'{"n": "x"}')
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400"), (url, reply[:200])
        assert b"positive integer" in reply
