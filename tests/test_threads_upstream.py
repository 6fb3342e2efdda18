"""The threads path's way to the replicas (``lb.threads.forward``), rule by rule, against replicas that
misbehave on purpose at the byte level (``tests.helpers_scripted``).

An in-process balancer (``create_app``, Flask's test client): every request of a test runs on
the test's thread, so it uses that thread's kept-alive connection to a replica, as one gunicorn
thread serving one client after another does. Two replicas: ``first`` is where the key goes,
``second`` the next one clockwise.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.balancer import Balancer as BalancerParts  # Balancer: this file's test harness
from lb.routing import SUSPECT_SECONDS
from lb.threads.forward import ReplicaHTTPConnection
from tests.helpers_echo import inprocess_balancer
from tests.helpers_scripted import ScriptedReplica, Step, answer, chunked, ok

KEY = 123456
TARGET = f"/thing?k={KEY}"
FORGED = answer(b"someone else's answer")


class Balancer:
    def __init__(self, app: Any, first: ScriptedReplica, second: ScriptedReplica) -> None:
        self.app = app
        self.client = app.test_client()
        self.first = first
        self.second = second

    def get(self, target: str = TARGET, **kw: Any) -> Any:
        return self.client.get(target, **kw)


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Callable[..., Balancer]]:
    """``balancer(script, **settings)``: the first replica plays ``script``, the second
    answers cleanly."""
    made: list[ScriptedReplica] = []

    def make(script: Callable[[int, bytes], Iterable[Step]], **config: Any) -> Balancer:
        a, b = ScriptedReplica(), ScriptedReplica()
        made.extend((a, b))
        settings = {"strategy": "maglev", "hash_key": "query:k", "upstream_timeout": 1.0,
                    "read_timeout": 1.0, **config}
        app = inprocess_balancer(str(tmp_path), [a.address, b.address], **settings)
        order = [r.address for r in BalancerParts.of(app).router.candidates(KEY)]
        first, second = (a, b) if order[0] == a.address else (b, a)
        first.script = script
        return Balancer(app, first, second)

    yield make
    for replica in made:
        replica.close()


def failure(reply: Any, status: int) -> str:
    assert reply.status_code == status, (reply.status_code, reply.get_data()[:300])
    payload = reply.get_json()
    assert payload["status"] == "failure" and payload["message"].startswith("<Error> ")
    message: str = payload["message"]
    return message


# -- 1. a connection carries the next request only after one clean, complete answer ------------
def test_interim_answers_are_skipped_and_the_final_one_delivered(
        balancer: Callable[..., Balancer]) -> None:
    """``103 Early Hints`` (and a stray ``100 Continue``) before the answer: the answer is what
    the client gets, and the next request gets its own (http.client stopped at the 103 and
    left the real answer for the next request on the connection)."""
    def script(n: int, head: bytes) -> list[Step]:
        if n == 1:
            return [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"answer 1")]
        return [answer(b"answer %d" % n)]

    lb = balancer(script)
    first, then = lb.get(), lb.get()
    assert (first.status_code, first.get_data()) == (200, b"answer 1")
    assert (then.status_code, then.get_data()) == (200, b"answer 2")
    assert lb.first.connections == 1  # an interim answer is no irregularity


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_a_body_after_a_bodiless_answer_is_never_the_next_answer(
        balancer: Callable[..., Balancer], status: str) -> None:
    """A 204 or 304 has no body whatever its fields say; bytes after it (here a whole forged
    answer) end the connection instead of being read as the next client's answer."""
    def script(n: int, head: bytes) -> list[Step]:
        if n == 1:
            return [answer(b"", status, f"Content-Length: {len(FORGED)}") + FORGED]
        return ok(n, head)

    lb = balancer(script)
    first, then = lb.get(), lb.get()
    assert first.status_code == int(status[:3]) and first.get_data() == b""
    assert "Content-Length" not in first.headers
    assert (then.status_code, then.get_data()) == (200, b"answer 2")
    assert lb.first.connections == 2


def test_an_unsolicited_answer_after_the_reply_is_never_delivered(
        balancer: Callable[..., Balancer]) -> None:
    lb = balancer(lambda n, head: [answer(b"answer %d" % n) + (FORGED if n == 1 else b"")])
    first, then = lb.get(), lb.get()
    assert first.get_data() == b"answer 1"
    assert then.get_data() == b"answer 2"
    assert lb.first.connections == 2


def test_bytes_that_come_after_the_answer_end_the_connection(
        balancer: Callable[..., Balancer]) -> None:
    """The stray answer arrives a moment after the real one (not in the same read): the
    connection is looked at again before the next request goes out on it."""
    lb = balancer(lambda n, head: [answer(b"answer %d" % n), 0.05, FORGED] if n == 1
                  else ok(n, head))
    first = lb.get()
    time.sleep(0.3)
    then = lb.get()
    assert first.get_data() == b"answer 1"
    assert then.get_data() == b"answer 2"
    assert lb.first.connections == 2


def test_a_101_is_a_broken_answer(balancer: Callable[..., Balancer]) -> None:
    """The balancer does not tunnel: a 101 is a protocol error (502), not passed back, and
    not tried on another replica (an answer had begun)."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    lb = balancer(lambda n, head: [switch, 5.0])
    began = time.monotonic()
    failure(lb.get(), 502)
    assert time.monotonic() - began < 1.0
    assert lb.second.requests == 0


def test_a_kept_alive_connection_the_replica_closed_is_not_its_failure(
        balancer: Callable[..., Balancer]) -> None:
    """Kept rule (guarded here against the rewrite, not new): every second request on a
    connection meets a close before any byte of an answer; each is sent once more on a new
    connection to the same replica."""
    served: dict[int, int] = {}

    def script(n: int, head: bytes) -> list[Step]:
        return [answer(b"answer %d" % n)]

    lb = balancer(script)

    def one_per_connection(n: int, head: bytes) -> list[Step]:
        served[lb.first.connections] = served.get(lb.first.connections, 0) + 1
        return [None] if served[lb.first.connections] > 1 else script(n, head)

    lb.first.script = one_per_connection
    for _ in range(4):
        assert lb.get().status_code == 200
    assert lb.second.requests == 0
    assert lb.first.connections == 4 and lb.first.requests == 7  # 3 met a close, each resent


# -- 2. deadlines: connect, first byte, each further read --------------------------------------
def test_a_slow_but_steady_answer_is_delivered_whole(balancer: Callable[..., Balancer]) -> None:
    """Every piece within LB_READ_TIMEOUT, the whole well past LB_UPSTREAM_TIMEOUT: the
    answer comes through, from the first replica alone."""
    lb = balancer(lambda n, head: [answer(b"", "200 OK", "Content-Length: 4"), 0.5, b"a", 0.5,
                                   b"b", 0.5, b"c", 0.5, b"d"],
                  upstream_timeout=0.3, read_timeout=2.0)
    reply = lb.get()
    assert (reply.status_code, reply.get_data()) == (200, b"abcd")
    assert lb.second.requests == 0


def test_an_answer_that_stalls_midway_is_a_504_and_not_retried(
        balancer: Callable[..., Balancer]) -> None:
    lb = balancer(lambda n, head: [answer(b"", "200 OK", "Content-Length: 10") + b"abc", 5.0],
                  upstream_timeout=0.5, read_timeout=0.5)
    began = time.monotonic()
    failure(lb.get(), 504)
    assert time.monotonic() - began < 2.5
    assert lb.first.requests == 1 and lb.second.requests == 0


def test_replicas_that_never_answer_are_a_504(balancer: Callable[..., Balancer]) -> None:
    """Nothing of an answer came: the next replica is tried; when the last one tried timed
    out too, the client is told so (504, not 502)."""
    lb = balancer(lambda n, head: [5.0], upstream_timeout=0.3, retries=1)
    lb.second.script = lb.first.script
    failure(lb.get(), 504)
    assert lb.first.requests == 1 and lb.second.requests == 1


# -- 3. the answer's head is bounded ------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    [f"X-Field-{i}: {i}" for i in range(101)],  # one field too many
    [f"X-Field-{i}: {'v' * 1000}" for i in range(80)],  # few fields, 80 KB of head
], ids=["101 fields", "80 KB head"])
def test_an_oversized_answer_head_is_a_502_and_not_retried(
        balancer: Callable[..., Balancer], fields: list[str]) -> None:
    lb = balancer(lambda n, head: [answer(b"{}", "200 OK", *fields)])
    failure(lb.get(), 502)
    assert lb.second.requests == 0


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
], ids=["status 099", "HTTP/2", "control character", "obsolete folding", "two lengths",
        "hex length", "gzip coding", "hex chunk size"])
def test_a_broken_answer_is_a_502_and_not_retried(balancer: Callable[..., Balancer],
                                                  head: bytes) -> None:
    """Framing and fields read as RFC 9112 says a proxy must: what is not HTTP/1.1 is never
    guessed at (http.client took the first of two lengths, ignored a coding, folded lines)."""
    lb = balancer(lambda n, _: [head, 2.0])
    failure(lb.get(), 502)
    assert lb.second.requests == 0


def test_a_head_at_the_bounds_passes(balancer: Callable[..., Balancer]) -> None:
    fields = [f"X-Field-{i}: {'v' * 500}" for i in range(99)]
    lb = balancer(lambda n, head: [answer(b"{}", "200 OK", *fields)])
    reply = lb.get()
    assert reply.status_code == 200 and reply.headers["X-Field-98"] == "v" * 500


# -- 4. LB_MAX_REPLY --------------------------------------------------------------------------
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_answer_over_max_reply_is_a_502(balancer: Callable[..., Balancer],
                                           framing: str) -> None:
    body = b"x" * 5000

    def script(n: int, head: bytes) -> list[Step]:
        if framing == "length":
            return [answer(body)]
        return [answer(b"", "200 OK", "Transfer-Encoding: chunked") + chunked(body, 1000)]

    lb = balancer(script, max_reply=1000)
    failure(lb.get(), 502)
    assert lb.second.requests == 0
    lb.first.script = lambda n, head: [answer(b"y" * 1000)]  # at the limit: fine
    time.sleep(SUSPECT_SECONDS + 0.1)  # the first replica is first again
    reply = lb.get()
    assert reply.status_code == 200 and reply.get_data() == b"y" * 1000
    assert lb.first.connections == 2  # the one with the answer over the limit was closed


# -- 5. large answers stream through ------------------------------------------------------------
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_large_answer_is_streamed_not_held(balancer: Callable[..., Balancer],
                                             framing: str) -> None:
    """The client has the answer's head and first part while the replica still holds back
    the rest: the balancer passes it on as it comes instead of waiting for all of it."""
    body = bytes(range(256)) * 4096  # 1 MiB
    release, finished = threading.Event(), threading.Event()

    def script(n: int, head: bytes) -> list[Step]:
        data = (answer(body) if framing == "length" else
                answer(b"", "200 OK", "Transfer-Encoding: chunked") + chunked(body, 50000))
        if n > 1:
            return [data]
        return [data[:300_000], lambda: release.wait(3), data[300_000:], finished.set]

    lb = balancer(script)
    reply = lb.get(buffered=False)
    assert reply.status_code == 200
    assert not finished.is_set(), "the balancer waited for the whole answer"
    release.set()
    assert reply.get_data() == body
    reply.close()
    assert lb.get().get_data() == body  # read to its clean end: the connection is used again
    assert lb.first.connections == 1


def test_a_stream_the_client_leaves_is_never_read_by_the_next_request(
        balancer: Callable[..., Balancer]) -> None:
    """Guards the streaming above (the old code read every answer whole): the client takes
    one piece of a 1 MiB answer and goes; the rest is not the next request's answer."""
    lb = balancer(lambda n, head: [answer(b"x" * (1 << 20))] if n == 1 else ok(n, head))
    reply = lb.get(buffered=False)
    assert next(iter(reply.response))
    reply.close()
    assert lb.get().get_data() == b"answer 2"
    assert lb.first.connections == 2


# -- 6. HEAD is forwarded as HEAD -------------------------------------------------------------
def test_head_goes_to_the_replica_as_head(balancer: Callable[..., Balancer]) -> None:
    lb = balancer(lambda n, head: [answer(b"", "200 OK", "Content-Length: 1234",
                                          "Content-Type: text/plain")])
    reply = lb.client.head(TARGET)
    assert lb.first.heads[0].startswith(b"HEAD /thing?k=")
    assert reply.status_code == 200 and reply.get_data() == b""
    assert reply.headers["Content-Length"] == "1234"
    lb.first.script = ok
    assert lb.get().get_data() == b"answer 2"  # no body was waited for or left behind
    assert lb.first.connections == 1


def test_a_host_that_stops_acknowledging_is_unreachable_not_a_closed_connection(
        balancer: Callable[..., Balancer], monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the event-driven path (tests/test_aio_upstream.py): a kept-alive connection whose
    replica's host vanished fails with the kernel's ETIMEDOUT (TCP_USER_TIMEOUT, set on every
    upstream socket) and the next replica gets the request at once, not the same one again on a
    new connection, nor a 504. The kernel's part is played here by the test."""
    lb = balancer(lambda n, head: [answer(b"answer %d" % n)])
    gone = threading.Event()
    bounds: list[int] = []
    original = ReplicaHTTPConnection.answer_began

    def answer_began(self: ReplicaHTTPConnection) -> bool:
        bounds.append(self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        if gone.is_set() and self.sock.getpeername()[1] == int(lb.first.address.split(":")[-1]):
            raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
        return original(self)

    monkeypatch.setattr(ReplicaHTTPConnection, "answer_began", answer_began)
    assert lb.get().get_data() == b"answer 1"
    gone.set()
    began = time.monotonic()
    for _ in range(2):
        reply = lb.get()
        assert reply.status_code == 200 and lb.second.requests >= 1, reply.get_data()[:300]
    assert time.monotonic() - began < 1.0  # upstream_timeout here
    assert lb.first.connections == 1  # not sent once more on a new connection
    assert bounds and set(bounds) == {500}, bounds  # LB_CONNECT_TIMEOUT's 0.5 s
