"""What the event-driven path works out once and then reuses, in-process (no sockets): what a
request's header fields mean, once per distinct set on a connection (``RequestFields``), and what
a replica's answer head means, once per distinct head (``AnswerHead``, and an answer taken whole
without the parser). Neither may change a byte of what goes out. The harness
(``tests/helpers_aio.py``) is the real server, forwarder, pool and router with in-memory
transports.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.aio.upstream import read_answer_head
from lb.routing import forward_headers
from tests.helpers_aio import ANSWER, BODY, Harness


def get(*fields: bytes, version: bytes = b"1.1") -> bytes:
    return b"\r\n".join([b"GET /home?id=123456 HTTP/" + version, *fields]) + b"\r\n\r\n"


def answer(body: bytes, *fields: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"Server: gunicorn", b"Date: Fri, 04 Dec 2026 02:00:00 GMT",
            b"Content-Type: application/json", *fields,
            b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def forwarded(sent: bytes) -> tuple[list[tuple[str, str]], str]:
    """The header fields a replica got after Host, and the request id among them."""
    lines = sent.decode("latin-1").split("\r\n")
    assert lines[0] == "GET /home?id=123456 HTTP/1.1" and lines[1].startswith("Host: ")
    pairs = [tuple(line.split(": ", 1)) for line in lines[2:] if line]
    rid = dict(pairs)["X-Request-ID"]
    return pairs, rid  # type: ignore[return-value]


@pytest.fixture()
def harness(tmp_path: Path) -> Iterator[Harness]:
    made = Harness(str(tmp_path))
    yield made
    made.close()


@pytest.fixture()
def two(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    """Two harnesses: one whose connection knows nothing yet, one to teach."""
    made = Harness(str(tmp_path / "fresh")), Harness(str(tmp_path / "known"))
    yield made
    for harness in made:
        harness.close()


def test_each_request_goes_on_with_its_own_fields_whatever_came_before(
        harness: Harness) -> None:
    """Same fields (reused), other fields, the first ones again, no fields at all (the
    connection's last request, HTTP/1.0): each time the replica gets exactly what
    ``forward_headers`` gives for that request's fields."""
    sequence = [
        (get(b"Host: a.test", b"X-A: 1"), [("Host", "a.test"), ("X-A", "1")]),
        (get(b"Host: a.test", b"X-A: 1"), [("Host", "a.test"), ("X-A", "1")]),
        (get(b"Host: a.test", b"X-A: 2", b"X-Forwarded-For: 9.9.9.9"),
         [("Host", "a.test"), ("X-A", "2"), ("X-Forwarded-For", "9.9.9.9")]),
        (get(b"Host: a.test", b"X-A: 1"), [("Host", "a.test"), ("X-A", "1")]),
        (get(version=b"1.0"), []),  # no field at all: still the X-Forwarded-* set
    ]
    rids = set()
    for raw, fields in sequence:
        conn, sent = harness.send(raw)
        pairs, rid = forwarded(sent)
        host = dict(fields).get("Host", "127.0.0.1:5000")  # no Host: the balancer's address
        assert pairs == forward_headers(fields, "127.0.0.1", host, rid)
        rids.add(rid)
        conn.data_received(ANSWER)
        assert harness.replies().endswith(BODY)
    assert len(rids) == len(sequence)  # a request id of its own every time


def test_a_connections_first_request_with_no_fields_gets_the_forwarded_set(
        harness: Harness) -> None:
    """Nothing was seen on the connection yet: no fields is not "the same fields as before"."""
    _, sent = harness.send(get(version=b"1.0"))
    pairs, rid = forwarded(sent)
    assert pairs == forward_headers([], "127.0.0.1", "127.0.0.1:5000", rid)


def test_an_answer_head_seen_before_gives_the_same_reply_as_the_parser(
        harness: Harness) -> None:
    first = answer(b'{"a":1}', b"X-Kept: k", b"Connection: keep-alive")
    replies = []
    for _ in range(3):
        harness.request(get(b"Host: a.test"), first)
        replies.append(re.sub(rb"X-Request-ID: \w+", b"", harness.replies()))
    assert replies[0] == replies[1] == replies[2]
    assert b"X-Kept: k\r\n" in replies[0] and replies[0].endswith(b'{"a":1}')
    assert b"Connection: keep-alive\r\nContent-Type" in replies[0]  # the balancer's own hop
    assert first[:first.index(b"\r\n\r\n") + 4] in harness.pool.heads


@pytest.mark.parametrize("cuts", [
    [-60],  # inside the head: the parser reads it
    [0],  # the head alone, then the body: gunicorn's two writes
    [7],  # the head and a few bytes of the body, then the rest
    [0, 7, 3000],  # the body in several reads
])
def test_an_answer_that_comes_in_pieces_gives_the_same_reply_whether_its_head_is_known(
        harness: Harness, cuts: list[int]) -> None:
    """``cuts``: where the reads end, counted from the end of the head."""
    body = b'{"message": "' + b"x" * 5000 + b'"}'
    whole = answer(body)
    end = whole.index(b"\r\n\r\n") + 4
    offsets = [end + c for c in cuts]
    pieces = [whole[a:b] for a, b in zip([0, *offsets], [*offsets, len(whole)])]
    assert b"".join(pieces) == whole and all(pieces)
    replies = []
    for n in range(3):  # the first time unknown, then known
        conn, _ = harness.send(get(b"Host: a.test"))
        for piece in pieces[:-1]:
            conn.data_received(piece)
            assert harness.replies() == b""  # not yet
            # Known, and its head whole in the first read: the body is counted, not parsed.
            assert (conn._known is not None) == (n > 0 and cuts[0] >= 0)
        conn.data_received(pieces[-1])
        replies.append(re.sub(rb"X-Request-ID: \w+", b"", harness.replies()))
        assert conn.keep_alive and not conn.closed
        harness.request(get(b"Host: a.test"), whole)  # in one read: learns the head
        assert harness.replies().endswith(body)
    assert whole[:end] in harness.pool.heads
    assert replies[0] == replies[1] == replies[2] and replies[0].endswith(body)


def test_bytes_after_a_known_answer_that_came_in_pieces_end_that_connection(
        harness: Harness) -> None:
    harness.request(get(b"Host: a.test"), ANSWER)
    harness.check()
    end = ANSWER.index(b"\r\n\r\n") + 4
    conn, _ = harness.send(get(b"Host: a.test"))
    conn.data_received(ANSWER[:end])
    conn.data_received(ANSWER[end:] + b"HTTP/1.1 200 OK\r\n")
    harness.check()  # the answer stands
    assert conn.closed and not conn.keep_alive
    assert all(c is not conn for idle in harness.pool._idle.values() for c in idle)


def test_a_known_head_whose_body_is_cut_by_the_replica_is_not_an_answer(
        harness: Harness) -> None:
    """The connection ends before the body its Content-Length gives: a failed try (the next
    replica gets the request), never a short body passed back as the answer."""
    harness.request(get(b"Host: a.test"), ANSWER)
    harness.check()
    end = ANSWER.index(b"\r\n\r\n") + 4
    first, _ = harness.send(get(b"Host: a.test"))
    first.data_received(ANSWER[:end + 5])
    first.connection_lost(None)
    harness.loop.run_until_complete(asyncio.sleep(0.01))  # the walk goes on to the next one
    assert not harness.client_transport.written  # no short reply
    retried = [conn for conn, transport in harness.replicas.values() if transport.written]
    assert len(retried) == 1 and retried[0] is not first
    retried[0].data_received(ANSWER)
    harness.loop.run_until_complete(asyncio.sleep(0.01))
    harness.check()


def test_bytes_after_a_known_answer_end_that_connection(harness: Harness) -> None:
    """The stray bytes are never read as the next request's answer: the connection is not
    kept, whether or not its head was known."""
    harness.request(get(b"Host: a.test"), ANSWER)
    harness.check()
    conn, _ = harness.send(get(b"Host: a.test"))
    conn.data_received(ANSWER + b"HTTP/1.1 200 OK\r\n")
    harness.check()
    assert conn.closed
    assert all(c is not conn for idle in harness.pool._idle.values() for c in idle)


def test_a_known_head_that_closes_the_connection_still_closes_it(harness: Harness) -> None:
    closing = answer(b"{}", b"Connection: close")
    for _ in range(2):
        conn, _ = harness.send(get(b"Host: a.test"))
        conn.data_received(closing)
        assert harness.replies().endswith(b"{}")
        assert not conn.keep_alive and conn.closed
        harness.pool.release("unused", conn)  # as the forwarder would: closed, not kept
        # The harness's connection for that replica is gone; give it a fresh one.
        harness.reconnect(conn)


@pytest.mark.parametrize(("fields", "status", "length", "framed"), [
    ([(b"Content-Length", b"2")], 200, 2, True),
    ([(b"Transfer-Encoding", b"chunked")], 200, None, True),
    ([(b"Content-Length", b"2"), (b"Content-Length", b"2")], 200, None, True),
    ([], 200, None, False),  # delimited by the close
    ([(b"Content-Length", b"0")], 204, None, True),
    ([], 304, None, True),
])
def test_what_a_head_says_about_its_body(fields: list[tuple[bytes, bytes]], status: int,
                                          length: int | None, framed: bool) -> None:
    """Only a head whose one Content-Length alone frames the body may be taken whole."""
    head = read_answer_head(status, fields, keep_alive=True)
    assert (head.length, head.framed) == (length, framed)


# -- a GET whose header bytes the parser read before on the connection ---------------------------
KNOWN_FIELDS = b"Host: a.test\r\nX-A: 1\r\n\r\n"


def plain(line: bytes, fields: bytes = KNOWN_FIELDS) -> bytes:
    return line + b"\r\n" + fields


class CountingParser:
    """The connection's own parser, counting what it is fed."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += 1
        self.real.feed_data(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def outcome(harness: Harness, raw: bytes) -> tuple[bytes, ...]:
    """What ``raw`` comes to on the harness's connection: what a replica got (but the request
    id and the replica's address: with no ``id`` the key is random) and the reply's status
    line; or the reply the balancer gave itself."""
    harness.client.data_received(raw)
    for conn, transport in harness.replicas.values():
        if transport.written:
            sent = b"".join(transport.written)
            transport.written.clear()
            conn.data_received(ANSWER)
            return (re.sub(rb"X-Request-ID: \w+\r\n|(?<=Host: 127.0.0.1:)\d+", b"", sent),
                    harness.replies().split(b"\r\n")[0])
    return (harness.replies(),)


def learned(harness: Harness) -> CountingParser:
    """The connection after one plain GET with ``KNOWN_FIELDS``: those bytes are known."""
    outcome(harness, plain(b"GET /home?id=123456 HTTP/1.1"))
    assert harness.client.known is not None
    assert harness.client.known.fields == KNOWN_FIELDS
    harness.client.parser = parser = CountingParser(harness.client.parser)  # type: ignore[assignment]
    return parser


def test_a_get_with_known_header_bytes_goes_out_as_the_parser_would_send_it(
        two: tuple[Harness, Harness]) -> None:
    fresh, known = two
    parser = learned(known)
    for line in (b"GET /home?id=654321 HTTP/1.1", b"GET /home HTTP/1.1", b"GET / HTTP/1.1",
                 b"GET /%68ome?a=1&b=%20;c@d:e HTTP/1.1", b"GET /a/b/../c?x=~y!$'()*+,- HTTP/1.1"):
        want = outcome(fresh, plain(line))
        assert outcome(known, plain(line)) == want
        assert want[0].startswith(line + b"\r\nHost: ")  # to a replica, the target as it came
    assert parser.fed == 0  # none of them met the parser


@pytest.mark.parametrize("raw", [
    plain(b"GET /home?id=654321 HTTP/1.1", b"Host: a.test\r\nX-A: 2\r\n\r\n"),  # other fields
    plain(b"GET /home?id=654321 HTTP/1.1", b"Host: a.test\r\nX-A: 1\r\n\r\n\r\n"),  # more after
    plain(b"GET /home HTTP/1.0"),
    plain(b"GET /home#frag HTTP/1.1"),
    plain(b"GET http://b.test/home?id=1 HTTP/1.1"),  # absolute form
    plain(b"GET /h\xc3\xa9 HTTP/1.1"),  # not ASCII: 400
    plain(b"GET /" + b"a" * 5000 + b" HTTP/1.1"),  # over the request-line limit: 414
    plain(b"get /home HTTP/1.1"),
    plain(b"GET /a b HTTP/1.1"),
    plain(b"GET  /home HTTP/1.1"),
    plain(b"GET /home HTTP/1.1 "),
], ids=["other-fields", "bytes-after", "http10", "fragment", "absolute", "non-ascii",
        "long-line", "lower-case", "space", "two-spaces", "trailing-space"])
def test_anything_but_a_plain_get_with_the_known_bytes_meets_the_parser(
        two: tuple[Harness, Harness], raw: bytes) -> None:
    """The same outcome as on a connection that knows nothing, and the parser saw it."""
    fresh, known = two
    parser = learned(known)
    got = outcome(known, raw)
    assert got == outcome(fresh, raw) and got != (b"",)
    assert parser.fed == 1


def test_known_requests_in_one_read_or_split_over_two_meet_the_parser(harness: Harness) -> None:
    parser = learned(harness)
    two = plain(b"GET /home?id=1 HTTP/1.1") + plain(b"GET /home?id=2 HTTP/1.1")
    harness.client.data_received(two)  # pipelined: both answered, in order
    for n in (1, 2):
        conn, transport = next((c, t) for c, t in harness.replicas.values() if t.written)
        assert b"".join(transport.written).startswith(b"GET /home?id=%d " % n)
        transport.written.clear()
        conn.data_received(ANSWER)
        harness.loop.run_until_complete(asyncio.sleep(0))
        harness.check()
    assert parser.fed == 1
    raw = plain(b"GET /home?id=3 HTTP/1.1")
    harness.client.data_received(raw[:10])
    assert outcome(harness, raw[10:])[0].startswith(b"GET /home?id=3 ")
    assert parser.fed == 3
    assert outcome(harness, plain(b"GET /home?id=4 HTTP/1.1"))[0].startswith(b"GET /home?id=4 ")
    assert parser.fed == 3  # known again


def test_a_request_that_ends_the_connection_teaches_nothing(harness: Harness) -> None:
    outcome(harness, plain(b"GET /home HTTP/1.1", b"Host: a.test\r\nConnection: close\r\n\r\n"))
    assert harness.client.known is None


def test_the_known_path_keeps_the_request_line_limit_to_the_byte(
        two: tuple[Harness, Harness]) -> None:
    """A request line of exactly the limit (4,094 bytes in the harness) is served without the
    parser; one byte more meets it, and its 414."""
    fresh, known = two
    parser = learned(known)
    longest = b"GET /home?id=1&pad=" + b"x" * (4094 - 28) + b" HTTP/1.1"
    assert len(longest) == 4094
    assert outcome(known, plain(longest)) == outcome(fresh, plain(longest))
    assert parser.fed == 0
    over = longest.replace(b"pad=", b"pad=x")
    got = outcome(known, plain(over))
    assert got == outcome(fresh, plain(over)) and got[0].startswith(b"HTTP/1.1 414 ")
    assert parser.fed == 1
