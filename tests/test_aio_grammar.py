"""The event-driven server's request grammar where llhttp is more lenient than RFC 9112: the
request line is checked against the bytes it came in (``check_request_line``), however the
client splits it over reads, and refusals come after the answers to the requests before them.
In-process: the benchmark's harness (real server, forwarder and pool; in-memory transports)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_aio import ANSWER, Harness

GOOD = b"GET /home?id=123456 HTTP/1.1\r\nHost: a.test\r\n\r\n"


@pytest.fixture()
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(str(tmp_path))
    try:
        yield h
    finally:
        h.close()


def feed(harness: Harness, raw: bytes, piece: int) -> None:
    for start in range(0, len(raw), piece):
        harness.client.data_received(raw[start:start + piece])


def answer_all(harness: Harness) -> None:
    for conn, transport in list(harness.replicas.values()):
        if transport.written:
            transport.written.clear()
            conn.data_received(ANSWER)
    harness.loop.run_until_complete(asyncio.sleep(0))


@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
def test_a_request_line_split_over_reads_is_served(harness: Harness, piece: int) -> None:
    feed(harness, GOOD, piece)
    answer_all(harness)
    harness.check()


@pytest.mark.parametrize("piece", [1, 5, 4096])
@pytest.mark.parametrize(("line", "status"), [
    (b"GET  /home HTTP/1.1", b"400"), (b"GET /home HTTP/1.1 ", b"400"),
    (b"GET /home#x HTTP/1.1", b"400"), (b"GET /home HTTP/2.0", b"505"),
    (b"GET /home HTTP/0.9", b"505"),
])
def test_a_malformed_line_is_refused_however_it_is_split(harness: Harness, piece: int,
                                                          line: bytes, status: bytes) -> None:
    feed(harness, line + b"\r\nHost: a.test\r\n\r\n", piece)
    reply = harness.replies()
    assert reply.startswith(b"HTTP/1.1 " + status + b" ") and b'"status":"failure"' in reply
    assert all(not t.written for _, t in harness.replicas.values())


def test_a_line_after_a_long_pipelined_request_is_checked_in_full(harness: Harness) -> None:
    """The second request's line begins at the end of one read and ends two reads later."""
    first = b"GET /home?id=1&pad=" + b"p" * 3000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
    second = b"GET /home?id=2&pad=" + b"q" * 3000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
    raw = first + second
    cut = len(first) + 10
    harness.client.data_received(raw[:cut])
    harness.client.data_received(raw[cut:cut + 2000])
    harness.client.data_received(raw[cut + 2000:])
    for _ in range(2):
        answer_all(harness)
    replies = harness.replies()
    assert replies.count(b"HTTP/1.1 200 OK\r\n") == 2, replies[:300]


def test_a_refusal_waits_for_the_answer_before_it(harness: Harness) -> None:
    harness.client.data_received(GOOD + b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
    assert harness.replies() == b""  # the first is at a replica: nothing may overtake it
    answer_all(harness)
    replies = harness.replies()
    assert replies.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n" in replies
    assert replies.index(b" 200 OK") < replies.index(b" 400 Bad Request")
