"""The composition root (lb.balancer): create_app builds one Balancer, every reader gets that
one through ``Balancer.of(app)``, and an app create_app did not make is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from lb.app import create_app
from lb.balancer import Balancer
from lb.ops.metrics import ENV_DIR


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.delenv(ENV_DIR, raising=False)  # single-process metrics: this app's own
    return create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-root",
                       "n": 2})


def test_the_accessor_returns_the_parts_the_app_serves_with(
        app: Flask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = Balancer.of(app)
    assert Balancer.of(app) is parts
    assert parts.settings.registry_path == str(tmp_path / "registry.json")
    assert parts.settings.n == 2  # create_app's config reached the settings
    # One registry and one router for all of them.
    assert parts.admin.registry is parts.registry is parts.router.view.registry
    assert parts.forwarder.router is parts.router
    # The /_lb/ endpoints count their replies in these metrics, and read this router.
    counted: list[tuple[str, int]] = []
    monkeypatch.setattr(parts.metrics, "response",
                        lambda endpoint, status: counted.append((endpoint, status)))
    reply = app.test_client().get("/_lb/status.json")
    assert reply.status_code == 200 and counted == [("ops.status_json", 200)]
    assert reply.json is not None
    assert reply.json["message"]["registry"]["revision"] == parts.router.view.latest().version


def test_an_app_create_app_did_not_make_is_refused() -> None:
    with pytest.raises(RuntimeError, match="'plain' has no lb.balancer.Balancer: it was not "
                                           "made by lb.app.create_app"):
        Balancer.of(Flask("plain"))
