"""One HTTP grammar for both workers: requests at the edge of HTTP/1.1, byte for byte, against
a real stack, and the status each must get (in the contract's envelope).

Run for the threads worker (``lb_worker`` below); the async worker is held to the same table
once its own parser gives the same answers (add ``"async"`` to the params).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import RunningStack
from tests.helpers_stack import running_stack

pytestmark = pytest.mark.system


@pytest.fixture(scope="module", params=["threads"])
def lb_worker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, lb_worker: str) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("grammar"), lb_worker, n=1) as running:
        yield running


def exchange(stack: RunningStack, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """The raw status line, the header fields (lower-case names) and the body of the answer
    to ``request`` (which should close the connection, or be refused)."""
    with socket.create_connection(("127.0.0.1", stack.settings.port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return status_line, fields, body


def request(line: bytes, *fields: bytes) -> bytes:
    return b"\r\n".join([line, b"Host: balancer.test", *fields, b"Connection: close"]) + \
        b"\r\n\r\n"


CASES = [
    ("no version (HTTP/0.9 form)", b"GET /home\r\n\r\n", 400),
    ("HTTP/2.0", request(b"GET /home HTTP/2.0"), 505),
    ("HTTP/0.9 named", request(b"GET /home HTTP/0.9"), 505),
    ("HTTP/3.0", request(b"GET /home HTTP/3.0"), 505),
    ("two Host fields", request(b"GET /home HTTP/1.1", b"Host: other.test"), 400),
    ("double space", request(b"GET  /home HTTP/1.1"), 400),
    ("trailing space", request(b"GET /home HTTP/1.1 "), 400),
    ("fragment", request(b"GET /rep#frag HTTP/1.1"), 400),
    ("fragment, routed path", request(b"GET /home#top HTTP/1.1"), 400),
    ("OPTIONS *", request(b"OPTIONS * HTTP/1.1"), 405),
    ("CONNECT", request(b"CONNECT host:443 HTTP/1.1"), 405),
    ("TRACE", request(b"TRACE / HTTP/1.1"), 405),
    ("unknown method", request(b"FOO /home HTTP/1.1"), 501),
    ("WebDAV method", request(b"PROPFIND / HTTP/1.1"), 501),
    ("xchunked", request(b"POST /add HTTP/1.1", b"Transfer-Encoding: xchunked"), 400),
    ("gzip, chunked", request(b"POST /add HTTP/1.1", b"Transfer-Encoding: gzip, chunked")
     + b"0\r\n\r\n", 501),
]


@pytest.mark.parametrize(("request_bytes", "status"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_edge_requests_get_one_answer(stack: RunningStack, request_bytes: bytes,
                                      status: int) -> None:
    status_line, fields, body = exchange(stack, request_bytes)
    assert status_line.startswith(b"HTTP/1.1 %d " % status), (status_line, body[:300])
    payload = json.loads(body)
    assert payload["status"] == "failure" and payload["message"].startswith("<Error> ")
    if status == 405:
        assert fields["allow"] == "GET, HEAD"


def test_http_1_2_is_served_as_http_1_1(stack: RunningStack) -> None:
    """RFC 9110 section 6.2: a 1.x request with x > 1 is served, and answered in the version
    the server speaks (gunicorn echoed ``HTTP/1.2 200 OK``)."""
    status_line, _, body = exchange(stack, request(b"GET /home HTTP/1.2"))
    assert status_line == b"HTTP/1.1 200 OK", status_line
    assert json.loads(body)["message"].startswith("Hello from Server: ")
