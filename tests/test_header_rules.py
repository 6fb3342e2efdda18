"""The header rules of ``lb.routing`` by themselves (both workers call them): which headers go on
to a replica, which of a replica's come back. Pure: no process is started."""

from __future__ import annotations

from typing import Any

import pytest

from lb.routing import forward_headers, reply_headers


def _encoded(pairs: list[tuple[str, str]], as_bytes: bool) -> list[Any]:
    return [(k.encode(), v.encode()) for k, v in pairs] if as_bytes else pairs


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str (threads)", "bytes (async)"])
@pytest.mark.parametrize(("connection", "dropped"), [
    ("keep-alive", set()),
    ("Keep-Alive", set()),
    ("keep-alive, X-Secret", {"x-secret"}),
    ("close", {"close"}),  # a header named by the close option goes too (RFC 9110 7.6.1)
    ("X-Secret , keep-alive", {"x-secret"}),
])
def test_a_replicas_hop_headers_and_those_its_connection_names_stay_behind(
        as_bytes: bool, connection: str, dropped: set[str]) -> None:
    pairs = [("Server", "gunicorn"), ("Date", "today"), ("Connection", connection),
             ("Content-Type", "application/json"), ("X-Secret", "s"), ("Close", "c"),
             ("Content-Length", "2"), ("Keep-Alive", "timeout=5"), ("X-Kept", "k"),
             ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    kept = reply_headers(_encoded(pairs, as_bytes))
    expected = [(k, v) for k, v in pairs
                if k.lower() not in {"server", "date", "connection", "content-length",
                                     "keep-alive"} | dropped]
    assert kept == _encoded(expected, as_bytes)


@pytest.mark.parametrize(("connection", "dropped"), [
    (None, set()),
    ("keep-alive", set()),
    ("keep-alive, X-Drop-Me", {"x-drop-me"}),
    ("Upgrade, x-drop-me", {"x-drop-me"}),
])
def test_a_clients_headers_go_on_without_hop_spoofable_or_underscored_ones(
        connection: str | None, dropped: set[str]) -> None:
    pairs = [("Host", "lb:5000"), ("Accept", "*/*"), ("X-Drop-Me", "secret"),
             ("X-Forwarded-For", "10.0.0.1"), ("X_Forwarded_For", "evil"), ("Forwarded", "x"),
             ("TE", "trailers"), ("Upgrade", "h2c"), ("X-Request-ID", "given"),
             ("X-Forwarded-For", "10.0.0.2"), ("User-Agent", "test")]
    if connection is not None:
        pairs.insert(1, ("Connection", connection))
    out = forward_headers(pairs, "127.0.0.9", "lb:5000", "rid-1")
    passed = [(k, v) for k, v in pairs if k.lower() in {"accept", "x-drop-me", "user-agent"}
              and k.lower() not in dropped]
    assert out == [*passed, ("X-Forwarded-For", "10.0.0.1,10.0.0.2, 127.0.0.9"),
                   ("X-Forwarded-Host", "lb:5000"), ("X-Forwarded-Proto", "http"),
                   ("X-Request-ID", "rid-1")]
