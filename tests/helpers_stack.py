"""A stack shared by the tests of one module, and raw HTTP for requests no client library sends.

``running_stack`` does what ``conftest.make_stack`` does (same ``RunningStack``, same clean-up
check) in a ``with`` block, so a module-scoped fixture can start one stack for many checks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from lb.settings import Settings
from tests.conftest import RunningStack, free_port, kill_deployment


@contextmanager
def running_stack(folder: Path, **overrides: Any) -> Iterator[RunningStack]:
    deployment = f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "port": free_port(), "deployment": deployment, "workers": 2, "threads": 8,
        "registry": str(folder / deployment / "registry.json"),
    }
    values.update(overrides)
    settings = Settings.from_env({}, **values)
    log_path = folder / f"{deployment}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lb"], env={**os.environ,
                                                                   **settings.to_env()},
                                stdout=log, stderr=subprocess.STDOUT)
    stack = RunningStack(f"http://127.0.0.1:{settings.port}", settings, proc, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if stack.get("/rep", timeout=2).status_code == 200:
                    stack.wait_ready(settings.n, timeout=max(1.0, deadline - time.monotonic()))
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its worker still booting
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"lb-run did not come up:\n{stack.log()}")
            time.sleep(0.1)
        yield stack
    finally:
        stack.session.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        leftovers = kill_deployment(deployment)
    assert leftovers == 0, f"{leftovers} processes of {deployment} outlived lb-run"


@dataclass
class RawReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

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
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        raise AssertionError(f"not an HTTP reply: {raw[:300]!r}")
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    status = int(lines[0].split(" ", 2)[1])
    if {k.lower(): v for k, v in headers}.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawReply(status, headers, body)  # type: ignore[arg-type]


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
