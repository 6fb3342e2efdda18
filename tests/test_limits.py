"""The limits, as settings with safe defaults: LB_MAX_REPLICAS, LB_MAX_BODY, LB_CONNECT_TIMEOUT,
LB_UPSTREAM_TIMEOUT. In-process apps; replicas are echo servers, a blackhole (connects hang)
and a slow echo server, all on loopback."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from lb.balancer import Balancer
from lb.registry import Registry
from lb.settings import Settings, SettingsError
from tests.helpers_chaos import report
from tests.helpers_echo import blackhole, inprocess_balancer, serve_in_thread


def registry_of(app: Flask) -> Registry:
    registry = Balancer.of(app).registry
    assert isinstance(registry, Registry)
    return registry


def envelope_of(reply: Any) -> str:
    payload = reply.get_json()
    assert set(payload) == {"message", "status"} and payload["status"] == "failure", payload
    message: str = payload["message"]
    assert message.startswith("<Error> ")
    return message


def key_for(app: Flask, server_id: int) -> int:
    """A request key (6 digits) that the map sends to ``server_id`` first."""
    state = registry_of(app).read()
    ring = state.hash_ring(state.routable())
    return next(k for k in range(100000, 999999) if ring.lookup(k) == server_id)


def test_defaults_are_bounded() -> None:
    s = Settings.from_env({})
    assert 1 <= s.max_replicas <= 64
    assert 1024 <= s.max_body <= 1 << 20
    assert 0 < s.connect_timeout <= 5 and 0 < s.upstream_timeout <= 60
    with pytest.raises(SettingsError):
        Settings.from_env({"LB_N": "5", "LB_MAX_REPLICAS": "4"})
    for name in ("LB_MAX_BODY", "LB_MAX_REPLICAS", "LB_CONNECT_TIMEOUT", "LB_UPSTREAM_TIMEOUT"):
        with pytest.raises(SettingsError):
            Settings.from_env({name: "lots"})
    for name, value in (("LB_MAX_REPLICAS", "0"), ("LB_CONNECT_TIMEOUT", "0"),
                        ("LB_UPSTREAM_TIMEOUT", "-1")):
        with pytest.raises(SettingsError):
            Settings.from_env({name: value})


def test_max_replicas_caps_add_and_a_refused_add_changes_nothing(tmp_path: Path) -> None:
    with serve_in_thread() as echo:
        app = inprocess_balancer(str(tmp_path), [echo] * 3, max_replicas=4)
        client = app.test_client()
        before = Path(registry_of(app).path).read_bytes()
        reply = client.post("/add", json={"n": 2, "hostnames": ["S5"]})
        assert reply.status_code == 409
        assert "LB_MAX_REPLICAS" in envelope_of(reply)
        assert Path(registry_of(app).path).read_bytes() == before
        assert client.post("/add", json={"n": 1}).get_json()["message"]["N"] == 4
        reply = client.post("/add", json={"n": 1})
        assert reply.status_code == 409 and "maximum is 4" in envelope_of(reply)
        assert client.delete("/rm", json={"n": 1}).status_code == 200
        assert client.post("/add", json={"n": 1, "hostnames": ["S9"]}).status_code == 200
        assert client.get("/rep").get_json()["message"]["N"] == 4


def test_max_body_refuses_one_byte_more(tmp_path: Path) -> None:
    with serve_in_thread() as echo:
        app = inprocess_balancer(str(tmp_path), [echo] * 3, max_body=1024)
        client = app.test_client()
        body = json.dumps({"n": 1, "hostnames": ["S7"]}).encode()
        before = Path(registry_of(app).path).read_bytes()
        for endpoint, method in (("/add", "POST"), ("/rm", "DELETE")):
            reply = client.open(endpoint, method=method, data=body + b" " * (1025 - len(body)),
                                content_type="application/json")
            assert reply.status_code == 413
            envelope_of(reply)
            assert Path(registry_of(app).path).read_bytes() == before
        reply = client.post("/add", data=body + b" " * (1024 - len(body)),
                            content_type="application/json")
        assert reply.status_code == 200, reply.get_data()


@pytest.mark.parametrize("retries", [1, 0])
def test_connect_timeout_moves_on_from_a_host_that_does_not_answer(tmp_path: Path,
                                                                    retries: int) -> None:
    with serve_in_thread() as echo, blackhole() as hole:
        app = inprocess_balancer(str(tmp_path), [hole, echo], hash_key="query:k",
                                 connect_timeout=0.3, upstream_timeout=30.0, retries=retries)
        key = key_for(app, 1)  # Server1, the blackhole, is first for this key
        began = time.monotonic()
        reply = app.test_client().get(f"/home?k={key}")
        took = time.monotonic() - began
    report(f"limit: LB_CONNECT_TIMEOUT=0.3 (retries={retries})", status=reply.status_code,
           seconds=round(took, 2))
    assert took >= 0.25  # it did try the blackhole first, and gave up on it
    assert took < 15  # ... after the connect timeout, not the upstream timeout (30 s)
    if retries:
        assert reply.status_code == 200 and reply.headers["X-Served-By"] == "Server2"
    else:
        assert reply.status_code == 502 and "Server1" in envelope_of(reply)


@pytest.mark.parametrize("retries", [1, 0])
def test_upstream_timeout_moves_on_from_a_slow_replica(tmp_path: Path, retries: int) -> None:
    with serve_in_thread(ECHO_DELAY="6") as slow, serve_in_thread() as fast:
        app = inprocess_balancer(str(tmp_path), [slow, fast], hash_key="query:k",
                                 connect_timeout=1.0, upstream_timeout=0.5, retries=retries,
                                 hedge_share=0)  # the timeout alone (hedging: test_hedging*)
        key = key_for(app, 1)
        began = time.monotonic()
        reply = app.test_client().get(f"/home?k={key}")
        took = time.monotonic() - began
    report(f"limit: LB_UPSTREAM_TIMEOUT=0.5 (retries={retries})", status=reply.status_code,
           seconds=round(took, 2))
    assert took >= 0.45
    assert took < 5  # not the 6 s the slow replica takes
    if retries:
        assert reply.status_code == 200 and reply.headers["X-Served-By"] == "Server2"
    else:  # the replica timed out: a gateway timeout, not a bad gateway
        assert reply.status_code == 504 and "Server1" in envelope_of(reply)


def test_max_body_holds_for_a_chunked_body_too(tmp_path: Path) -> None:
    """With no Content-Length (chunked), werkzeug stops reading at the limit without a word:
    a body of valid JSON plus megabytes of anything was cut at LB_MAX_BODY and obeyed."""
    with serve_in_thread() as echo:
        app = inprocess_balancer(str(tmp_path), [echo] * 3, max_body=1024)
        client = app.test_client()
        before = Path(registry_of(app).path).read_bytes()
        valid = json.dumps({"n": 1, "hostnames": ["S7"]}).encode()

        def chunked(data: bytes) -> Any:
            return client.post("/add", input_stream=io.BytesIO(data),
                               content_type="application/json",
                               environ_overrides={"wsgi.input_terminated": True,
                                                  "CONTENT_LENGTH": ""})

        for tail in (b" " * 2000, b" " * 2000 + b"garbage", b" " * (1025 - len(valid))):
            reply = chunked(valid + tail)
            assert reply.status_code == 413, (len(tail), reply.get_data())
            envelope_of(reply)
            assert Path(registry_of(app).path).read_bytes() == before
        reply = chunked(valid + b" " * (1024 - len(valid)))  # exactly the limit: fine
        assert reply.status_code == 200, reply.get_data()
