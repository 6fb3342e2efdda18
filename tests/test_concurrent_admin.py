"""Many clients scaling at once, against several gunicorn workers sharing the registry."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from lb.backends import create_backend
from tests.conftest import RunningStack

pytestmark = pytest.mark.system


def fresh_rep(url: str) -> dict:
    # A new connection each time, so the calls spread over the workers.
    with requests.Session() as session:
        reply = session.get(url + "/rep", timeout=30, headers={"Connection": "close"})
    assert reply.status_code == 200
    return reply.json()["message"]


def test_concurrent_add_and_rm_lose_no_update(make_stack: object) -> None:
    stack: RunningStack = make_stack(workers=3, n=3)  # type: ignore[operator]
    calls = ([("POST", "/add", {"n": 1, "hostnames": [f"C{i}"]}) for i in range(6)]
             + [("POST", "/add", {"n": 2}) for _ in range(2)]
             + [("DELETE", "/rm", {"n": 1}) for _ in range(4)])

    def call(c: tuple[str, str, dict]) -> tuple[int, dict]:
        method, path, body = c
        with requests.Session() as session:
            reply = session.request(method, stack.url + path, json=body, timeout=120,
                                    headers={"Connection": "close"})
        return reply.status_code, reply.json()

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(call, calls))
    codes = [code for code, _ in results]
    # An /rm may find every other replica still being added (409); nothing else may fail.
    assert all(code == 200 or (code == 409 and c[1] == "/rm")
               for code, c in zip(codes, calls)), results
    removed = sum(1 for code, c in zip(codes, calls) if code == 200 and c[1] == "/rm")
    expected = 3 + 6 + 4 - removed
    state = stack.wait_ready(expected, timeout=60)
    names = [r.hostname for r in state.members()]
    assert len(names) == len(set(names)) == expected
    ids = [r.server_id for r in state.members()]
    assert len(set(ids)) == len(ids)
    slots = [s for r in state.members() for s in r.slots]
    assert len(slots) == len(set(slots))  # no two replicas share a slot
    # Every worker answers the same.
    assert all(fresh_rep(stack.url) == state.rep() for _ in range(12))
    # What runs is exactly what the registry holds: no orphan, no missing replica.
    running = sorted(i.hostname for i in create_backend(stack.settings).list())
    assert running == sorted(names)
