"""The public contract, call by call, against a real stack (gunicorn + supervisor + replicas)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import RunningStack

pytestmark = pytest.mark.system

FAILURE = {"status": "failure"}


def error(message: str) -> dict[str, str]:
    return {"message": f"<Error> {message}", "status": "failure"}


def test_contract_walkthrough(stack: RunningStack) -> None:
    reply = stack.get("/rep")
    assert reply.status_code == 200
    assert reply.json() == {"message": {"N": 3, "replicas": ["Server1", "Server2", "Server3"]},
                            "status": "successful"}

    reply = stack.post("/add", json={"n": 4, "hostnames": ["S5", "S4", "S10", "S11"]})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"message": {"N": 7, "replicas": [
        "Server1", "Server2", "Server3", "S5", "S4", "S10", "S11"]}, "status": "successful"}

    reply = stack.delete("/rm", json={"n": 3, "hostnames": ["S5", "S4"]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "successful" and body["message"]["N"] == 4
    left = body["message"]["replicas"]
    assert len(left) == 4 and "S5" not in left and "S4" not in left
    before = ["Server1", "Server2", "Server3", "S10", "S11"]
    assert [h for h in before if h in left] == left  # order kept, one random other gone
    assert stack.rep() == body["message"]

    reply = stack.post("/add", json={"n": 1, "hostnames": ["A", "B"]})
    assert (reply.status_code, reply.json()) == (400, error(
        "Length of hostname list is more than newly added instances"))
    reply = stack.delete("/rm", json={"n": 1, "hostnames": ["S10", "S11"]})
    assert (reply.status_code, reply.json()) == (400, error(
        "Length of hostname list is more than removable instances"))
    assert stack.rep() == body["message"]


def test_add_without_names_gets_random_valid_unique_names(stack: RunningStack) -> None:
    reply = stack.post("/add", json={"n": 2})
    assert reply.status_code == 200, reply.text
    names = reply.json()["message"]["replicas"]
    assert names[:3] == ["Server1", "Server2", "Server3"] and len(set(names)) == 5
    assert all(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", n) for n in names[3:])
    # the new replicas serve at once: /add returned after their heartbeat
    state = stack.state()
    assert all(r.state == "ready" for r in state.members())
    reply = stack.delete("/rm", json={"n": 2})
    assert reply.status_code == 200 and reply.json()["message"]["N"] == 3


def test_routed_get_and_unknown_path(shared_stack: RunningStack) -> None:
    stack = shared_stack
    ids = {str(r.server_id) for r in stack.state().members()}
    for _ in range(20):
        reply = stack.get("/home")
        assert reply.status_code == 200
        message = reply.json()["message"]
        assert message.startswith("Hello from Server: ")
        assert message.split("Server: ")[1] in ids
        assert reply.json()["status"] == "successful"
        assert reply.headers["X-Served-By"] in stack.rep()["replicas"]
    reply = stack.get("/heartbeat")
    assert reply.status_code == 200 and reply.content == b""
    for path in ("/other", "/", "/home/extra", "/a%20b"):
        reply = stack.get(path)
        assert reply.status_code == 400
        shown = path.replace("%20", " ")
        assert reply.json() == error(f"'{shown}' endpoint does not exist in server replicas")


@pytest.mark.parametrize(("method", "path", "kwargs", "code", "message"), [
    ("post", "/add", {"data": "{nope"}, 400, "Malformed JSON body"),
    ("post", "/add", {"data": ""}, 400, "Field 'n' is required"),
    ("post", "/add", {"json": {"n": 0}}, 400, "Field 'n' must be a positive integer"),
    ("post", "/add", {"json": {"n": "1"}}, 400, "Field 'n' must be a positive integer"),
    ("post", "/add", {"json": {"n": 1, "hostnames": ["bad name"]}}, 400, "Invalid hostname"),
    ("post", "/add", {"json": {"n": 1, "hostnames": ["Server2"]}}, 409,
     "Hostname 'Server2' already exists"),
    ("post", "/add", {"json": {"n": 1000}}, 409, "Adding 1000 would make 1003 replicas"),
    ("post", "/add", {"data": "x" * 70000}, 413, ""),
    ("delete", "/rm", {"json": {"n": 1, "hostnames": ["Nope"]}}, 409,
     "Replica 'Nope' does not exist"),
    ("delete", "/rm", {"json": {"n": 4}}, 409, "Cannot remove 4 replicas: only 3 exist"),
    ("delete", "/rm", {"json": [1]}, 400, "Request body must be a JSON object"),
    ("post", "/rep", {}, 405, "Method Not Allowed"),
    ("get", "/add", {}, 405, "Method Not Allowed"),
    ("put", "/home", {}, 405, "Method Not Allowed"),
])
def test_bad_admin_calls_get_the_envelope_and_change_nothing(
    shared_stack: RunningStack, method: str, path: str, kwargs: dict, code: int, message: str
) -> None:
    stack = shared_stack
    before = stack.state()
    # A refused body may be left unread, and then the server drops the connection: a fresh one
    # for each body, or the next call could be sent on it as it closes.
    headers = {"Connection": "close"} if "data" in kwargs or "json" in kwargs else {}
    reply = stack.session.request(method.upper(), stack.url + path, timeout=30,
                                  headers=headers, **kwargs)
    assert reply.status_code == code, reply.text
    body = reply.json()
    assert set(body) == {"message", "status"} and body["status"] == "failure"
    assert body["message"].startswith("<Error> " + message)
    after = stack.state()
    # The supervisor writes heartbeat times meanwhile; the wanted set itself must be untouched.
    def shape(state):
        return [(r.hostname, r.server_id, r.slots, r.handle, r.state) for r in state.replicas]
    assert shape(after) == shape(before)


@pytest.mark.parametrize("method", ["PROPFIND", "PURGE", "FOO"])
def test_a_method_rfc_9110_does_not_define_is_501_and_changes_nothing(
    shared_stack: RunningStack, method: str
) -> None:
    """RFC 9110 section 9.1: a method the server does not recognize is 501, not 405 (which
    says the resource does not take a method the server knows)."""
    stack = shared_stack
    before = stack.state()
    reply = stack.session.request(method, stack.url + "/home", timeout=30)
    assert reply.status_code == 501, reply.text
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json()["status"] == "failure"
    assert reply.json()["message"].startswith("<Error> Not Implemented")
    assert [r.hostname for r in stack.state().replicas] == [r.hostname for r in before.replicas]


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("OPTIONS", "/add", "POST"), ("GET", "/add", "POST"), ("PUT", "/add", "POST"),
    ("DELETE", "/add", "POST"), ("HEAD", "/add", "POST"),
    ("OPTIONS", "/rm", "DELETE"), ("GET", "/rm", "DELETE"), ("POST", "/rm", "DELETE"),
    ("PATCH", "/rm", "DELETE"),
    ("OPTIONS", "/rep", "GET, HEAD"), ("POST", "/rep", "GET, HEAD"),
    ("DELETE", "/rep", "GET, HEAD"),
    ("OPTIONS", "/home", "GET, HEAD"), ("PUT", "/home", "GET, HEAD"),
    ("POST", "/any/path?x=1", "GET, HEAD"), ("OPTIONS", "/", "GET, HEAD"),
    ("OPTIONS", "/_lb/readyz", "GET, HEAD"), ("POST", "/_lb/status.json", "GET, HEAD"),
    ("DELETE", "/_lb/metrics", "GET, HEAD"), ("TRACE", "/home", "GET, HEAD"),
])
def test_a_method_the_path_does_not_take_is_405_with_one_allow_per_path(
    shared_stack: RunningStack, method: str, path: str, allow: str
) -> None:
    """OPTIONS included: the balancer takes GET (and HEAD) everywhere but /add (POST) and /rm
    (DELETE), and says so the same way whichever method was refused."""
    stack = shared_stack
    before = stack.state()
    reply = stack.session.request(method, stack.url + path, timeout=30)
    assert reply.status_code == 405, reply.text
    assert reply.headers["Allow"] == allow
    if method != "HEAD":
        assert reply.headers["Content-Type"] == "application/json"
        shown = path.split("?")[0]
        assert reply.json() == error(f"Method Not Allowed: {method} {shown}")
    assert [r.hostname for r in stack.state().replicas] == [r.hostname for r in before.replicas]
