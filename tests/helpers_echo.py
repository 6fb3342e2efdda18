"""A stand-in replica for the fault and hostile-input tests: it tells what it received.

``create_app()`` is a plain WSGI app that answers the contract's ``/home`` and ``/heartbeat`` and,
on any other path, a JSON echo of the request (method, raw URI, path, query, headers, client).
Knobs, from the environment (or the ``env`` argument):

- ``ECHO_DELAY``: seconds every non-heartbeat reply waits (a slow replica);
- ``ECHO_HEARTBEAT_DELAY``: seconds ``/heartbeat`` waits (a replica too slow for the supervisor),
  from ``ECHO_HEARTBEAT_SLOW_AFTER`` seconds after start on;
- ``/slow?s=SECONDS``: that request waits ``SECONDS`` (in-flight requests for drain tests);
- ``/big?n=BYTES``: a reply of ``BYTES`` bytes (at most 16 MiB), for large replies;
- ``/status?code=CODE``: a reply with that status and an HTML body, as gunicorn's own error
  pages are (a replica's error page, e.g. its 431 for a request too large for it).

It runs either in a thread of the test process (``serve_in_thread``, for in-process apps with no
supervisor) or as a gunicorn replica of a real stack (``start_echo_replica``): same server, same
graceful stop and the same process marks as the local backend's replicas, so the supervisor and
``lb-run`` treat it as one of theirs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs

import psutil
from werkzeug.serving import make_server

from lb.backends.local import ENV_HOSTNAME, ENV_TOKEN, listen_on_loopback, replica_marks
from lb.leases import SUPERVISOR_HOLDER, Lease
from lb.registry import READY, Registry, Replica
from tests.helpers_backend import FakeBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
StartResponse = Callable[..., Any]


def create_app(env: Mapping[str, str] | None = None) -> Callable[..., Iterable[bytes]]:
    env = os.environ if env is None else env
    server_id = env.get("SERVER_ID", "0")
    delay = float(env.get("ECHO_DELAY", "0") or 0)
    heartbeat_delay = float(env.get("ECHO_HEARTBEAT_DELAY", "0") or 0)
    slow_after = time.monotonic() + float(env.get("ECHO_HEARTBEAT_SLOW_AFTER", "0") or 0)
    name = env.get(ENV_HOSTNAME, "echo")

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/heartbeat":
            if time.monotonic() >= slow_after:
                time.sleep(heartbeat_delay)
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        time.sleep(delay)
        query = environ.get("QUERY_STRING", "")
        if path == "/slow":
            time.sleep(float(parse_qs(query).get("s", ["1"])[0]))
        if path == "/big":
            size = min(int(parse_qs(query).get("n", ["0"])[0]), 16 << 20)
            data = (b"0123456789abcdef" * (size // 16 + 1))[:size]
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(size)), ("X-Echo", name)])
            return [data]
        if path == "/status":
            code = int(parse_qs(query).get("code", ["500"])[0])
            page = f"<html><body><h1>{code}</h1></body></html>".encode()
            start_response(f"{code} Whatever", [("Content-Type", "text/html"),
                                                ("Content-Length", str(len(page)))])
            return [page]
        if path == "/home":
            body: dict[str, Any] = {"message": f"Hello from Server: {server_id}",
                                    "status": "successful"}
        else:
            headers = [(k[5:].replace("_", "-").title(), v) for k, v in environ.items()
                       if k.startswith("HTTP_")]
            for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                if environ.get(key):
                    headers.append((key.replace("_", "-").title(), environ[key]))
            body = {
                "echo": name,
                "method": environ.get("REQUEST_METHOD"),
                "raw_uri": environ.get("RAW_URI") or environ.get("REQUEST_URI"),
                "path": path.encode("latin-1", "replace").decode("utf-8", "replace"),
                "query": query,
                "headers": headers,
                "remote_addr": environ.get("REMOTE_ADDR"),
            }
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data))),
                                  ("X-Echo", name)])
        return [data]

    return app


@contextmanager
def serve_in_thread(**env: str) -> Iterator[str]:
    """An echo server on a free loopback port in this process; yields its base URL."""
    server = make_server("127.0.0.1", 0, create_app(env), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def blackhole() -> Iterator[str]:
    """A loopback address whose connects hang: a listening socket with a full accept queue.

    Linux drops the SYN of a connection that finds the queue full, so the client's connect waits
    (and retransmits) until its own timeout: the cheapest unreachable host there is.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # backlog 0 still queues one or two; fill it up
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


def register(registry: Registry, hostname: str, address: str,
             handle: str | None = None) -> Replica:
    """Add a READY entry for ``address`` (next free server id, its slots) to the registry."""
    now = time.time()
    with registry.update() as state:
        server_id = next(state.free_server_ids())
        slots = state.hash_ring().add(server_id)
        entry = Replica(hostname, server_id, list(slots), state=READY, address=address,
                        handle=handle, last_heartbeat=now)
        state.replicas.append(entry)
    return entry


def start_echo_replica(registry: Registry, deployment: str, hostname: str,
                       timeout: float = 30, **env: str) -> Replica:
    """An echo replica under gunicorn, marked as ``deployment``'s, taken in by the supervisor.

    Started the way the local backend starts replicas (socket bound here and handed over, own
    session, the deployment's marks in the environment) and registered the way the supervisor
    commits a replacement (``starting``, with its handle and address): the supervisor promotes
    it to ``ready`` at its first heartbeat, probes it from then on, and ``/rm`` and ``lb-run``'s
    shutdown stop it like any other replica.
    """
    token = uuid.uuid4().hex
    sock, address = listen_on_loopback()
    with sock:  # closed here once the child holds its own copy
        with registry.update() as state:  # reserve the id (and slots) before anything runs
            server_id = next(state.free_server_ids())
            slots = state.hash_ring().add(server_id)
            # Held like an /add holds its entries, so the supervisor leaves it alone for now.
            state.replicas.append(Replica(hostname, server_id, list(slots),
                                          lease=Lease(f"add:test:{token[:8]}",
                                                      time.time() + timeout)))
        child_env = {**os.environ, **env,
                     **replica_marks(deployment, hostname, server_id, token, address)}
        fd = sock.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:replica.gunicorn_conf",
             "--bind", f"fd://{fd}", "--workers", "1",
             "--worker-class", "gthread", "--threads", "32", "--graceful-timeout", "10",
             "--log-level", "warning", "--no-control-socket", "tests.helpers_echo:create_app()"],
            env=child_env, pass_fds=(fd,), start_new_session=True, cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    with registry.update() as state:
        entry = state.find(hostname)
        assert entry is not None
        entry.handle, entry.address = f"{proc.pid}/{token}", address
        entry.lease = Lease(SUPERVISOR_HOLDER, time.time() + timeout)  # the supervisor's now
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = registry.read().find(hostname)
        if entry is not None and entry.state == READY:
            return entry
        time.sleep(0.05)
    raise AssertionError(f"echo replica {hostname} never became ready: {registry.read()}")


def processes_of(handle: str) -> list[psutil.Process]:
    """Every live process of the replica behind a local backend handle (``pid/token``)."""
    token = handle.partition("/")[2]
    found = []
    for proc in psutil.process_iter(["environ"], ad_value=None):
        if (proc.info["environ"] or {}).get(ENV_TOKEN) == token:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                pass
    return found


def inprocess_balancer(folder: str, addresses: list[str], **config: Any) -> Any:
    """``create_app`` on a fresh registry in ``folder`` (made by ``lb.bootstrap``) whose
    ``len(addresses)`` replicas are READY at ``addresses``; its backend is a ``FakeBackend``
    behind ``addresses[0]``, so /add "starts" replicas without a process. The Flask app."""
    from lb.app import create_app  # here: importing the app pulls in Flask
    from lb.balancer import Balancer

    settings = {"registry": os.path.join(folder, "registry.json"), "n": len(addresses),
                "deployment": f"inproc{uuid.uuid4().hex[:8]}", "start_timeout": 5.0,
                **config}
    app = create_app(settings)
    parts = Balancer.of(app)
    parts.admin.backend = FakeBackend.behind(addresses[0])
    with parts.registry.update() as state:
        for r, address in zip(state.replicas, addresses):
            r.state, r.address, r.handle = READY, address, f"fake/{r.hostname}"
    return app
