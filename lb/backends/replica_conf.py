"""gunicorn settings of every local replica (``-c python:lb.backends.replica_conf``; the flags on
the command line add the rest): every replica's own (``replica.gunicorn_conf``: limits with room
for what the balancer adds), and a lifeline: a replica started under ``lb-run`` stops when its
lifeline is cut, so it never outlives the stack, even one killed with SIGKILL (``lb.lifeline``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from lb import lifeline
from replica.gunicorn_conf import (  # noqa: F401 - gunicorn reads them from this module
    limit_request_field_size,
    limit_request_fields,
    limit_request_line,
)


def when_ready(server: Any) -> None:
    """In the replica's gunicorn master, once it listens: watch the lifeline, if it has one."""
    fd = lifeline.inherited()
    if fd is not None:
        # SIGTERM to itself: gunicorn's graceful stop (requests in flight finish).
        lifeline.watch(fd, lambda: os.kill(os.getpid(), signal.SIGTERM), "this replica")
