"""``lb-run``: the one command that runs everything, and stops everything on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from lb.registry import Registry
from lb.settings import Settings
from tests.conftest import RunningStack, deployment_processes, free_port
from tests.helpers_echo import start_echo_replica

pytestmark = pytest.mark.system


def test_help_lists_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "lb", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for name in ("LB_PORT", "LB_N", "LB_SLOTS", "LB_HASH", "LB_BACKEND", "LB_REGISTRY"):
        assert name in out


def test_bad_setting_is_a_clear_error_not_a_traceback() -> None:
    run = subprocess.run([sys.executable, "-m", "lb"], capture_output=True, text=True, check=False,
                         timeout=60, env={**os.environ, "LB_HASH": "md5"})
    assert run.returncode != 0
    assert "hash must be one of seed, cs60002, xxhash" in run.stderr
    assert "Traceback" not in run.stderr


def start_in_own_session(tmp_path: Path, worker: str, env: dict[str, str] | None = None,
                         **overrides: Any,
                         ) -> tuple[subprocess.Popen[bytes], str, Settings, Path]:
    """``lb-run`` as a terminal would run it (its own process group, for a Ctrl-C to reach
    every process of it), up and serving (its ``n`` replicas ready); the process, its URL,
    settings and log. ``env``: more of the environment."""
    deployment = f"cc{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env({}, port=free_port(), deployment=deployment, worker=worker,
                                 registry=str(tmp_path / "registry.json"), **overrides)
    log = tmp_path / "lb-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lb"],
                                env={**os.environ, **settings.to_env(), **(env or {})},
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            replicas = requests.get(url + "/rep", timeout=2).json()["message"]["replicas"]
            if len(replicas) == settings.n and (
                    settings.n == 0 or requests.get(url + "/home", timeout=5).status_code == 200):
                return proc, url, settings, log
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"lb-run did not come up:\n{log.read_text()}")
        time.sleep(0.2)


def test_ctrl_c_stops_balancer_supervisor_and_every_replica(tmp_path: Path,
                                                            lb_worker: str) -> None:
    proc, url, settings, _ = start_in_own_session(tmp_path, lb_worker)
    deployment = settings.deployment
    try:
        assert requests.post(url + "/add", json={"n": 1}, timeout=60).status_code == 200
        assert len(deployment_processes(deployment)) >= 8  # 4 replicas: master + worker each
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=60) == 0
        assert deployment_processes(deployment) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/rep", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def send(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


HALF_SENT = b"GET /home HTTP/1.1\r\nHost: x\r\n"  # in the middle of its headers
ADD_ONE = b"POST /add HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n" + b'{"n": 1}'


def stops_promptly(proc: subprocess.Popen[bytes], settings: Settings, log: Path,
                   connect: Callable[[], list[socket.socket]], signal_it: Callable[[], None],
                   what: str) -> bytes:
    """``signal_it()`` with the clients ``connect()`` returns connected: everything stops
    within seconds, and gunicorn never has to SIGKILL a worker that did not stop within its
    graceful timeout (15 s). The clients hang up only once everything has stopped. What the
    first one got."""
    held: list[socket.socket] = []
    try:
        held += connect()
        time.sleep(0.2)
        began = time.monotonic()
        signal_it()
        code = proc.wait(timeout=60)
        took = time.monotonic() - began
        held[0].settimeout(2)
        try:
            first = held[0].recv(65536)
        except OSError:
            first = b""
    finally:
        for sock in held:
            sock.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    print(f"\n[stop] worker={settings.worker}, {what}: everything stopped {took:.2f} s after")
    assert code == 0, text[-2000:]
    assert "SIGKILL" not in text and "WORKER TIMEOUT" not in text, text[-2000:]
    # gunicorn 27 SIGKILLs the workers left at its graceful timeout without a word: each one
    # must have said it exited (or, with an /add unfinished, that it exits without waiting).
    booted = re.findall(r"Booting worker with pid: (\d+)", text)
    assert booted and all(
        f"Worker exiting (pid: {pid})" in text
        or re.search(rf" {pid} [\w.]+ WARNING exiting with \d+ admin call", text)
        for pid in booted), text[-2000:]
    assert took < 10, text[-2000:]
    assert deployment_processes(settings.deployment) == []
    return first


def test_ctrl_c_with_clients_connected_needs_no_sigkill(tmp_path: Path, lb_worker: str) -> None:
    """Ctrl-C while clients hold kept-alive connections, half-sent requests and a request in
    flight."""
    proc, _url, settings, log = start_in_own_session(tmp_path, lb_worker)

    def connect() -> list[socket.socket]:
        held = []
        for _ in range(20):  # kept alive after one request each
            held.append(send(settings.port, HALF_SENT + b"\r\n"))
            assert held[-1].recv(65536).startswith(b"HTTP/1.1 200")
        held += [send(settings.port, HALF_SENT) for _ in range(5)]
        return [*held, send(settings.port, ADD_ONE)]

    stops_promptly(proc, settings, log, connect, signal_for(proc, "Ctrl-C"), "Ctrl-C")


def signal_for(proc: subprocess.Popen[bytes], stop: str) -> Callable[[], None]:
    """Ctrl-C reaches every process of the group; SIGTERM goes to ``lb-run`` alone (it stops
    the balancer gracefully)."""
    if stop == "Ctrl-C":
        return lambda: os.killpg(proc.pid, signal.SIGINT)
    return lambda: os.kill(proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("stop", ["Ctrl-C", "SIGTERM"])
def test_stop_with_a_request_body_still_coming_needs_no_sigkill(
        tmp_path: Path, lb_worker: str, stop: str) -> None:
    """The headers are in, the body is not: the request's thread (threads worker) is blocked
    reading it, past the point where a slow client's headers would be dropped."""
    proc, _url, settings, log = start_in_own_session(tmp_path, lb_worker)
    stops_promptly(proc, settings, log, lambda: [send(settings.port, ADD_ONE[:-5])],
                   signal_for(proc, stop), f"{stop}, a body still coming")


@pytest.mark.parametrize("stop", ["Ctrl-C", "SIGTERM"])
def test_stop_with_half_sent_requests_queued_behind_a_busy_thread_needs_no_sigkill(
        tmp_path: Path, lb_worker: str, stop: str) -> None:
    """One worker with one thread, busy with an /add: the half-sent requests after it wait in
    the thread pool's queue when the signal comes, and a thread only takes them afterwards.
    SIGTERM is a graceful stop: the /add in flight is answered."""
    proc, _url, settings, log = start_in_own_session(tmp_path, lb_worker, workers=1, threads=1)

    def connect() -> list[socket.socket]:
        busy = send(settings.port, ADD_ONE)
        time.sleep(0.05)
        return [busy, *(send(settings.port, HALF_SENT) for _ in range(2))]

    answer = stops_promptly(proc, settings, log, connect, signal_for(proc, stop), stop)
    if stop == "SIGTERM":
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer


def test_graceful_stop_with_a_client_that_does_not_read_its_reply_needs_no_sigkill(
        tmp_path: Path, lb_worker: str) -> None:
    """SIGTERM while the balancer writes a 16 MiB reply to a client that reads none of it: the
    worker waits for it most of gunicorn's graceful timeout (4 s here), then ends that
    connection itself and exits, before the arbiter would SIGKILL it."""
    proc, url, settings, log = start_in_own_session(
        tmp_path, lb_worker, env={"GUNICORN_CMD_ARGS": "--graceful-timeout 4"}, n=0)
    start_echo_replica(Registry(settings.registry_path), settings.deployment, "echo-big")
    assert requests.get(url + "/home", timeout=10).status_code == 200

    def connect() -> list[socket.socket]:
        stuck = send(settings.port, b"GET /big?n=16777216 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.5)  # the replica has answered; the balancer is blocked writing it
        return [stuck]

    first = stops_promptly(proc, settings, log, connect, signal_for(proc, "SIGTERM"),
                           "SIGTERM, a reply nobody reads")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first[:200]  # it was being sent
    assert "1 connection(s) still busy after 2s, closed" in log.read_text()  # ended, not killed


def test_add_that_times_out_is_rolled_back(make_stack: object) -> None:
    stack: RunningStack = make_stack(start_timeout=0.01)  # type: ignore[operator]
    before = stack.state()
    reply = stack.post("/add", json={"n": 2, "hostnames": ["Late"]})
    assert reply.status_code == 503
    body = reply.json()
    assert body["status"] == "failure"
    assert body["message"].startswith("<Error> New replicas did not answer their heartbeat")
    assert body["message"].endswith("nothing was added")
    after = stack.state()
    assert after.rep() == before.rep()
    time.sleep(1.5)  # the supervisor must not adopt or keep anything of the failed call
    running = {p.info["environ"].get("HASHLB_HOSTNAME")
               for p in deployment_processes(stack.settings.deployment)}
    assert running == {"Server1", "Server2", "Server3"}
