"""The client connection's states (``lb.aio.server.ClientConnection``), driven in-process with
in-memory transports, as uvicorn's protocol tests do: the real server, forwarder, pool and
router (``tests/helpers_aio.py``), bytes fed as a client and a replica would send them.

The reading side is a ``Phase`` whose every change must be one of ``NEXT``; the answering side
answers one request at a time, in order, a refusal in its turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.aio.server import BETWEEN, BODY, CLOSED, HEADERS, LAST, NEXT, ClientConnection, Phase
from tests.helpers_aio import ANSWER, Harness, Transport
from tests.helpers_aio import BODY as ANSWER_BODY


def get(n: int, *fields: bytes) -> bytes:
    return b"\r\n".join([b"GET /home?id=%d HTTP/1.1" % n, b"Host: a.test", *fields]) + b"\r\n\r\n"


class Recorded(Harness):
    """A harness whose connection records every change of phase it makes."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.changes: list[tuple[Phase, Phase]] = []
        client = self.client
        to = client._to

        def recording(phase: Phase) -> None:
            self.changes.append((client.phase, phase))
            to(phase)

        client._to = recording  # type: ignore[method-assign]

    @property
    def transport(self) -> Transport:
        return self.client_transport

    def answer_all(self) -> int:
        """Answer every request a replica got, in order; how many were answered."""
        answered = 0
        while True:
            pending = [(c, t) for c, t in self.replicas.values() if t.written]
            if not pending:
                return answered
            for conn, transport in pending:
                transport.written.clear()
                conn.data_received(ANSWER)
                answered += 1

    def lost(self) -> None:
        """What the loop does once a closed transport is gone."""
        self.client.connection_lost(None)


@pytest.fixture()
def harness(tmp_path: Path) -> Iterator[Recorded]:
    made = Recorded(str(tmp_path))
    yield made
    assert all(change in NEXT_PAIRS for change in made.changes), made.changes
    made.close()


NEXT_PAIRS = {(before, after) for before, nexts in NEXT.items() for after in nexts}


def statuses(reply: bytes) -> list[bytes]:
    """The status lines in ``reply``, in order (the bodies here hold none)."""
    return re.findall(rb"HTTP/1\.1 \d\d\d [^\r\n]*", reply)


def test_the_table_refuses_every_change_it_does_not_list(harness: Recorded) -> None:
    client = harness.client
    for before in Phase:
        for after in Phase:
            client.phase = before
            if after in NEXT[before]:
                ClientConnection._to(client, after)
                assert client.phase is after
            else:
                with pytest.raises(AssertionError, match=f"{before.name} to {after.name}"):
                    ClientConnection._to(client, after)
    client.phase = BETWEEN


def test_a_request_read_in_pieces_passes_through_each_phase_in_turn(harness: Recorded) -> None:
    raw = get(1)
    harness.client.data_received(raw[:10])
    assert harness.client.phase is HEADERS
    harness.client.data_received(raw[10:])
    assert harness.changes == [(BETWEEN, HEADERS), (HEADERS, BODY), (BODY, BETWEEN)]
    assert harness.answer_all() == 1
    assert statuses(harness.replies()) == [b"HTTP/1.1 200 OK"]
    assert harness.client.answering is None and not harness.transport.closed


def test_the_known_request_shortcut_changes_no_phase(harness: Recorded) -> None:
    """A request whose header bytes the parser read before is taken whole: the connection
    stays between requests, as it would after the parser read it."""
    harness.client.data_received(get(1))
    harness.answer_all()
    assert harness.client.known is not None
    harness.changes.clear()
    for n in range(2, 6):
        harness.client.data_received(get(n))
        assert harness.answer_all() == 1
    assert harness.changes == [] and harness.client.phase is BETWEEN
    assert statuses(harness.replies()) == [b"HTTP/1.1 200 OK"] * 5


def test_pipelined_requests_are_answered_one_at_a_time_in_order(harness: Recorded) -> None:
    harness.client.data_received(get(1) + get(2) + get(3))
    # The second goes out only once the first is answered.
    assert sum(1 for _, t in harness.replicas.values() if t.written) == 1
    assert len(harness.client.queue) == 2 and harness.client.phase is BETWEEN
    served = []
    for _ in range(3):
        (conn, transport), = [(c, t) for c, t in harness.replicas.values() if t.written]
        served.append(transport.written[0].split(b"\r\n")[0])
        transport.written.clear()
        conn.data_received(ANSWER)
    assert served == [b"GET /home?id=%d HTTP/1.1" % n for n in (1, 2, 3)]
    assert harness.replies().count(ANSWER_BODY) == 3
    assert not harness.client.queue and harness.client.answering is None


def test_a_full_pipeline_pauses_reading_until_the_queue_drains(harness: Recorded) -> None:
    from lb.aio.server import PIPELINE_DEPTH

    harness.client.data_received(b"".join(get(n) for n in range(PIPELINE_DEPTH + 1)))
    assert harness.transport.paused and len(harness.client.queue) == PIPELINE_DEPTH
    assert harness.answer_all() == PIPELINE_DEPTH + 1
    assert not harness.transport.paused  # reading again once nothing waits


def test_a_request_that_asks_to_close_is_the_last_and_later_bytes_are_ignored(
        harness: Recorded) -> None:
    harness.client.data_received(get(1, b"Connection: close") + get(2))
    assert harness.client.phase is LAST and (BODY, LAST) in harness.changes
    harness.client.data_received(get(3))  # read no more: dropped
    assert harness.answer_all() == 1
    reply = harness.replies()
    assert statuses(reply) == [b"HTTP/1.1 200 OK"] and b"Connection: close\r\n" in reply
    assert harness.transport.closed and not harness.transport.aborted
    harness.lost()
    assert harness.client.phase is CLOSED


def test_an_http_1_0_request_is_the_last(harness: Recorded) -> None:
    harness.client.data_received(b"GET /home?id=1 HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert harness.client.phase is LAST
    harness.answer_all()
    assert harness.transport.closed


def test_a_half_close_after_whole_requests_still_gets_their_answers(harness: Recorded) -> None:
    harness.client.data_received(get(1) + get(2))
    assert harness.client.eof_received() is True  # the way back stays open
    assert harness.client.phase is LAST
    assert harness.answer_all() == 2
    reply = harness.replies()
    assert statuses(reply) == [b"HTTP/1.1 200 OK"] * 2
    assert reply.count(b"Connection: keep-alive") == 1 and reply.count(b"Connection: close") == 1
    assert harness.transport.closed


def test_a_half_close_with_nothing_to_answer_ends_the_connection(harness: Recorded) -> None:
    assert not harness.client.eof_received()
    harness.client.data_received(get(1)[:12])  # half a request: dropped with the connection
    assert not harness.client.eof_received()


def test_a_refusal_waits_behind_the_answer_before_it_then_ends_the_connection(
        harness: Recorded) -> None:
    harness.client.data_received(get(1))
    harness.client.data_received(b"GET /a b HTTP/1.1\r\nHost: a.test\r\n\r\n")  # two spaces
    assert harness.client.phase is LAST and harness.transport.paused
    assert harness.replies() == b""  # the first request's answer goes first
    harness.client.data_received(get(3))  # nothing more is read
    assert harness.answer_all() == 1
    reply = harness.replies()
    assert statuses(reply) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert reply.index(ANSWER_BODY) < reply.index(b"400 Bad Request")
    assert harness.transport.closed and harness.client.phase is CLOSED
    harness.lost()  # the transport says so in turn: closed again, nothing changes
    assert harness.client.phase is CLOSED


def test_a_refusal_with_nothing_before_it_goes_out_at_once(harness: Recorded) -> None:
    harness.client.data_received(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
    assert statuses(harness.replies()) == [b"HTTP/1.1 414 Request URI Too Long"]
    assert harness.transport.closed and harness.client.phase is CLOSED
    assert (HEADERS, LAST) in harness.changes and (LAST, CLOSED) in harness.changes


def test_a_body_announced_over_the_limit_ends_reading(harness: Recorded) -> None:
    too_large = harness.client.server.limits.body + 1
    harness.client.data_received(b"POST /add HTTP/1.1\r\nHost: a.test\r\n"
                                 b"Content-Length: %d\r\n\r\n" % too_large)
    assert harness.client.phase is LAST and harness.transport.paused
    assert harness.client.answering is not None and harness.client.answering.body_too_large


def test_a_head_that_never_completes_is_dropped_at_its_deadline(harness: Recorded) -> None:
    client = harness.client
    client.data_received(get(1)[:20])
    assert client.phase is HEADERS
    timeout = client.server.settings.client_timeout
    client.check_deadline(client.request_deadline - timeout / 2)
    assert not harness.transport.closed
    client.check_deadline(client.request_deadline + 0.01)
    assert harness.transport.aborted


def test_a_body_that_never_completes_is_answered_408_by_the_app(harness: Recorded) -> None:
    client = harness.client
    client.data_received(b"POST /add HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nab")
    assert client.phase is BODY
    client.check_deadline(client.request_deadline + 0.01)
    assert client.phase is LAST and (BODY, LAST) in harness.changes
    request = client.answering
    assert request is not None and request.body_error is not None and not request.keep_alive


def test_an_idle_connection_ends_after_the_keepalive_time(harness: Recorded) -> None:
    client = harness.client
    client.data_received(get(1))
    harness.answer_all()
    client.check_deadline(client.idle_deadline - 0.01)
    assert not harness.transport.closed
    client.check_deadline(client.idle_deadline + 0.01)
    assert harness.transport.closed and not harness.transport.aborted


def test_a_busy_connection_is_not_idle_whatever_the_clock(harness: Recorded) -> None:
    client = harness.client
    client.data_received(get(1))
    client.check_deadline(client.idle_deadline + 60)
    assert not harness.transport.closed  # its answer is still on the way
    harness.answer_all()
    assert statuses(harness.replies()) == [b"HTTP/1.1 200 OK"]


def test_a_graceful_shut_closes_idle_connections_and_lets_busy_ones_finish(
        harness: Recorded) -> None:
    client = harness.client
    client.data_received(get(1))
    client.server.shut(graceful=True)
    assert not harness.transport.closed
    harness.answer_all()
    reply = harness.replies()
    assert b"Connection: close\r\n" in reply and harness.transport.closed


def test_a_client_gone_mid_request_leaves_nothing_to_answer(harness: Recorded) -> None:
    client = harness.client
    client.data_received(get(1))
    harness.lost()
    assert client.phase is CLOSED and client not in client.server.connections
    assert harness.answer_all() == 1  # the replica's answer comes, and goes nowhere
    assert harness.replies() == b""
