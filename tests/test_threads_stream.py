"""The threads worker passing replicas' answers on, end to end: gunicorn's threads worker (one
worker, no supervisor) in front of scripted replicas (``tests.helpers_scripted``), raw sockets
or ``requests`` on the client side.

What only a real worker shows: the memory a huge answer costs it, a client's connection cut
when the replica breaks off mid-answer (never a second status), and the header fields gunicorn
itself adds or keeps.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

from tests.helpers_chaos import report
from tests.helpers_scripted import ScriptedReplica, Step, answer, threads_balancer

pytestmark = pytest.mark.system
KEY = 123456
MIB = 1 << 20


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[ScriptedReplica, ScriptedReplica]]:
    a, b = ScriptedReplica(), ScriptedReplica()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory,
             replicas: tuple[ScriptedReplica, ScriptedReplica]) -> Iterator[tuple[str, int]]:
    """The balancer's URL and its worker's pid."""
    a, b = replicas
    with threads_balancer(tmp_path_factory.mktemp("stream"), [a.address, b.address],
                          strategy="maglev", hash_key="query:k", read_timeout=1.0,
                          upstream_timeout=1.0) as (url, proc):
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 1
        yield url, workers[0].pid


@pytest.fixture
def first(balancer: tuple[str, int],
          replicas: tuple[ScriptedReplica, ScriptedReplica]) -> Iterator[ScriptedReplica]:
    """The replica ``KEY`` goes to (the other answers cleanly); each test scripts it anew."""
    url, _ = balancer
    for replica in replicas:
        name = replica.address.encode()
        replica.script = lambda n, head, name=name: [answer(b"from " + name)]
    served = requests.get(f"{url}/which?k={KEY}", timeout=10).text
    chosen = next(r for r in replicas if r.address in served)
    time.sleep(0.05)
    for replica in replicas:
        replica.heads.clear()
    yield chosen


def other(replicas: tuple[ScriptedReplica, ScriptedReplica],
          chosen: ScriptedReplica) -> ScriptedReplica:
    return replicas[1] if replicas[0] is chosen else replicas[0]


def raw_get(url: str, target: str, method: str = "GET") -> bytes:
    """Everything the balancer sends back to one request, until it closes the connection."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                     .encode())
        raw = b""
        while data := sock.recv(65536):
            raw += data
    return raw


def test_a_huge_answer_streams_through_in_bounded_memory(
        balancer: tuple[str, int], first: ScriptedReplica) -> None:
    """400 MiB through the worker: its resident memory hardly moves (it held the whole
    answer, and werkzeug's copy, before)."""
    url, pid = balancer
    piece = b"z" * MIB
    size = 400 * MIB
    first.script = lambda n, head: [answer(b"", "200 OK", f"Content-Length: {size}"),
                                    *[piece] * 400]
    worker = psutil.Process(pid)
    before = worker.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], worker.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.monotonic()
    received = 0
    with requests.get(f"{url}/huge?k={KEY}", stream=True, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["Content-Length"] == str(size)
        for data in reply.iter_content(MIB):
            received += len(data)
    seconds = time.monotonic() - began
    done.set()
    sampler.join()
    growth = (peak[0] - before) / MIB
    report("threads worker: a 400 MiB answer", rss_before_mib=round(before / MIB, 1),
           rss_growth_mib=round(growth, 1), seconds=round(seconds, 2))
    assert received == size
    assert growth < 64, f"the worker grew by {growth:.0f} MiB"


@pytest.mark.parametrize("how", ["closes", "stalls"])
def test_a_replica_that_breaks_off_mid_answer_cuts_the_client(
        balancer: tuple[str, int], replicas: tuple[ScriptedReplica, ScriptedReplica],
        first: ScriptedReplica, how: str) -> None:
    """The head and 256 KiB of a 1 MiB answer have gone to the client when the replica
    closes, or goes quiet past LB_READ_TIMEOUT: the client's connection ends there, short of
    the length it was promised; no second status, no second replica."""
    url, _ = balancer
    end: list[Step] = [None] if how == "closes" else [3.0]
    first.script = lambda n, head: [answer(b"", "200 OK", f"Content-Length: {MIB}"),
                                    b"y" * (256 * 1024), *end]
    raw = raw_get(url, f"/cut?k={KEY}")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"content-length: {MIB}".encode() in head.lower()
    assert 0 < len(body) < MIB and set(body) == {ord("y")}  # cut short; nothing else after it
    assert other(replicas, first).requests == 0


def test_head_is_answered_with_the_replicas_length(
        balancer: tuple[str, int], first: ScriptedReplica) -> None:
    url, _ = balancer
    first.script = lambda n, head: [answer(b"", "200 OK", "Content-Length: 1234")]
    raw = raw_get(url, f"/h?k={KEY}", "HEAD")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert first.heads[0].startswith(b"HEAD /h?k=")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nContent-Length: 1234\r\n" in head
    assert body == b""


@pytest.mark.parametrize(("method", "status"), [
    ("GET", "204 No Content"), ("GET", "304 Not Modified"), ("HEAD", "304 Not Modified"),
    ("HEAD", "204 No Content"),
])
def test_no_length_on_answers_without_a_body(
        balancer: tuple[str, int], first: ScriptedReplica, method: str, status: str) -> None:
    url, _ = balancer
    first.script = lambda n, head: [answer(b"", status, "Content-Length: 1234")]
    raw = raw_get(url, f"/b?k={KEY}", method)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    lower = head.lower()
    assert b"content-length" not in lower and b"transfer-encoding" not in lower, head
    assert body == b""
