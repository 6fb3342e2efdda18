"""A replica that misbehaves on purpose, at the byte level, and a threads balancer in front of
scripted replicas (gunicorn's threads worker, no supervisor).

``ScriptedReplica(script)`` answers the n-th request it receives (counted from 1 over all its
connections) with what ``script(n, head)`` returns, step by step: ``bytes`` are sent, a
``float`` is a pause in seconds, a callable is called (to wait for the test, or tell it
something), ``None`` closes the connection. ``answer`` builds the usual
answer bytes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.conftest import free_port
from tests.helpers_echo import ROOT, inprocess_balancer

Step = bytes | float | Callable[[], object] | None
Script = Callable[[int, bytes], Iterable[Step]]


def answer(body: bytes = b"{}", status: str = "200 OK", *fields: str) -> bytes:
    """An HTTP/1.1 answer with a Content-Length (unless ``fields`` frame it otherwise)."""
    framed = any(f.lower().startswith(("content-length:", "transfer-encoding:")) for f in fields)
    lines = [f"HTTP/1.1 {status}", *fields]
    if not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int) -> bytes:
    """``body`` as chunks of ``size`` bytes, and the last chunk."""
    out = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
           for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n\r\n"


def ok(n: int, head: bytes) -> Iterable[Step]:
    """A clean kept-alive answer naming the request's number."""
    return [answer(b"answer %d" % n)]


def good(n: int, head: bytes) -> Iterable[Step]:
    """A replica's script: the contract's 200 JSON answer to every request."""
    return [answer(b'{"message": "ok", "status": "successful"}', "200 OK",
                   "Content-Type: application/json")]


def closed_at_the_end() -> Iterator[list[ScriptedReplica]]:
    """A fixture's body: the list a test puts its scripted replicas in, each closed after it."""
    made: list[ScriptedReplica] = []
    yield made
    for replica in made:
        replica.close()


class ScriptedReplica:
    def __init__(self, script: Script = ok) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.heads: list[bytes] = []  # every request head received, in order
        self.connections = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                with self._lock:
                    self.heads.append(head)
                    n = len(self.heads)
                try:
                    for step in self.script(n, head):
                        if step is None:
                            return
                        if isinstance(step, float):
                            time.sleep(step)
                        elif callable(step):
                            step()
                        else:
                            conn.sendall(step)
                except OSError:
                    return

    @property
    def requests(self) -> int:
        return len(self.heads)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


@contextmanager
def threads_balancer(folder: Path, addresses: list[str],
                     **config: Any) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """gunicorn with the threads worker (one worker) in front of ``addresses``, READY in a
    registry made here; no supervisor, so the registry stays as it is. Yields the base URL
    and the gunicorn (arbiter) process; stopped at the end."""
    from lb.balancer import Balancer

    config = {"port": free_port(), "workers": 1, "threads": 4, "worker": "threads",
              "deployment": f"thr{uuid.uuid4().hex[:8]}", **config}
    app = inprocess_balancer(str(folder), addresses, **config)
    settings = Balancer.of(app).settings
    env = {**os.environ, **settings.to_env()}
    log = open(folder / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:lb.gunicorn_conf"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "/_lb/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the balancer did not come up:\n"
                                     + (folder / "gunicorn.log").read_text(errors="replace"))
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
