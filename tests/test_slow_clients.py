"""Slow clients against a real stack (gunicorn in front): LB_CLIENT_TIMEOUT bounds how long one
may hold a balancer thread (lb.threads.worker). The stack has 1 worker with 2 threads, so a few slow
clients would take every thread the balancer has."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.slowloris import attack
from tests.conftest import RunningStack, StackFactory
from tests.helpers_stack import raw_http, stalled_body

pytestmark = pytest.mark.system

TIMEOUT = 1.0  # LB_CLIENT_TIMEOUT of the stack under test
DRIBBLE_FOR = 15.0  # how long a slow client goes on if nobody stops it (bounded: it is a test)


@pytest.fixture
def stack(make_stack: Callable[..., RunningStack]) -> RunningStack:
    return make_stack(n=1, workers=1, threads=2, client_timeout=TIMEOUT)


def connect(stack: RunningStack) -> socket.socket:
    host, port = stack.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=DRIBBLE_FOR)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def dropped(sock: socket.socket) -> bool:
    """Whether the balancer has closed the connection (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


class Slowloris(threading.Thread):
    """Starts a request, then sends one more header byte every 0.2 s (each read makes progress,
    so only a deadline on the whole headers stops it) until the balancer hangs up."""

    def __init__(self, stack: RunningStack) -> None:
        super().__init__(daemon=True)
        self.sock = connect(stack)
        self.held_for: float | None = None  # seconds until the balancer hung up

    def run(self) -> None:
        began = time.monotonic()
        self.sock.sendall(b"GET /home HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - began < DRIBBLE_FOR:
            time.sleep(0.2)
            try:
                self.sock.sendall(b"X")
            except OSError:  # reset or broken pipe: it hung up
                self.held_for = time.monotonic() - began
                break
            if dropped(self.sock):
                self.held_for = time.monotonic() - began
                break
        self.sock.close()


def test_trickled_headers_are_cut_off_and_others_are_served(stack: RunningStack) -> None:
    slow = [Slowloris(stack) for _ in range(4)]  # twice the balancer's threads
    for client in slow:
        client.start()
    time.sleep(0.3)  # they hold both threads now
    began = time.monotonic()
    reply = stack.get("/home", timeout=DRIBBLE_FOR)
    waited = time.monotonic() - began
    for client in slow:
        client.join(DRIBBLE_FOR + 5)
    assert reply.status_code == 200, reply.text
    # Without the deadline the slow clients would have kept every thread until they gave up.
    assert waited < DRIBBLE_FOR - 5, waited
    held = [client.held_for for client in slow]
    assert all(h is not None and h < DRIBBLE_FOR - 5 for h in held), held
    print(f"\n[slow clients] 4 trickling header senders dropped after "
          f"{', '.join(f'{h:.1f}' for h in held if h is not None)} s (LB_CLIENT_TIMEOUT={TIMEOUT:g});"
          f" a normal GET waited {waited:.2f} s")
    log = stack.log()
    assert "request headers not complete within 1s" in log
    assert "Socket error processing request" not in log


def test_a_body_that_stops_coming_gets_408_and_changes_nothing(stack: RunningStack) -> None:
    before = stack.get("/rep").json()
    for method, path in (("POST", "/add"), ("DELETE", "/rm")):
        began = time.monotonic()
        # raw_http reads to the end of the stream: the balancer answers, then closes (gunicorn
        # drains what is left of a body before reusing a connection; that times out too).
        reply = stalled_body(stack.url, method, path)
        assert time.monotonic() - began < DRIBBLE_FOR - 5
        assert reply.status == 408, reply.body[:300]
        assert reply.header("Content-Type") == "application/json"
        assert json.loads(reply.body) == {
            "message": "<Error> The request body did not arrive within LB_CLIENT_TIMEOUT",
            "status": "failure"}
    assert stack.get("/rep").json() == before


def test_a_client_that_goes_quiet_mid_headers_is_dropped(stack: RunningStack) -> None:
    sock = connect(stack)
    sock.sendall(b"GET /home HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    sock.settimeout(DRIBBLE_FOR)
    began = time.monotonic()
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - began < DRIBBLE_FOR - 5
    sock.close()
    # Requests at a normal pace are untouched, also several on one kept-alive connection.
    for _ in range(3):
        assert stack.get("/home").status_code == 200
    reply = raw_http(stack.url, b"GET /rep HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.status == 200


def test_an_attack_of_slow_clients_costs_the_event_driven_worker_no_service(
        tmp_path: Path) -> None:
    """The event-driven worker keeps a slow client in a parser, not a thread: 60 clients
    trickling headers or an admin body (a byte every 1-2 s, reconnecting when dropped) against
    one worker with 2 threads, and a normal client's GETs still get through. The threads worker
    cannot win this (every request it reads holds a thread); the benchmark measures both
    (``bench/slowloris.py``, 200 attackers for 30 s)."""
    factory = StackFactory(tmp_path, "async")
    try:
        stack = factory(n=1, workers=1, threads=2, client_timeout=3.0)
        outcome = attack(stack.url, attackers=60, seconds=6.0, interval=0.1, timeout=2.0,
                         warmup=1.5)
    finally:
        factory.stop_all()
    print(f"\n[slow clients] {outcome.summary()}")
    assert outcome.attack_connections >= 60  # the attack did happen ...
    # Each attacker made progress every 1-2 s, so only a deadline on the whole request (3 s)
    # ends them, for trickled headers and trickled bodies alike.
    assert outcome.dropped_trickling.get("headers", 0) >= 30
    assert outcome.dropped_trickling.get("body", 0) >= 30
    assert outcome.normal_sent >= 20
    assert outcome.success_rate >= 0.99, outcome.summary()
