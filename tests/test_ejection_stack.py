"""Passive ejection through real gunicorn balancers, both workers (``async`` and ``threads``).

A bad deploy: a replica that answers its ``/heartbeat`` but 500 to every routed request. After
``LB_EJECT_AFTER`` of its 500s (passed back, never retried) the keys it owned are answered by the
other replicas, the ejection shows in ``/_lb/metrics`` and ``/_lb/status.json``, and the keys come
back to it when the ejection ends. With every replica bad, at most the allowed share is ejected
and the rest keep answering their 500s: routing goes on.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import requests

from tests.helpers_scripted import (
    ScriptedReplica,
    Step,
    answer,
    closed_at_the_end,
    good,
    threads_balancer,
)

WORKERS = ["async", "threads"]
SETTINGS = {"hash": "xxhash", "hash_key": "query:id", "eject_after": 3, "eject_seconds": 1.5}


def bad_deploy(n: int, head: bytes) -> Iterable[Step]:
    if head.startswith(b"GET /heartbeat "):
        return [answer(b"")]
    return [answer(b'{"message": "boom", "status": "failure"}', "500 Internal Server Error",
                   "Content-Type: application/json")]


replicas = pytest.fixture(name="replicas")(closed_at_the_end)


def metric(url: str, name: str, replica: str) -> float:
    text = requests.get(url + "/_lb/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{replica="{replica}"}} '):
            return float(line.split()[-1])
    return 0.0


def status_of(url: str, replica: str) -> dict[str, object]:
    document = requests.get(url + "/_lb/status.json", timeout=10).json()["message"]
    return next(r for r in document["replicas"] if r["hostname"] == replica)


@pytest.mark.parametrize("worker", WORKERS)
def test_a_bad_deploy_is_ejected_and_its_keys_served_by_the_others(
        tmp_path: Path, worker: str, replicas: list[ScriptedReplica]) -> None:
    replicas += [ScriptedReplica(bad_deploy), ScriptedReplica(good), ScriptedReplica(good)]
    with threads_balancer(tmp_path, [r.address for r in replicas], worker=worker,
                          **SETTINGS) as (url, _), requests.Session() as client:
        failed: dict[int, str] = {}  # key -> the replica that answered 500
        for key in itertools.count(100000):
            reply = client.get(f"{url}/home?id={key}", timeout=10)
            if reply.status_code == 500:  # passed back as the replica gave it
                assert reply.json() == {"message": "boom", "status": "failure"}
                failed[key] = reply.headers["X-Served-By"]
                if len(failed) == SETTINGS["eject_after"]:
                    break
            else:
                assert reply.status_code == 200
            assert key < 100300, "the bad replica owns no key"
        (bad,) = set(failed.values())
        assert replicas[0].requests == len(failed)  # each 500 came once: not retried
        ejected_at = time.monotonic()
        # Its keys now go clockwise, to the good replicas; other keys still answer.
        for key in [*failed, *range(200000, 200030)]:
            reply = client.get(f"{url}/home?id={key}", timeout=10)
            assert reply.status_code == 200, (key, reply.status_code, reply.text)
            assert reply.headers["X-Served-By"] != bad
        assert replicas[0].requests == len(failed)
        assert metric(url, "lb_replica_ejections_total", bad) == 1.0
        assert metric(url, "lb_replica_ejected", bad) == 1.0
        status = status_of(url, bad)
        assert status["ejections"] == 1 and isinstance(status["ejected_until"], float)
        assert status_of(url, next(iter({"Server1", "Server2", "Server3"} - {bad})))[
            "ejected_until"] is None
        # The ejection ends: its keys come back to it (and fail again, passed back).
        time.sleep(max(0.0, ejected_at + SETTINGS["eject_seconds"] + 0.2 - time.monotonic()))
        key = next(iter(failed))
        reply = client.get(f"{url}/home?id={key}", timeout=10)
        assert (reply.status_code, reply.headers["X-Served-By"]) == (500, bad)
        assert metric(url, "lb_replica_ejected", bad) == 0.0
        assert status_of(url, bad)["ejected_until"] is None


@pytest.mark.parametrize("worker", WORKERS)
def test_with_every_replica_bad_routing_goes_on(tmp_path: Path, worker: str,
                                                replicas: list[ScriptedReplica]) -> None:
    """3 replicas, max share 0.5: one is ejected, the two others stay routed and their 500s
    are passed back; nothing answers 502 or 503, and the balancer stays up."""
    replicas += [ScriptedReplica(bad_deploy) for _ in range(3)]
    settings = {**SETTINGS, "eject_seconds": 60.0}  # no ejection ends during the test
    with threads_balancer(tmp_path, [r.address for r in replicas], worker=worker,
                          **settings) as (url, proc), requests.Session() as client:
        served = []
        for key in range(300000, 300060):
            reply = client.get(f"{url}/home?id={key}", timeout=10)
            assert reply.status_code == 500, (reply.status_code, reply.text)
            assert json.loads(reply.content)["message"] == "boom"
            served.append(reply.headers["X-Served-By"])
        ejected = [h for h in ("Server1", "Server2", "Server3")
                   if metric(url, "lb_replica_ejected", h) == 1.0]
        assert len(ejected) == 1
        assert set(served[-20:]) == {"Server1", "Server2", "Server3"} - set(ejected)
        assert sum(metric(url, "lb_replica_ejections_total", h)
                   for h in ("Server1", "Server2", "Server3")) == 1.0
        assert requests.get(url + "/_lb/healthz", timeout=10).status_code == 200
        assert proc.poll() is None
