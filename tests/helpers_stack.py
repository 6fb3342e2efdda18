"""A stack shared by the tests of one module, and raw HTTP for requests no client library sends.

``running_stack`` is ``conftest.StackFactory`` (same ``RunningStack``, same clean-up check) as a
``with`` block, so a module-scoped fixture can start one stack for many checks.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.conftest import RunningStack, StackFactory, free_port, unavailable


@contextmanager
def running_stack(folder: Path, worker: str, **overrides: Any) -> Iterator[RunningStack]:
    factory = StackFactory(folder, worker)
    try:
        yield factory(**overrides)
    finally:
        factory.stop_all()


@contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """``chattr +i`` on ``folder`` for the block: nothing in it can be created, renamed or
    removed, by root too (the files already there can still be written). The real thing, as an
    operator's mistake or a read-only volume would do it; where the filesystem or the user
    cannot, the test is skipped (under CI: fails)."""
    if shutil.which("chattr") is None:
        unavailable("chattr is not installed (e2fsprogs)")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        unavailable(f"chattr +i does not work here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@dataclass
class RawReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reason: str = ""
    interim: tuple[int, ...] = ()  # 1xx replies before it (100 Continue)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def raw_http(url: str, request: bytes, timeout: float = 30) -> RawReply:
    """Send ``request`` byte for byte (it should say ``Connection: close``); parse the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    interim: list[int] = []
    while True:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/"):
            raise AssertionError(f"not an HTTP reply: {raw[:300]!r}")
        _, code, reason = (lines[0].split(" ", 2) + [""])[:3]
        if not code.startswith("1"):
            break
        interim.append(int(code))
        raw = body
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    if {k.lower(): v for k, v in headers}.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawReply(int(code), headers, body, reason, tuple(interim))  # type: ignore[arg-type]


def stalled_body(url: str, method: str, path: str, *headers: bytes) -> RawReply:
    """A request whose body stops coming: 7 of the 40 bytes it announces. The balancer answers
    once ``LB_CLIENT_TIMEOUT`` has passed, and closes the connection."""
    head = b"\r\n".join([f"{method} {path} HTTP/1.1".encode(), b"Host: balancer.test",
                          b"Content-Type: application/json", b"Content-Length: 40", *headers])
    return raw_http(url, head + b'\r\n\r\n{"n": 1')


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def get_request(target: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: balancer.test", *headers,
             b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def threads_balancer(stack: RunningStack) -> tuple[subprocess.Popen[bytes], str]:
    """A threads balancer on ``stack``'s registry, beside its own (async) one, for tests that
    compare the two workers (as ``bench/worker_ab.sh`` does)."""
    port = free_port()
    env = {**os.environ, **stack.settings.to_env(), "LB_WORKER": "threads",
           "LB_PORT": str(port), "LB_REGISTRY": stack.settings.registry_path}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(Path(stack.log_path).with_suffix(".threads.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:lb.gunicorn_conf"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/_lb/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the threads balancer did not come up")


# -- who answers which key ------------------------------------------------------------------------
def served_by(stack: RunningStack, keys: list[int], path: str = "/home",
              clients: int = 8) -> dict[int, str]:
    """Who answers each key's ``GET path?id=key`` (``X-Served-By``; a 200 each), ``clients``
    keep-alive connections in threads (raw http.client: 20,000 requests take seconds). Needs
    a stack whose key is ``query:id``."""
    host, port = stack.url.removeprefix("http://").split(":")

    def send(chunk: list[int]) -> dict[int, str]:
        served: dict[int, str] = {}
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            for key in chunk:
                for attempt in (1, 2):  # a kept-alive connection the server closed: once more
                    try:
                        conn.request("GET", f"{path}?id={key}")
                        reply = reply_of(conn)
                        break
                    except (http.client.RemoteDisconnected, ConnectionError):
                        conn.close()
                        if attempt == 2:
                            raise
                assert reply[0] == 200, (key, reply)
                served[key] = reply[1]
        finally:
            conn.close()
        return served

    with ThreadPoolExecutor(clients) as pool:
        result: dict[int, str] = {}
        for part in pool.map(send, [keys[i::clients] for i in range(clients)]):
            result.update(part)
    return result


def reply_of(conn: http.client.HTTPConnection) -> tuple[int, str, bytes]:
    """Status, ``X-Served-By`` and body of the answer waiting on ``conn``."""
    reply = conn.getresponse()
    body = reply.read()
    return reply.status, reply.getheader("X-Served-By") or "", body


def owners_by_map(stack: RunningStack, keys: list[int]) -> dict[int, str]:
    """Each key's owner by the registry's map at full weights (no ramp), computed here: what
    the balancer must route to once nothing ramps."""
    state = stack.state()
    routable = state.routable()
    lookup = state.lookup(stack.settings.strategy, routable)
    names = {r.server_id: r.hostname for r in routable}
    return {k: names[lookup.lookup(k)] for k in keys}  # type: ignore[index]

