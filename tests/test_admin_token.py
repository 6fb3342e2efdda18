"""LB_ADMIN_TOKEN: when set, /add and /rm need ``Authorization: Bearer <token>`` and answer 401 in
the contract's envelope otherwise, before looking at the body; routing and /rep stay open."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.balancer import Balancer
from lb.registry import Registry
from tests.conftest import RunningStack
from tests.helpers_chaos import env_int, report
from tests.helpers_echo import inprocess_balancer, serve_in_thread

TOKEN = "s3cret-Token_1"
TRIED = {"n": 0}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    with serve_in_thread() as echo:
        yield inprocess_balancer(str(tmp_path_factory.mktemp("token")), [echo] * 3,
                                 admin_token=TOKEN)
    report("admin token", inputs_tried=TRIED["n"])


def registry_bytes(app: Flask) -> bytes:
    registry = Balancer.of(app).registry
    assert isinstance(registry, Registry)
    return Path(registry.path).read_bytes()


def assert_refused(app: Flask, path: str, method: str, authorization: str | None,
                   data: bytes = b'{"n": 1, "hostnames": ["T1"]}') -> None:
    TRIED["n"] += 1
    before = registry_bytes(app)
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = app.test_client().open(path, method=method, data=data, headers=headers,
                                   content_type="application/json")
    assert reply.status_code == 401, (authorization, reply.status_code, reply.get_data())
    assert reply.get_json() == {"message": "<Error> Missing or wrong admin token "
                                           "(Authorization: Bearer ...)", "status": "failure"}
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in reply.get_data(as_text=True)
    assert registry_bytes(app) == before


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {TOKEN} ", f"Bearer  {TOKEN}",
    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}",
    f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN}\t", "Bearer " + "A" * 10_000,
])
def test_add_and_rm_without_the_right_token_are_401(app: Flask, authorization: str | None
                                                    ) -> None:
    assert_refused(app, "/add", "POST", authorization)
    assert_refused(app, "/rm", "DELETE", authorization)


def test_the_token_is_checked_before_the_body(app: Flask) -> None:
    for body in (b"{not json", b'{"n": -1}', b" " * 100_000):  # the last is over LB_MAX_BODY
        assert_refused(app, "/add", "POST", None, data=body)
        assert_refused(app, "/rm", "DELETE", "Bearer nope", data=body)


def test_an_encoded_path_is_still_the_admin_path(app: Flask) -> None:
    assert_refused(app, "/%61dd", "POST", None)
    assert_refused(app, "/r%6D", "DELETE", None)


@settings(max_examples=env_int("FUZZ_EXAMPLES", 150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(authorization=st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                           blacklist_characters="\x7f"), max_size=60))
def test_no_other_header_value_opens_the_door(app: Flask, authorization: str) -> None:
    if authorization.strip() != f"Bearer {TOKEN}":
        assert_refused(app, "/add", "POST", authorization)


def test_the_right_token_opens_it_and_the_rest_stays_open(app: Flask) -> None:
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/rep").status_code == 200
    home = client.get("/home")
    assert home.status_code == 200 and home.get_json()["status"] == "successful"
    reply = client.post("/add", json={"n": 1, "hostnames": ["T1"]}, headers=auth)
    assert reply.status_code == 200 and "T1" in reply.get_json()["message"]["replicas"]
    reply = client.delete("/rm", json={"n": 1, "hostnames": ["T1"]}, headers=auth)
    assert reply.status_code == 200 and "T1" not in reply.get_json()["message"]["replicas"]
    # Validation still applies behind the door.
    assert client.post("/add", json={"n": 0}, headers=auth).status_code == 400


@pytest.mark.system
def test_admin_token_on_a_real_stack(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(admin_token=TOKEN, n=2)
    rep = stack.rep()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert stack.post("/add", json={"n": 1}, headers=headers).status_code == 401
        assert stack.delete("/rm", json={"n": 1}, headers=headers).status_code == 401
    assert stack.rep() == rep
    assert stack.get("/home").status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    reply = stack.post("/add", json={"n": 1, "hostnames": ["T1"]}, headers=auth)
    assert reply.status_code == 200, reply.text
    assert stack.delete("/rm", json={"n": 1, "hostnames": ["T1"]}, headers=auth).status_code \
        == 200
    assert stack.rep() == rep


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/add", "POST"), ("OPTIONS", "/add", "POST"), ("PUT", "/add", "POST"),
    ("GET", "/rm", "DELETE"), ("POST", "/rm", "DELETE"), ("OPTIONS", "/rm", "DELETE"),
])
def test_a_method_the_path_does_not_take_is_405_token_or_not(
        app: Flask, method: str, path: str, allow: str) -> None:
    """Only the method that acts needs the token: a wrong method is a 405, not a 401."""
    reply = app.test_client().open(path, method=method)
    assert reply.status_code == 405, reply.get_data()
    assert reply.headers["Allow"] == allow
    assert reply.get_json()["message"] == f"<Error> Method Not Allowed: {method} {path}"
