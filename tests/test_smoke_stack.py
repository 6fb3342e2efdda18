from __future__ import annotations

from tests.conftest import RunningStack


def test_stack_serves_home_from_registered_replicas(stack: RunningStack) -> None:
    rep = stack.rep()
    assert rep == {"N": 3, "replicas": ["Server1", "Server2", "Server3"]}
    reply = stack.get("/home")
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "successful"
    assert body["message"].startswith("Hello from Server: ")
