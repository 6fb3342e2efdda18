"""gunicorn settings for the balancer, from the same ``LB_*`` settings as everything else.

``gunicorn -c python:lb.gunicorn_conf`` serves ``lb.app:create_app()``.
"""

import os
import signal
from typing import Any

from lb import lifeline
from lb.aio.accept import ConnectionTable, client_cap
from lb.logs import logging_config
from lb.ops.metrics import mark_process_dead
from lb.settings import Settings
from lb.tls import binds, server_context

_settings = Settings.from_env()

wsgi_app = "lb.app:create_app()"
# LB_PORT, and LB_TLS_PORT with a certificate (lb.tls); the certificate and key are checked
# here too, in the master, for a gunicorn started without lb-run: a bad one stops it at once.
bind = binds(_settings)
server_context(_settings)
workers = _settings.workers
# async: an event loop per worker, routed GETs never enter Flask (lb/aio/). threads: gthread +
# Flask for everything, with JSON errors and LB_CLIENT_TIMEOUT (lb/threads/worker.py), the reference.
worker_class = {"async": "lb.aio.worker.AsyncWorker",
                "threads": "lb.threads.worker.EnvelopeThreadWorker"}[_settings.worker]
threads = _settings.threads
# Client connections a gthread worker holds at once (the async worker keeps its own cap): no
# more than the descriptor limit leaves, so that replica connections, the registry and the
# logs always find one (lb.aio.accept.client_cap), and gthread stops accepting before accept()
# fails with EMFILE, which ends its worker. gunicorn's default, 1000, is the most when
# LB_MAX_CLIENTS does not say.
worker_connections = _settings.max_clients or min(1000, client_cap(_settings))
keepalive = 5
timeout = 60
graceful_timeout = 15
loglevel = _settings.log_level
logconfig_dict = logging_config(_settings)  # LB_LOG_FORMAT for gunicorn's lines and the app's
proc_name = f"{_settings.deployment}-lb"
# Several deployments (and the test suite) run side by side: no shared control socket.
control_socket_disable = True
# The balancer is the edge: no client, loopback ones included (gunicorn trusts 127.0.0.1 by
# default), may claim https with X-Forwarded-Proto or set SCRIPT_NAME/PATH_INFO by header.
secure_scheme_headers: dict[str, str] = {}
forwarder_headers = ""


# The async workers' connection counts, shared so that new connections go to the worker that
# holds fewest (lb.aio.accept). Made here, in the arbiter, so that every forked worker has it.
# Room for restarts (a new worker may start before the old one is reaped) and TTIN signals.
connections = ConnectionTable(slots=max(64, 2 * workers))


def pre_fork(server: Any, worker: Any) -> None:
    """An async worker gets the table and a slot no live worker holds."""
    if hasattr(worker, "connection_table"):
        worker.connection_table = connections
        worker.connection_slot = connections.claim(
            w.connection_slot for w in server.WORKERS.values()
            if getattr(w, "connection_slot", None) is not None)


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: its live metrics files go too (prometheus-client multiprocess mode),
    and its slot in the connection table."""
    mark_process_dead(worker.pid)
    connections.release(getattr(worker, "connection_slot", None))


def post_worker_init(worker: Any) -> None:
    """Each worker, either kind, publishes the answers its router got (``lb.evidence``)."""
    from lb.balancer import Balancer  # the app's module: loaded in the worker, not here

    if _settings.late_heartbeats == "forgive":  # else the supervisor reads none
        Balancer.of(worker.wsgi).evidence.start()


def worker_exit(server: Any, worker: Any) -> None:
    """... and withdraws them as it goes: no counters left that nothing will change."""
    from lb.balancer import Balancer

    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None:
        Balancer.of(wsgi).evidence.stop()


def when_ready(server: Any) -> None:
    """The balancer's master stops (gracefully) when ``lb-run`` is gone (``lb.lifeline``)."""
    fd = lifeline.inherited()
    if fd is not None:
        lifeline.watch(fd, lambda: os.kill(os.getpid(), signal.SIGTERM), "the balancer")
