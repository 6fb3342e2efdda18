"""A replica that breaks HTTP on purpose, per request path, for the trust tests.

It answers ``GET /heartbeat`` properly (200, kept alive), so the supervisor keeps it, and the
contract's ``/home``; every other path misbehaves in one way (or, for ``/echo``, carefully does
not, so that victims can tell their own answer from someone else's):

- ``/echo?id=X[&delay=S]``: 200 whose body (``{"id": X, ...}``) and ``X-Echo-Id`` carry ``X``,
  after ``S`` seconds; it also sends its own ``X-Served-By`` and ``X-Request-ID``, which the
  balancer must replace;
- ``/early-hints``: ``103 Early Hints``, then (20 ms later) the ``/echo`` answer;
- ``/continue``: ``100 Continue`` (unasked), then (20 ms later) the ``/echo`` answer;
- ``/switch``: ``101 Switching Protocols``, then bytes of "another protocol";
- ``/204-body``: ``204`` followed by stray bytes (a whole forged answer);
- ``/204``, ``/304``: those statuses, properly (no body);
- ``/extra``: the ``/echo`` answer, then an unsolicited second (forged) answer at once;
- ``/late``: the ``/echo`` answer, then a forged answer 0.2 s later if the connection stayed
  idle that long (bytes on an idle pooled connection);
- ``/drip?n=N&every=S``: a 200 of ``N`` bytes, one byte every ``S`` seconds;
- ``/hang``: never answers (holds the connection until the peer closes it);
- ``/stall``: a head announcing 1,000 bytes, 100 of them, then silence;
- ``/bighead``: a 200 whose head holds 200 KB of header fields;
- ``/manyfields``: a 200 whose head holds 5,000 header fields;
- ``/big?n=BYTES``: a 200 of ``BYTES`` bytes streamed from a generator (never held in memory).

Like gunicorn, it answers ``100 Continue`` to any request that says ``Expect: 100-continue``,
body or not: a balancer that forwards that field gets an interim answer to a GET. The forged
answers all say ``X-Echo-Id: smuggled-<path>``: a victim that gets one got someone else's bytes.

``GET /_heartbeat-delay?seconds=S`` (not counted) makes every later ``/heartbeat`` answer
``S`` seconds late, the rest as quick as before: a replica serving fine whose heartbeat queues.

Every request is counted by path (``GET /_counts`` on the replica itself, not counted: a JSON
object path -> requests received, plus ``expect`` for those that asked for 100-continue).

Run as ``python -m tests.helpers_misbehave --fd N`` (a listening socket handed over, as the local
backend starts replicas) or in a thread (``serve_in_thread``). ``start_misbehaving_replica``
starts it as one of a real stack's replicas, marked as the deployment's, so the supervisor
heartbeats it and ``lb-run`` stops it with the others.

The client side (``Client``, ``Reply``): raw HTTP/1.1 on one connection, one reply read at a
time (interim 1xx answers noted), for pipelining, half-closes and keep-alive victims.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self
from urllib.parse import parse_qs

import requests

from lb.backends.local import ENV_HOSTNAME, listen_on_loopback, replica_marks
from lb.leases import SUPERVISOR_HOLDER, Lease
from lb.registry import READY, Registry, Replica

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD_LIMIT = 60.0  # the longest /hang, /stall or /switch holds a connection
HEAD_LIMIT = 65536
INTERIM_PAUSE = 0.02  # between an interim answer and the final one (each its own write)


def forged(kind: str) -> bytes:
    """A whole answer nobody asked for: what a desynchronised balancer hands to a victim."""
    body = json.dumps({"id": f"smuggled-{kind}"}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nX-Echo-Id: smuggled-" + kind.encode()
            + b"\r\n\r\n" + body)


def answer(status: str, fields: list[tuple[str, str]], body: bytes = b"",
           length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in fields]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class MisbehavingReplica:
    """The server: a thread per connection, blocking sockets, HTTP/1.1 keep-alive."""

    def __init__(self, listener: socket.socket, hostname: str, server_id: str) -> None:
        self.listener = listener
        self.hostname = hostname
        self.server_id = server_id
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.heartbeat_delay = 0.0  # seconds each /heartbeat waits (GET /_heartbeat-delay)

    def serve_forever(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    # -- one connection ----------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data or len(buffer) > HEAD_LIMIT:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, target, version = (lines[0].split(" ") + ["", ""])[:3]
                    fields = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.strip()
                    length = int(fields.get("content-length", "0") or 0)
                    while len(buffer) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    buffer = buffer[length:]
                    close = (fields.get("connection", "").lower() == "close"
                             or version == "HTTP/1.0")
                    if not self._answer(conn, method, target, fields) or close:
                        return
            except OSError:
                return

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _answer(self, conn: socket.socket, method: str, target: str,
                fields: dict[str, str]) -> bool:
        """Answer one request; False: the connection is done."""
        path, _, query = target.partition("?")
        args = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if path == "/_heartbeat-delay":
            self.heartbeat_delay = min(float(args.get("seconds", "0") or 0), 30.0)
            conn.sendall(answer("200 OK", [], b"", 0))
            return True
        if path == "/_counts":
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
            conn.sendall(answer("200 OK", [("Content-Type", "application/json")], body,
                                len(body)))
            return True
        self._count(path)
        if fields.get("expect", "").lower() == "100-continue":
            self._count("expect")
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # as gunicorn does, body or not
            time.sleep(INTERIM_PAUSE)
        head_only = method == "HEAD"

        def send(data: bytes) -> None:
            if head_only:
                data = data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            conn.sendall(data)

        if path == "/heartbeat":
            time.sleep(self.heartbeat_delay)
            conn.sendall(answer("200 OK", [], b"", 0))
        elif path == "/home":
            body = json.dumps({"message": f"Hello from Server: {self.server_id}",
                               "status": "successful"}).encode()
            send(answer("200 OK", [("Content-Type", "application/json")], body, len(body)))
        elif path in ("/echo", "/early-hints", "/continue", "/extra", "/late"):
            time.sleep(min(float(args.get("delay", "0") or 0), 10.0))
            interim = {"/early-hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; "
                                       b"rel=preload\r\n\r\n",
                       "/continue": b"HTTP/1.1 100 Continue\r\n\r\n"}.get(path, b"")
            if interim:  # on its own, as a server that reports progress writes it
                conn.sendall(interim)
                time.sleep(INTERIM_PAUSE)
            stray = forged(path[1:]) if path == "/extra" else b""
            send(self._echo(args.get("id", ""), path) + stray)
            if path == "/late":
                ready, _, _ = select.select([conn], [], [], 0.2)
                if not ready:  # idle all that time: the bytes come on an idle connection
                    conn.sendall(forged("late"))
        elif path == "/switch":
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n\x81\x05hello" + forged("switch"))
            self._hold(conn)
            return False
        elif path == "/204-body":
            conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Echo-Id: none\r\n\r\n"
                         + forged("204-body"))
        elif path == "/204":
            conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Echo-Id: none\r\n\r\n")
        elif path == "/304":
            conn.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        elif path == "/drip":
            n, every = int(args.get("n", "20")), float(args.get("every", "0.2"))
            conn.sendall(answer("200 OK", [("Content-Type", "application/octet-stream")],
                                b"", n))
            for _ in range(n):
                time.sleep(every)
                conn.sendall(b"d")
        elif path == "/hang":
            self._hold(conn)
            return False
        elif path == "/stall":
            conn.sendall(answer("200 OK", [("Content-Type", "application/octet-stream")],
                                b"s" * 100, 1000))
            self._hold(conn)
            return False
        elif path == "/bighead":
            big = [(f"X-Big-{i}", "b" * 4000) for i in range(50)]  # 200 KB of fields
            send(answer("200 OK", big, b"{}", 2))
        elif path == "/manyfields":
            many = [(f"X-F{i}", "v") for i in range(5000)]
            send(answer("200 OK", many, b"{}", 2))
        elif path == "/big":
            n = int(args.get("n", "0"))
            send(answer("200 OK", [("Content-Type", "application/octet-stream")], b"", n))
            if not head_only:
                for chunk in _stream(n):
                    conn.sendall(chunk)
        else:
            page = b"<html><body><h1>404 Not Found</h1></body></html>"
            send(answer("404 Not Found", [("Content-Type", "text/html")], page, len(page)))
        return True

    def _echo(self, rid: str, path: str) -> bytes:
        body = json.dumps({"id": rid, "path": path, "replica": self.hostname}).encode()
        return answer("200 OK", [("Content-Type", "application/json"), ("X-Echo-Id", rid),
                                 ("X-Served-By", "replica-own"),
                                 ("X-Request-ID", "replica-own")], body, len(body))

    @staticmethod
    def _hold(conn: socket.socket) -> None:
        """Keep ``conn`` open, unanswered, until the peer closes it (or HOLD_LIMIT)."""
        conn.settimeout(HOLD_LIMIT)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


def _stream(n: int) -> Iterator[bytes]:
    chunk = b"0123456789abcdef" * 4096  # 64 KiB
    while n > 0:
        piece = chunk[:n]
        n -= len(piece)
        yield piece


# -- in the test process ---------------------------------------------------------------------------
@contextmanager
def serve_in_thread(hostname: str = "misbehave") -> Iterator[str]:
    """The replica on a free loopback port of this process; yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = MisbehavingReplica(listener, hostname, "0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.stop()
        thread.join(timeout=10)


def counts(address: str) -> Counter[str]:
    """What the replica at ``address`` has received so far, by path."""
    reply = requests.get(address + "/_counts", timeout=10)
    reply.raise_for_status()
    return Counter(reply.json())


def start_misbehaving_replica(registry: Registry, deployment: str, hostname: str,
                              timeout: float = 30) -> Replica:
    """The replica as a process marked as ``deployment``'s, taken in by the supervisor.

    As ``tests.helpers_echo.start_echo_replica`` does for the echo server: the socket bound
    here and handed over, its own session, the deployment's marks, registered ``starting``
    with its handle and address; the supervisor promotes it at its first heartbeat, and
    ``lb-run``'s shutdown stops it like any other replica.
    """
    token = uuid.uuid4().hex
    sock, address = listen_on_loopback()
    with sock:
        with registry.update() as state:
            server_id = next(state.free_server_ids())
            slots = state.hash_ring().add(server_id)
            state.replicas.append(Replica(hostname, server_id, list(slots),
                                          lease=Lease(f"add:test:{token[:8]}",
                                                      time.time() + timeout)))
        env = {**os.environ, **replica_marks(deployment, hostname, server_id, token, address)}
        fd = sock.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers_misbehave", "--fd", str(fd)],
            env=env, pass_fds=(fd,), start_new_session=True, cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with registry.update() as state:
        entry = state.find(hostname)
        assert entry is not None
        entry.handle, entry.address = f"{proc.pid}/{token}", address
        entry.lease = Lease(SUPERVISOR_HOLDER, time.time() + timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = registry.read().find(hostname)
        if entry is not None and entry.state == READY:
            return entry
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"misbehaving replica {hostname} never became ready: {registry.read()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="a listening socket's descriptor")
    options = parser.parse_args()
    listener = socket.socket(fileno=options.fd)
    MisbehavingReplica(listener, os.environ.get(ENV_HOSTNAME, "misbehave"),
                       os.environ.get("SERVER_ID", "0")).serve_forever()


if __name__ == "__main__":
    main()


# -- the client side: raw HTTP/1.1, one reply at a time ----------------------------------------
class Reply:
    """One reply as read off a client connection."""

    def __init__(self, status: int, reason: str, version: str, headers: list[tuple[str, str]],
                 body: bytes, interim: list[tuple[int, list[tuple[str, str]]]]) -> None:
        self.status, self.reason, self.version = status, reason, version
        self.headers, self.body = headers, body
        self.interim = interim  # the 1xx answers before it: status, header fields

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data

    def __repr__(self) -> str:
        return f"Reply({self.status} {self.reason!r}, {self.headers!r}, {self.body[:200]!r})"


class Client:
    """A raw client connection to ``url``: send bytes, read replies one by one."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, target: str, *headers: str, method: str = "GET") -> Reply:
        lines = [f"{method} {target} HTTP/1.1", "Host: balancer.test", *headers]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return self.read(head_only=method == "HEAD")

    def read(self, head_only: bool = False) -> Reply:
        """The next reply (interim 1xx replies noted and skipped). EOFError: closed first."""
        interim: list[tuple[int, list[tuple[str, str]]]] = []
        while True:
            line = self.file.readline(65537)
            if not line:
                raise EOFError("the connection closed before a final reply" + (
                    f" (after interim {[code for code, _ in interim]})" if interim else ""))
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/") or not code.isdigit():
                raise ValueError(f"not a status line: {line[:200]!r}")
            headers = []
            while True:
                field = self.file.readline(65537)
                if field in (b"\r\n", b"\n", b""):
                    break
                name, _, value = field.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            status = int(code)
            if 100 <= status < 200 and status != 101:
                interim.append((status, headers))
                continue
            break
        fields = {k.lower(): v for k, v in headers}
        if head_only or status in (101, 204, 304):
            body = b""
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.file.readline(1024).split(b";")[0], 16)
                chunk = self.file.read(size + 2)[:size]
                body += chunk
                if size == 0:
                    while self.file.readline(65537) not in (b"\r\n", b""):
                        pass  # trailers
                    break
        elif "content-length" in fields:
            body = self.file.read(int(fields["content-length"]))
        else:
            body = self.file.read()
        return Reply(status, reason, version, headers, body, interim)

    def at_eof(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (nothing more comes) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True
        except OSError:  # a timeout: still open
            return False
