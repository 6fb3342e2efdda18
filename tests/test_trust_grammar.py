"""The request grammar, the same on both data paths: a corpus of requests sent byte for byte to
both workers side by side (``LB_WORKER=async`` and ``LB_WORKER=threads`` over one registry and
one replica), each reply compared with the other worker's (status, framing) and with what
RFC 9110/9112 and the contract call for (status, the envelope, ``Allow``).

The corpus: HTTP/0.9 and unknown versions, repeated ``Host``, a malformed request line, a
fragment in the target, the methods a balancer never serves (``OPTIONS *``, ``CONNECT``,
``TRACE``) and methods nobody defined, transfer codings, and request-smuggling classics
(Content-Length with Transfer-Encoding, two lengths, chunk lines ended by a bare LF, obs-fold).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.helpers_chaos import report
from tests.helpers_misbehave import start_misbehaving_replica
from tests.helpers_stack import running_stack, threads_balancer

pytestmark = pytest.mark.system


def line(method: str, target: str, version: str = "HTTP/1.1", *headers: str,
         body: bytes = b"") -> bytes:
    head = [f"{method} {target} {version}", "Host: balancer.test", *headers,
            "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


ADD_CHUNKED = ("POST", "/add", "HTTP/1.1", "Content-Type: application/json")

# name -> (request, expected status, Allow expected or None)
CORPUS: dict[str, tuple[bytes, int, str | None]] = {
    "http/0.9 line": (b"GET /home\r\n\r\n", 400, None),
    "http/1.2 is 1.1": (line("GET", "/home", "HTTP/1.2"), 200, None),
    "http/2.0": (line("GET", "/home", "HTTP/2.0"), 505, None),
    "http/3.0": (line("GET", "/home", "HTTP/3.0"), 505, None),
    "two hosts": (line("GET", "/home", "HTTP/1.1", "Host: other.test"), 400, None),
    "double space": (b"GET  /home HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400, None),
    "fragment": (line("GET", "/rep#frag"), 400, None),
    "options *": (line("OPTIONS", "*"), 405, "GET, HEAD"),
    "connect": (line("CONNECT", "h:443"), 405, "GET, HEAD"),
    "trace": (line("TRACE", "/"), 405, "GET, HEAD"),
    "unknown method": (line("FOO", "/home"), 501, None),
    "unknown method, admin path": (line("BREW", "/rep"), 501, None),
    "te xchunked": (line(*ADD_CHUNKED, "Transfer-Encoding: xchunked",
                         body=b"2\r\n{}\r\n0\r\n\r\n"), 400, None),
    "te gzip, chunked": (line(*ADD_CHUNKED, "Transfer-Encoding: gzip, chunked",
                              body=b"2\r\n{}\r\n0\r\n\r\n"), 501, None),
    "cl and te": (line(*ADD_CHUNKED, "Content-Length: 7", "Transfer-Encoding: chunked",
                       body=b"2\r\n{}\r\n0\r\n\r\n"), 400, None),
    "two lengths": (line(*ADD_CHUNKED, "Content-Length: 2", "Content-Length: 3",
                         body=b"{} "), 400, None),
    "chunked, bare lf": (line(*ADD_CHUNKED, "Transfer-Encoding: chunked",
                              body=b"2\n{}\n0\n\n"), 400, None),
    "chunked, bad size": (line(*ADD_CHUNKED, "Transfer-Encoding: chunked",
                               body=b"2\r\n{}\r\nzz\r\n\r\n"), 400, None),
    "obs-fold": (line("GET", "/home", "HTTP/1.1", "X-Folded: a", " b"), 400, None),
    # Not an admin path: "//rep" is a path the replicas are asked for, like "//double//slash".
    "double slash rep": (line("GET", "//rep"), 400, None),
}


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """worker -> URL: an async stack and a threads balancer over one registry, one replica."""
    with running_stack(tmp_path_factory.mktemp("grammar"), "async", n=0) as stack:
        start_misbehaving_replica(stack.registry, stack.settings.deployment, "odd-1")
        proc, threads_url = threads_balancer(stack)
        try:
            yield {"async": stack.url, "threads": threads_url}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # name -> async status/threads status (visible with -s)
        report("grammar corpus", **{name: f"{s['async']}/{s['threads']}"
                                    for name, s in RESULTS.items()})


class Seen:
    """A reply as read off the wire, to the close (or 5 s of silence)."""

    def __init__(self, raw: bytes, closed: bool) -> None:
        self.raw = raw
        self.closed = closed
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        parts = lines[0].split(" ", 2)
        self.version = parts[0]
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.headers = [tuple(x.strip() for x in h.split(":", 1)) for h in lines[1:] if ":" in h]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def framing(self) -> tuple[object, ...]:
        """How the reply is delimited, and whether the connection ends."""
        length = self.header("Content-Length")
        return (self.version, self.status,
                "length" if length is not None else self.header("Transfer-Encoding") or "close",
                length is None or int(length) == len(self.body),
                (self.header("Connection") or "").lower())

    def __repr__(self) -> str:
        return f"{self.raw[:400]!r} (closed: {self.closed})"


RESULTS: dict[str, dict[str, int]] = {}


def exchange(url: str, request: bytes, timeout: float = 5.0) -> Seen:
    host, port = url.removeprefix("http://").split(":")
    raw, closed = b"", False
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # answered and closed before it was all read
        try:
            while chunk := sock.recv(65536):
                raw += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return Seen(raw, closed)


@pytest.mark.parametrize("name", list(CORPUS))
def test_both_workers_answer_the_grammar_alike_and_as_the_rfcs_say(
        balancers: dict[str, str], name: str) -> None:
    request, status, allow = CORPUS[name]
    seen = {worker: exchange(url, request) for worker, url in balancers.items()}
    RESULTS[name] = {worker: s.status for worker, s in seen.items()}
    problems = []
    for worker, reply in seen.items():
        if reply.status != status:
            problems.append(f"{worker}: {reply.status} (want {status}): {reply!r}")
            continue
        if status == 200:
            if reply.version != "HTTP/1.1":
                problems.append(f"{worker}: answered {reply.status_line!r}, not HTTP/1.1")
            continue
        if reply.header("Content-Type") != "application/json":
            problems.append(f"{worker}: not the envelope: {reply!r}")
        else:
            body = json.loads(reply.body)
            if set(body) != {"message", "status"} or body["status"] != "failure" \
                    or not str(body["message"]).startswith("<Error> "):
                problems.append(f"{worker}: not the envelope: {body}")
        if allow is not None and reply.header("Allow") != allow:
            problems.append(f"{worker}: Allow {reply.header('Allow')!r}, want {allow!r}")
    a, t = seen["async"], seen["threads"]
    if a.framing() != t.framing():
        problems.append(f"framing differs: async {a.framing()} / threads {t.framing()}")
    assert not problems, "\n".join(problems)
