"""Replicas as local gunicorn processes on loopback.

Each replica is ``gunicorn 'replica.app:create_app()'`` in a session of its own (so it outlives
the balancer worker that started it), listening on a socket this backend binds first on a free
loopback port and hands over as ``fd://N``: the port is known before the child runs and cannot be
taken by anyone else in between. Every process of a replica carries a unique token in its
environment; the handle is ``"<pid>/<token>"``, so a reused pid is never mistaken for a replica
and stop() finds a replica's workers even after its master was killed. A thread per replica
collects its exit status as soon as it ends, whoever stopped it, and a replica started under
``lb-run`` inherits its lifeline and stops when ``lb-run`` is gone (``lb.lifeline``).
"""

from __future__ import annotations

import builtins
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil

from lb import lifeline
from lb.backends.base import STOP_TIMEOUT, Backend, BackendError, Instance, ReplicaSpec
from lb.settings import Settings

log = logging.getLogger(__name__)

ENV_DEPLOYMENT = "HASHLB_DEPLOYMENT"
ENV_TOKEN = "HASHLB_INSTANCE"
ENV_HOSTNAME = "HASHLB_HOSTNAME"
ENV_ADDRESS = "HASHLB_ADDRESS"


def listen_on_loopback() -> tuple[socket.socket, str]:
    """A socket listening on a free loopback port, and its URL: a replica's, bound before the
    child runs (handed over as ``fd://N``) so the port is known and nobody can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
    except OSError:
        sock.close()
        raise
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def replica_marks(deployment: str, hostname: str, server_id: int, token: str,
                  address: str) -> dict[str, str]:
    """The environment of a replica's processes: its server id, and the marks by which list()
    and stop() know them as this deployment's."""
    return {"SERVER_ID": str(server_id), ENV_DEPLOYMENT: deployment, ENV_TOKEN: token,
            ENV_HOSTNAME: hostname, ENV_ADDRESS: address}


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.deployment = settings.deployment
        self.threads = settings.replica_threads
        self.log_dir = os.path.join(os.path.dirname(settings.registry_path), "logs")

    # -- start -----------------------------------------------------------------------------------
    def start(self, spec: ReplicaSpec) -> Instance:
        token = uuid.uuid4().hex
        line = lifeline.inherited()  # handed on: the replica stops when lb-run is gone
        try:
            sock, address = listen_on_loopback()
            with sock:  # closed here once the child holds its own copy
                env = {**os.environ, **replica_marks(self.deployment, spec.hostname,
                                                     spec.server_id, token, address)}
                os.makedirs(self.log_dir, exist_ok=True)
                log_path = os.path.join(self.log_dir, f"{spec.hostname}.log")
                fd = sock.fileno()
                cmd = [
                    sys.executable, "-m", "gunicorn", "-c", "python:lb.backends.replica_conf",
                    "--bind", f"fd://{fd}",
                    "--workers", "1", "--worker-class", "gthread", "--threads", str(self.threads),
                    "--graceful-timeout", "5", "--timeout", "30", "--log-level", "warning",
                    "--no-control-socket",
                    "--name", f"{self.deployment}-{spec.hostname}",
                    "replica.app:create_app()",
                ]
                with open(log_path, "ab") as logfile:
                    proc = subprocess.Popen(
                        cmd, env=env, pass_fds=(fd,) if line is None else (fd, line),
                        start_new_session=True,
                        stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                    )
        except OSError as exc:
            log.error("cannot start replica %s: %s", spec.hostname, exc)
            # Without the file name the error carries: the message may reach a client.
            raise BackendError(f"cannot start replica {spec.hostname}: "
                               f"{exc.strerror or type(exc).__name__}") from exc
        # Whoever stops the replica (this process, another worker's /rm, the supervisor, a
        # kill), its exit status is collected at once: no zombie waits for this process's next
        # call. A thread of its own, not SIGCHLD: this may run in any thread of a worker whose
        # main thread belongs to a server's event loop.
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
        log.info("started replica %s (server id %d) pid %d at %s",
                 spec.hostname, spec.server_id, proc.pid, address)
        return Instance(spec.hostname, f"{proc.pid}/{token}", address, spec.server_id)

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, handle: str, timeout: float = STOP_TIMEOUT) -> None:
        pid, token = _parse_handle(handle)
        procs = self._processes(token)
        masters = [p for p in procs if p.pid == pid] or procs
        for p in masters:
            _signal(p, signal.SIGTERM)  # gunicorn: graceful, in-flight requests finish
        for p in procs:
            _signal(p, signal.SIGCONT)  # a stopped (SIGSTOP) replica can only act on it so
        alive = _wait_gone(procs, timeout)
        for p in alive:
            _signal(p, signal.SIGKILL)
        _wait_gone(alive, 2)
        # Workers outlive a master killed with SIGKILL for a moment: sweep what is left.
        for p in self._processes(token):
            _signal(p, signal.SIGKILL)

    # -- list --------------------------------------------------------------------------------------
    def list(self) -> list[Instance]:
        groups: dict[str, list[tuple[psutil.Process, dict[str, str]]]] = {}
        for proc in psutil.process_iter(["environ"], ad_value=None):
            env = proc.info["environ"] or {}
            if env.get(ENV_DEPLOYMENT) == self.deployment and env.get(ENV_TOKEN) and _alive(proc):
                groups.setdefault(env[ENV_TOKEN], []).append((proc, env))
        instances = []
        for token, members in groups.items():
            pids = {p.pid for p, _ in members}
            # The master is the member whose parent is not a member.
            master, env = next(((p, e) for p, e in members if _ppid(p) not in pids), members[0])
            instances.append(Instance(
                env.get(ENV_HOSTNAME, "?"), f"{master.pid}/{token}", env.get(ENV_ADDRESS, ""),
                int(env["SERVER_ID"]) if env.get("SERVER_ID", "").isdigit() else None,
            ))
        return instances

    def is_running(self, handle: str) -> bool:
        pid, token = _parse_handle(handle)
        try:
            proc = psutil.Process(pid)
            return proc.environ().get(ENV_TOKEN) == token and _alive(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    # -- internals -----------------------------------------------------------------------------
    def _processes(self, token: str) -> builtins.list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["environ"], ad_value=None):
            env = proc.info["environ"] or {}
            if env.get(ENV_TOKEN) == token and _alive(proc):
                found.append(proc)
        return found


def _parse_handle(handle: str) -> tuple[int, str]:
    pid, sep, token = handle.partition("/")
    if not sep or not pid.isdigit() or not token:
        raise BackendError(f"not a local replica handle: {handle!r}")
    return int(pid), token


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``timeout`` seconds.

    A zombie has stopped: a replica this process did not start stays a zombie until its parent
    (often the supervisor) reaps it, and ``psutil.wait_procs`` would wait out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _ppid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass  # already gone: that is what we wanted
