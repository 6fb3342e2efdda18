"""Property-based tests of /add and /rm with hostile input (hypothesis).

Property: whatever the body, the answer is either a success the contract allows or a
contract-shaped 4xx that changed nothing (the registry file is byte-for-byte the same); never a
5xx, never a partial change. An independent oracle says which inputs are valid.

Most examples run in-process (Flask's test client on ``create_app``, registry in a temp folder,
replicas faked by a backend that "starts" echo servers); a smaller set runs against a real stack
over HTTP, raw oversized and chunked bodies included. ``FUZZ_EXAMPLES`` (default 150) is the
number of examples per property in-process; ``FUZZ_STACK_EXAMPLES`` (default 40) against the
stack.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lb.app import create_app
from lb.balancer import Balancer as BalancerParts  # Balancer: this file's test harness
from lb.registry import READY, Registry
from tests.conftest import RunningStack
from tests.helpers_backend import FakeBackend
from tests.helpers_chaos import env_int, report
from tests.helpers_echo import serve_in_thread
from tests.helpers_stack import raw_http

EXAMPLES = env_int("FUZZ_EXAMPLES", 150)
STACK_EXAMPLES = env_int("FUZZ_STACK_EXAMPLES", 40)
MAX_REPLICAS = 8
MAX_BODY = 4096
VALID_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,62}\Z")  # Docker's rule, 63 at most
TRIED: dict[str, int] = {}


# -- the oracle --------------------------------------------------------------------------------
def expected_ok(endpoint: str, body: Any, members: list[str], everything: list[str]) -> bool:
    """Whether the contract wants a 200 for ``body`` on ``endpoint`` in this state."""
    if not isinstance(body, dict) or not set(body) <= {"n", "hostnames"} or "n" not in body:
        return False
    n, names = body["n"], body.get("hostnames")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return False
    names = [] if names is None else names
    if not isinstance(names, list) or len(names) > n:
        return False
    if not all(isinstance(x, str) and VALID_NAME.match(x) for x in names):
        return False
    if len(set(names)) != len(names):
        return False
    if endpoint == "/add":
        return not set(names) & set(everything) and len(members) + n <= MAX_REPLICAS
    return set(names) <= set(members) and n <= len(members)


# -- an in-process balancer with fake replicas -------------------------------------------------
class Balancer:
    def __init__(self, app: Flask, registry: Registry, backend: FakeBackend) -> None:
        self.app, self.registry, self.backend = app, registry, backend
        self.client: FlaskClient = app.test_client()
        self.pristine = Path(registry.path).read_bytes()

    def reset(self) -> None:
        Path(self.registry.path).write_bytes(self.pristine)

    def snapshot(self) -> bytes:
        return Path(self.registry.path).read_bytes()


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    folder = tmp_path_factory.mktemp("fuzz")
    with serve_in_thread() as echo:
        app = create_app({"registry": str(folder / "registry.json"), "n": 3,
                          "deployment": f"fuzz{uuid.uuid4().hex[:8]}",
                          "max_replicas": MAX_REPLICAS, "max_body": MAX_BODY,
                          "start_timeout": 5.0})
        parts = BalancerParts.of(app)
        backend = FakeBackend.behind(echo)
        parts.admin.backend = backend
        registry = parts.registry
        assert isinstance(registry, Registry)
        with registry.update() as state:  # the bootstrap's three, up and running
            for r in state.replicas:
                r.state, r.address, r.handle = READY, echo, f"fake/{r.hostname}"
        yield Balancer(app, registry, backend)
    report("fuzz: admin endpoints in-process", inputs_tried=sum(TRIED.values()), **TRIED)


def check(balancer: Balancer, method: str, endpoint: str, data: bytes,
          content_type: str | None, body: Any, kind: str) -> None:
    TRIED[kind] = TRIED.get(kind, 0) + 1
    state = balancer.registry.read()
    members = [r.hostname for r in state.members()]
    everything = [r.hostname for r in state.replicas]
    before = balancer.snapshot()
    headers = {"Content-Type": content_type} if content_type else {}
    reply = balancer.client.open(endpoint, method=method, data=data, headers=headers)
    assert reply.status_code < 500, (reply.status_code, reply.get_data()[:300])
    payload = reply.get_json(silent=True)
    assert isinstance(payload, dict), reply.get_data()[:300]
    if reply.status_code == 200:
        assert expected_ok(endpoint, body, members, everything), (body, payload)
        assert payload["status"] == "successful"
        after = balancer.registry.read()
        assert payload["message"] == after.rep()
        n = body["n"]
        assert payload["message"]["N"] == len(members) + (n if endpoint == "/add" else -n)
        assert set(body.get("hostnames") or []) <= set(payload["message"]["replicas"]) \
            if endpoint == "/add" else \
            not set(body.get("hostnames") or []) & set(payload["message"]["replicas"])
        balancer.reset()
    else:
        assert 400 <= reply.status_code < 500
        assert set(payload) == {"message", "status"}, payload
        assert payload["status"] == "failure"
        assert isinstance(payload["message"], str) and payload["message"].startswith("<Error> ")
        assert balancer.snapshot() == before, "a rejected call changed the registry"
        assert not expected_ok(endpoint, body, members, everything) or \
            len(data) > MAX_BODY, (body, payload)


# -- strategies --------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=6),
    max_leaves=25,
)
hostnames = st.one_of(
    st.sampled_from(["Server1", "Server2", "Server3", "S5", "ok-name", "a", "-x", ".x", "_x",
                     "x" * 63, "x" * 64, "a/b", "a b", "a\nb", "ab\n", "ünï", "S5\u0000",
                     "", " ", "S5 ", "ａｂ", "١٢", "𝟘𝟙", "\ud800x", "Server1", "../etc"]),
    st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,70}", fullmatch=True),
    st.text(max_size=80),
)
counts = st.one_of(
    st.integers(min_value=-3, max_value=12),
    st.integers(), st.just(2**63), st.just(10**30),
    st.floats(), st.booleans(), st.none(), st.text(max_size=5),
    st.sampled_from(["1", "1.0", [1], {"n": 1}]),
)
near_valid = st.fixed_dictionaries(
    {"n": counts},
    optional={"hostnames": st.one_of(st.lists(hostnames, max_size=12), st.none(), hostnames,
                                     st.integers(), st.dictionaries(st.text(max_size=3), hostnames)),
              "hostname": hostnames, "N": counts, "extra": json_values},
)
content_types = st.sampled_from([None, "application/json", "text/plain",
                                 "application/x-www-form-urlencoded", "multipart/form-data",
                                 "application/json; charset=utf-16", "garbage/\u00ff"])
endpoints = st.sampled_from([("POST", "/add"), ("DELETE", "/rm")])
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=json_values, where=endpoints, content_type=content_types)
def test_any_json(balancer: Balancer, body: Any, where: tuple[str, str],
                  content_type: str | None) -> None:
    check(balancer, *where, json.dumps(body).encode(), content_type, body, "any_json")


@FUZZ
@given(body=near_valid, where=endpoints, content_type=content_types)
def test_near_valid_bodies(balancer: Balancer, body: dict[str, Any], where: tuple[str, str],
                           content_type: str | None) -> None:
    data = json.dumps(body).encode("utf-8", "surrogatepass")
    check(balancer, *where, data, content_type, body, "near_valid")


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode), where=endpoints)
def test_bytes_that_are_not_json(balancer: Balancer, data: bytes, where: tuple[str, str]) -> None:
    try:
        body = json.loads(data) if data.strip() else {}
    except ValueError:
        body = None  # not JSON: no success possible
    check(balancer, *where, data, "application/json", body, "raw_bytes")


@FUZZ
@given(count=st.integers(min_value=0, max_value=3000), n=st.integers(-1, 10**6),
       where=endpoints, dup=st.booleans())
def test_huge_hostname_lists_and_huge_n(balancer: Balancer, count: int, n: int,
                                        where: tuple[str, str], dup: bool) -> None:
    names = [f"h{i}" for i in range(count)] + (["h0"] if dup and count else [])
    body = {"n": n, "hostnames": names}
    check(balancer, *where, json.dumps(body).encode(), "application/json", body, "huge")


@pytest.mark.parametrize("data", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting beyond any recursion limit (and the body limit)
    b"[" * 2000 + b"]" * 2000,  # within the body limit: JSON nested 2000 deep
    b'{"n": ' + b"9" * 3000 + b"}",  # an integer with more digits than Python converts
    b'{"n": 1e999}', b'{"n": NaN}', b'{"n": -Infinity}',
    b'{"n": 1, "n": 2, "hostnames": ["S5"], "hostnames": ["S6", "S7", "S8"]}',
    b'\xef\xbb\xbf{"n": 1}',  # a UTF-8 byte order mark
    '{"n": 1, "hostnames": ["S\u00e9"]}'.encode("utf-16"),
    b'{"n": 1, "hostnames": ["\\ud800"]}',  # a lone surrogate, escaped
    b"\x00" * 100, b"   \n\t ", b"null", b"[]", b'""', b"0",
    b'{"n": 1}' + b" " * (MAX_BODY + 1),  # valid JSON, one byte over the limit
])
def test_odd_bodies(balancer: Balancer, data: bytes) -> None:
    for method, endpoint in (("POST", "/add"), ("DELETE", "/rm")):
        try:
            body = json.loads(data) if data.strip() else {}
        except (ValueError, RecursionError):
            body = None
        if len(data) > MAX_BODY:
            body = None
        check(balancer, method, endpoint, data, "application/json", body, "odd")


@pytest.mark.parametrize("name", ["a", "7", "-ab", ".ab", "_ab", "a" * 64, "a b", "ab/c", "ab:c",
                                  "ab\n", "ab\x00", "\u00fcber", "ab\u200b", "ＡＢ", ""])
def test_names_docker_would_refuse_are_a_400(balancer: Balancer, name: str) -> None:
    """Not a valid container name, so no backend could start it: the caller's mistake (4xx),
    not a 503 after a failed start. (A one-letter name was accepted, then refused by Docker.)"""
    body = {"n": 1, "hostnames": [name]}
    check(balancer, "POST", "/add", json.dumps(body).encode(), None, body, "bad_names")
    reply = balancer.client.post("/add", json=body)
    assert reply.status_code == 400 and "Invalid hostname" in reply.get_json()["message"]


def test_the_fake_replicas_do_scale(balancer: Balancer) -> None:
    """The oracle's valid side is reachable: the same harness does add and remove."""
    check(balancer, "POST", "/add", b'{"n": 2, "hostnames": ["S5"]}', None,
          {"n": 2, "hostnames": ["S5"]}, "valid")
    check(balancer, "DELETE", "/rm", b'{"n": 2, "hostnames": ["Server2"]}', None,
          {"n": 2, "hostnames": ["Server2"]}, "valid")
    assert balancer.backend.started and balancer.backend.stopped


# -- against a real stack ----------------------------------------------------------------------
def membership(stack: RunningStack) -> list[tuple[str, int, str | None, str]]:
    return sorted((r.hostname, r.server_id, r.handle, r.state) for r in stack.state().replicas)


@pytest.mark.system
def test_hostile_admin_input_against_a_real_stack(make_stack: Callable[..., RunningStack]
                                                  ) -> None:
    stack = make_stack(max_replicas=MAX_REPLICAS, max_body=MAX_BODY)
    before = membership(stack)
    rep = stack.rep()
    tried = 0
    statuses: dict[int, int] = {}

    @settings(max_examples=STACK_EXAMPLES, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(body=near_valid | json_values, where=endpoints)
    def one(body: Any, where: tuple[str, str]) -> None:
        nonlocal tried
        names = [r["hostname"] if isinstance(r, dict) else r for r in rep["replicas"]]
        assume(not expected_ok(where[1], body, names, names))  # nothing may start for real
        method, endpoint = where
        data = json.dumps(body).encode("utf-8", "surrogatepass")
        reply = stack.session.request(method, stack.url + endpoint, data=data, timeout=60)
        tried += 1
        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
        assert 400 <= reply.status_code < 500, (body, reply.status_code, reply.text[:300])
        payload = reply.json()
        assert set(payload) == {"message", "status"} and payload["status"] == "failure"
        assert payload["message"].startswith("<Error> ")

    one()
    big = b'{"n": 1, "hostnames": [' + b'"x",' * (MAX_BODY // 4) + b'"y"]}'
    port = stack.url.rsplit(":", 1)[1]
    # Valid JSON within the limit, then more than the limit: werkzeug used to cut the body at
    # LB_MAX_BODY and the /add went through.
    padded = b'{"n": 1, "hostnames": ["P1"]}' + b" " * MAX_BODY + b"trailing junk"
    odd = {
        "oversized, with Content-Length": (
            b"POST /add HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: " +
            str(len(big)).encode() + b"\r\nConnection: close\r\n\r\n" + big),
        "oversized, chunked": (
            b"POST /add HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + f"{len(big):x}".encode() + b"\r\n" + big +
            b"\r\n0\r\n\r\n"),
        "chunked, valid JSON padded past the limit": (
            b"POST /add HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + f"{len(padded):x}".encode() + b"\r\n" + padded +
            b"\r\n0\r\n\r\n"),
        "chunked, invalid JSON": (
            b"DELETE /rm HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\n{\"n\":\r\n0\r\n\r\n"),
        "Content-Length huge": (
            b"POST /add HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n"
            b"Connection: close\r\n\r\n{\"n\": 1}"),
    }
    raw_statuses = {}
    for name, request in odd.items():
        began = time.monotonic()
        try:
            reply = raw_http(stack.url, request, timeout=60)
        except OSError as exc:
            raise AssertionError(f"{name}: no answer ({exc!r})") from exc
        raw_statuses[name] = reply.status
        tried += 1
        assert 400 <= reply.status < 500, (name, reply.status, reply.body[:300])
        payload = json.loads(reply.body)
        assert payload["status"] == "failure" and payload["message"].startswith("<Error> "), \
            (name, payload)
        assert time.monotonic() - began < 50, name  # answered, did not wait for the client
    assert membership(stack) == before
    assert stack.rep() == rep
    report("fuzz: admin endpoints on a real stack", inputs_tried=tried, statuses=statuses,
           raw=raw_statuses)
