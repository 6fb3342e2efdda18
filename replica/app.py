"""A replica: answers ``/home`` with its server id and ``/heartbeat`` with an empty 200."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """``SERVER_ID`` comes from the environment unless ``config`` gives it (tests)."""
    app = Flask(__name__)
    app.config["SERVER_ID"] = os.environ.get("SERVER_ID", "0")
    if config:
        app.config.update(config)
    server_id = str(app.config["SERVER_ID"])
    if not server_id.isdigit():
        raise ValueError(f"SERVER_ID must be a non-negative integer, not {server_id!r}")

    @app.get("/home")
    def home() -> Response:
        return jsonify(message=f"Hello from Server: {server_id}", status="successful")

    @app.get("/heartbeat")
    def heartbeat() -> Response:
        return Response(status=200)

    return app
