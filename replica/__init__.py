"""The replica server: ``GET /home`` and ``GET /heartbeat``, as the contract says."""

from replica.app import create_app

__all__ = ["create_app"]
