"""What the balancer may trust of a replica, and what it owes each client: one answer per
request, its own.

A real stack per worker (``lb_worker``) whose two replicas break HTTP on purpose
(``tests.helpers_misbehave``): interim answers, a 204 with a body, answers nobody asked for,
bytes on an idle kept-alive connection, a 101, slow, hung and stalled answers, oversized heads.
Victims ask ``/echo?id=<unique>`` and check that the answer they get carries their id: a
balancer that pools a connection after a misbehaving answer hands the rest of it to the next
request on that connection. Then the client side: pipelined requests, a client that half-closes
after its request, and administration that stays prompt while replicas hang.

Timeouts are short here (``LB_UPSTREAM_TIMEOUT=2``, first byte; ``LB_READ_TIMEOUT=1``, between
reads) so that the slow cases take seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import RunningStack
from tests.helpers_chaos import balancer_workers_of, report
from tests.helpers_echo import start_echo_replica
from tests.helpers_misbehave import Client, Reply, counts, start_misbehaving_replica
from tests.helpers_stack import running_stack

pytestmark = pytest.mark.system

UPSTREAM_TIMEOUT = 2.0
READ_TIMEOUT = 1.0
SOAK_SECONDS = 6.0
EXPECT_SOAK_SECONDS = 4.0


@dataclass
class Odd:
    """A stack and its two misbehaving replicas (hostname -> address)."""

    stack: RunningStack
    replicas: dict[str, str]
    worker: str

    @property
    def url(self) -> str:
        return self.stack.url

    def counts(self, path: str) -> int:
        return sum(counts(address)[path] for address in self.replicas.values())


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, lb_worker: str) -> Iterator[Odd]:
    with running_stack(tmp_path_factory.mktemp("trust"), lb_worker, n=0,
                       upstream_timeout=UPSTREAM_TIMEOUT, read_timeout=READ_TIMEOUT) as stack:
        replicas = {}
        for name in ("odd-1", "odd-2"):
            entry = start_misbehaving_replica(stack.registry, stack.settings.deployment, name)
            replicas[name] = entry.address or ""
        yield Odd(stack, replicas, lb_worker)


@pytest.fixture
def fresh(odd: Odd) -> Odd:
    """The stack with new balancer workers: no kept-alive replica connection a test before
    left in some state (on a balancer that pools a connection after a misbehaving answer,
    what is left on it would come out as the answer to a later test's request)."""
    old = {p.pid for p in balancer_workers_of(odd.stack.proc.pid)}
    for pid in old:
        try:
            os.kill(pid, signal.SIGQUIT)  # quick: gunicorn's arbiter starts another
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    why = ""
    while time.monotonic() < deadline:
        now = {p.pid for p in balancer_workers_of(odd.stack.proc.pid)}
        why = f"workers {sorted(now)} (were {sorted(old)})"
        log = odd.stack.log()
        # Each new worker has its signal handlers once its app is loaded (this line): until
        # then, a later test's signal would be lost.
        if (len(now) == odd.stack.settings.workers and not now & old
                and all(f"balancer worker {pid} starts" in log for pid in now)):
            try:
                with Client(odd.url, timeout=2) as client:
                    reply = client.get("/rep", "Connection: close")
                if reply.status == 200:
                    return odd
                why += f", /rep: {reply}"
            except (OSError, EOFError, ValueError) as exc:
                why += f", /rep: {exc!r}"
        time.sleep(0.1)
    raise AssertionError(f"the balancer's workers were not replaced within 30 s: {why}")


def own(reply: Reply, rid: str) -> bool:
    """The victim's own answer: 200, its id in the header and in the body."""
    if reply.status != 200 or reply.header("X-Echo-Id") != rid:
        return False
    try:
        return reply.json().get("id") == rid
    except ValueError:
        return False


def assert_envelope(reply: Reply, status: int) -> None:
    assert reply.status == status, reply
    assert reply.header("Content-Type") == "application/json", reply
    body = reply.json()
    assert set(body) == {"message", "status"} and body["status"] == "failure", body
    assert str(body["message"]).startswith("<Error> "), body


# -- what the balancer passes back -----------------------------------------------------------------
def test_a_replicas_own_served_by_and_request_id_are_replaced(odd: Odd) -> None:
    with Client(odd.url) as client:
        for header in ((), ("X-Request-ID: mine-1",)):
            rid = uuid.uuid4().hex
            reply = client.get(f"/echo?id={rid}", *header)
            assert own(reply, rid), reply
            assert reply.all("X-Served-By") == [reply.json()["replica"]], reply.headers
            ids = reply.all("X-Request-ID")
            assert len(ids) == 1 and ids[0] != "replica-own", reply.headers
            if header:
                assert ids == ["mine-1"]


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_length_on_a_reply_without_a_body(odd: Odd, status: int) -> None:
    """RFC 9110 section 8.6: no Content-Length on 1xx and 204 (nor on a 304 passed back with
    none); the connection goes on serving."""
    with Client(odd.url) as client:
        reply = client.get(f"/{status}")
        assert reply.status == status, reply
        assert reply.header("Content-Length") is None, reply.headers
        assert reply.header("Transfer-Encoding") is None, reply.headers
        rid = uuid.uuid4().hex
        assert own(client.get(f"/echo?id={rid}"), rid)


# -- slow, hung and broken answers -----------------------------------------------------------------
def test_a_slow_but_steady_answer_is_passed_through(odd: Odd) -> None:
    """A byte every 0.2 s for 4 s (twice LB_UPSTREAM_TIMEOUT): each read comes well within
    LB_READ_TIMEOUT, so the answer is whole, not cut at the first-byte deadline."""
    began = time.monotonic()
    with Client(odd.url, timeout=30) as client:
        reply = client.get("/drip?n=20&every=0.2")
    assert reply.status == 200 and reply.body == b"d" * 20, reply
    assert time.monotonic() - began >= 4.0


def test_a_hung_replica_is_a_504_in_the_envelope(odd: Odd) -> None:
    began = time.monotonic()
    with Client(odd.url, timeout=30) as client:
        reply = client.get("/hang", "Connection: close")
    took = time.monotonic() - began
    assert_envelope(reply, 504)
    assert took < 2 * UPSTREAM_TIMEOUT + 3, took  # both replicas tried, each its deadline


def test_an_answer_that_stalls_midway_is_cut_and_never_retried(odd: Odd) -> None:
    """100 of 1,000 announced bytes, then silence past LB_READ_TIMEOUT: the client's answer
    is cut (or a 504 if nothing of it was sent yet), and no other replica gets the request."""
    before = odd.counts("/stall")
    began = time.monotonic()
    with Client(odd.url, timeout=30) as client:
        try:
            reply: Reply | None = client.get("/stall")
        except (EOFError, OSError):
            reply = None
    took = time.monotonic() - began
    time.sleep(0.5)
    sent = odd.counts("/stall") - before
    problems = []
    if sent != 1:
        problems.append(f"the request reached replicas {sent} times (retried after a stall)")
    if reply is not None and reply.status == 200:
        if len(reply.body) >= 1000:
            problems.append("a stalled answer was completed?")
    elif reply is not None and (reply.status != 504
                                or reply.header("Content-Type") != "application/json"):
        problems.append(f"neither cut nor a 504 envelope: {reply}")
    if took >= UPSTREAM_TIMEOUT + READ_TIMEOUT + 3:
        problems.append(f"took {took:.1f}s")
    assert not problems, problems


@pytest.mark.parametrize("path", ["/bighead", "/manyfields"])
def test_an_oversized_answer_head_is_a_502(odd: Odd, path: str) -> None:
    """200 KB of header fields, or 5,000 of them: the replica broke the protocol."""
    with Client(odd.url, timeout=30) as client:
        reply = client.get(path, "Connection: close")
    assert_envelope(reply, 502)


# -- the client side: pipelining and half-close --------------------------------------------------
def test_pipelined_http10_requests_get_the_first_answer_then_a_close(odd: Odd) -> None:
    with Client(odd.url, timeout=10) as client:
        client.send(b"GET /home HTTP/1.0\r\n\r\nGET /home HTTP/1.0\r\n\r\n")
        reply = client.read()
        assert reply.status == 200 and b"Hello from Server: " in reply.body, reply
        assert client.at_eof(), "a second answer (or nothing, and no close) after an HTTP/1.0 one"


MALFORMED = b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n"


@pytest.mark.parametrize("gap", [0.0, 0.2], ids=["one write", "while the first is in flight"])
def test_a_valid_request_before_a_malformed_one_is_answered_first(odd: Odd,
                                                                  gap: float) -> None:
    rid = uuid.uuid4().hex
    first = f"GET /echo?id={rid}&delay=0.5 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with Client(odd.url, timeout=10) as client:
        if gap:
            client.send(first)
            time.sleep(gap)
            client.send(MALFORMED)
        else:
            client.send(first + MALFORMED)
        reply = client.read()
        assert own(reply, rid), reply
        refusal = client.read()
        assert_envelope(refusal, 400)
        assert client.at_eof()


def test_pipelined_keep_alive_requests_are_answered_in_order(odd: Odd) -> None:
    rids = [uuid.uuid4().hex for _ in range(6)]
    batch = b"".join(f"GET /echo?id={rid}&delay={0.1 * (i % 2)} HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode() for i, rid in enumerate(rids))
    with Client(odd.url, timeout=10) as client:
        client.send(batch)
        got = [client.read() for _ in rids]
    assert [r.header("X-Echo-Id") for r in got] == rids
    assert all(own(r, rid) for r, rid in zip(got, rids))


HALF_CLOSED = {
    "home": (b"GET /home HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "rep": (b"GET /rep HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "add": ((b"POST /add HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 35\r\n\r\n{\"n\": 1, \"hostnames\": [\"a1\", \"b2\"]}"), 400),
}


@pytest.mark.parametrize("name", list(HALF_CLOSED))
def test_a_client_that_half_closes_after_its_request_gets_its_answer(odd: Odd,
                                                                     name: str) -> None:
    request, status = HALF_CLOSED[name]
    with Client(odd.url, timeout=10) as client:
        client.send(request)
        client.sock.shutdown(socket.SHUT_WR)
        reply = client.read()
        assert reply.status == status, reply
        if status == 400:
            assert_envelope(reply, 400)
            assert "more than newly added" in str(reply.json()["message"])
        assert client.at_eof()


# -- attacks: each a request that makes the replica misbehave (on new workers each time) ----------
ATTACKS = {
    # The client asks for 100-continue on a GET: a replica asked in turn answers 100 first.
    "expect": ("/echo?id={id}", ("Expect: 100-continue",)),
    "early-hints": ("/early-hints?id={id}", ()),  # 103, then the answer
    "continue": ("/continue?id={id}", ()),  # an unasked 100, then the answer
    "204-body": ("/204-body", ()),  # a 204 followed by bytes
    "extra": ("/extra?id={id}", ()),  # the answer, then a second one nobody asked for
    "late": ("/late?id={id}", ()),  # the answer, then bytes on the idle connection
    "switch": ("/switch", ()),  # 101 Switching Protocols
}


def attack(url: str, kind: str) -> Reply | str:
    """One attack on a connection of its own; its reply (or why there is none)."""
    target, headers = ATTACKS[kind]
    rid = uuid.uuid4().hex
    with Client(url, timeout=10) as client:
        try:
            return client.get(target.format(id=rid), *headers, "Connection: close")
        except (EOFError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"


def whose(reply: Reply) -> str:
    """What a victim got instead of its own answer."""
    echoed = reply.header("X-Echo-Id") or ""
    if echoed.startswith("smuggled-"):
        return f"forged answer ({echoed})"
    if reply.status == 200 and len(echoed) == 32:
        return "another request's answer"
    return f"{reply.status} {echoed or reply.body[:80]!r}"


def victim(url: str) -> tuple[bool, str]:
    rid = uuid.uuid4().hex
    with Client(url, timeout=10) as client:
        reply = client.get(f"/echo?id={rid}")
    return own(reply, rid), whose(reply)


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_a_misbehaving_answer_never_reaches_the_next_request(fresh: Odd, kind: str) -> None:
    """After each attack, the next requests (some of which reuse the connection the attack's
    answer came on) each get their own answer."""
    odd = fresh
    wrong: Counter[str] = Counter()
    for _ in range(5):
        reply = attack(odd.url, kind)
        if kind in ("expect", "early-hints", "continue", "extra", "late"):
            assert isinstance(reply, Reply) and reply.status == 200, (kind, reply)
            assert reply.json()["id"] == reply.header("X-Echo-Id"), (kind, reply)
            for code, fields in reply.interim:  # passed on, or not; never with a length
                assert "content-length" not in {k.lower() for k, _ in fields}, (code, fields)
        elif kind == "204-body":
            assert isinstance(reply, Reply) and reply.status == 204, reply
        if kind == "late":
            time.sleep(0.4)  # the forged answer comes on the connection while it is idle
        for _ in range(10):
            ok, what = victim(odd.url)
            if not ok:
                wrong[what] += 1
    assert not wrong, f"{sum(wrong.values())} of 50 victims got someone else's answer: {wrong}"


def test_the_reply_to_a_101_is_a_502(fresh: Odd) -> None:
    """The balancer never upgrades a connection: a replica that switches protocols broke the
    exchange."""
    reply = attack(fresh.url, "switch")
    assert isinstance(reply, Reply), reply
    assert_envelope(reply, 502)


def test_soak_victims_beside_attackers_get_only_their_own_answers(fresh: Odd) -> None:
    """8 keep-alive victims beside 2 attackers cycling through every attack, for a bounded
    time: not one victim may get someone else's answer."""
    odd = fresh
    stop = time.monotonic() + SOAK_SECONDS
    lock = threading.Lock()
    tally: Counter[str] = Counter()
    wrong: Counter[str] = Counter()  # answers that were not the victim's own
    errors: Counter[str] = Counter()  # no answer at all (a closed connection, garbage)

    def victims() -> None:
        client: Client | None = None
        while time.monotonic() < stop:
            rid = uuid.uuid4().hex
            try:
                client = client or Client(odd.url, timeout=10)
                reply = client.get(f"/echo?id={rid}")
            except (OSError, EOFError, ValueError) as exc:
                with lock:
                    tally["victim errors"] += 1
                    errors[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
                if client is not None:
                    client.close()
                client = None
                continue
            with lock:
                tally["victims"] += 1
                if not own(reply, rid):
                    wrong[whose(reply)] += 1
            if reply.header("Connection") == "close":
                client.close()
                client = None
        if client is not None:
            client.close()

    def attackers() -> None:
        kinds = [k for k in ATTACKS if k != "switch"] + ["switch"]
        i = 0
        while time.monotonic() < stop:
            attack(odd.url, kinds[i % len(kinds)])
            with lock:
                tally[f"attack {kinds[i % len(kinds)]}"] += 1
            i += 1

    threads = [threading.Thread(target=victims) for _ in range(8)]
    threads += [threading.Thread(target=attackers) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SOAK_SECONDS + 30)
    report(f"desync soak ({odd.worker})", wrong=sum(wrong.values()), **tally,
           **{f"wrong: {k}": v for k, v in wrong.items()},
           **{f"error: {k}": v for k, v in errors.items()})
    assert tally["victims"] > 100, tally
    assert not wrong, (f"{sum(wrong.values())} of {tally['victims']} victims' replies were "
                       f"not their own: {dict(wrong)}")
    # A victim's kept-alive connection may meet a close now and then (and reconnects); no
    # more than that.
    assert sum(errors.values()) <= max(2, tally["victims"] // 1000), dict(errors)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory, lb_worker: str) -> Iterator[RunningStack]:
    """A stack whose two replicas are gunicorn echo servers (``tests.helpers_echo``)."""
    with running_stack(tmp_path_factory.mktemp("trust-echo"), lb_worker, n=0) as stack:
        for name in ("echo-1", "echo-2"):
            start_echo_replica(stack.registry, stack.settings.deployment, name)
        yield stack


def test_expect_100_continue_on_a_get_never_desynchronises_gunicorn_replicas(
        echo: RunningStack, lb_worker: str) -> None:
    """The review's case, with real gunicorn replicas (which answer ``100 Continue`` to any
    request that asks, body or not): keep-alive victims beside clients sending
    ``GET /nothere`` (a replica's 404) with ``Expect: 100-continue``."""
    stop = time.monotonic() + EXPECT_SOAK_SECONDS
    lock = threading.Lock()
    tally: Counter[str] = Counter()

    def victims() -> None:
        with Client(echo.url, timeout=10) as client:
            while time.monotonic() < stop:
                rid = uuid.uuid4().hex
                reply = client.get(f"/v?n={rid}")
                try:
                    mine = reply.status == 200 and reply.json().get("query") == f"n={rid}"
                except ValueError:
                    mine = False
                with lock:
                    tally["victims"] += 1
                    tally["wrong"] += not mine

    def attackers() -> None:
        with Client(echo.url, timeout=10) as client:
            while time.monotonic() < stop:
                reply = client.get("/status?code=404", "Expect: 100-continue")
                with lock:
                    tally["attacks"] += 1
                    tally[f"attack answered {reply.status}"] += 1

    threads = [threading.Thread(target=victims) for _ in range(8)]
    threads += [threading.Thread(target=attackers) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=EXPECT_SOAK_SECONDS + 30)
    report(f"expect soak, gunicorn replicas ({lb_worker})", **tally)
    assert tally["victims"] > 100 and tally["attacks"] > 10, tally
    assert tally["wrong"] == 0, f"{tally['wrong']} of {tally['victims']} replies not their own"
    assert tally["attacks"] == tally["attack answered 400"], tally  # the contract's 404


# -- administration while replicas hang (last: it leaves requests in flight for a while) --------
# The event-driven worker's promise only: the threads worker serves every request on one of its
# threads, so hung requests of any method hold them all (LB_THREADS sizes that).
@pytest.mark.parametrize("lb_worker", ["async"], scope="module")
@pytest.mark.parametrize("request_bytes", [
    b"HEAD /hang HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /hang HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
], ids=["HEAD", "GET with a body"])
def test_hung_head_requests_do_not_starve_administration(odd: Odd,
                                                         request_bytes: bytes) -> None:
    """40 ``HEAD`` requests (or GETs with a body) to hung replicas in flight: /_lb/readyz and
    GET /rep still answer within a second (both are routed like a GET, on the event loop, not
    by the Flask threads)."""
    clients = []
    try:
        for _ in range(40):
            client = Client(odd.url, timeout=30)
            client.send(request_bytes)
            clients.append(client)
        time.sleep(0.5)
        slowest = 0.0
        for path in ("/_lb/readyz", "/rep") * 3:
            began = time.monotonic()
            with Client(odd.url, timeout=30) as admin:
                reply = admin.get(path, "Connection: close")
            slowest = max(slowest, time.monotonic() - began)
            assert reply.status == 200, reply
        report(f"admin beside hung {request_bytes.split()[0].decode()}s ({odd.worker})",
               slowest_ms=slowest * 1000)
        assert slowest < 1.0, f"an admin call took {slowest:.2f}s beside 40 hung requests"
    finally:
        for client in clients:
            client.close()
