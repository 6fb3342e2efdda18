"""``lb-ha``: a highly available stack on one machine, in one command (``make run-ha``).

A 3-member etcd cluster from Debian's ``etcd-server`` on loopback ports, two supervisors (one
leads, one stands by), three balancers on consecutive ports and local replicas, all sharing
the registry in etcd. Ctrl-C (or SIGTERM) stops the balancers, the supervisors, every replica
of the deployment and the etcd members, and removes the cluster's data; killed with SIGKILL,
everything still goes (the lifeline, and a parent-death signal for the etcd members).

``EtcdCluster`` is also what the tests run etcd with.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import NoReturn

from lb import lifeline
from lb.backends import BackendError, create_backend
from lb.bootstrap import ensure_registry
from lb.etcd import Etcd, EtcdRegistry, EtcdUnreachable, put
from lb.logs import configure_logging
from lb.ops.metrics import ENV_DIR, prepare_multiprocess_dir
from lb.registry import READY, RegistryError
from lb.settings import EtcdAddress, Settings, SettingsError

log = logging.getLogger("lb-ha")

PR_SET_PDEATHSIG = 1


_prctl = ctypes.CDLL(None).prctl  # looked up here: the child only calls it


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it ends (etcd has no
    lifeline of its own). One system call, nothing allocated: safe beside threads."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports, below the kernel's ephemeral
    range (32768-60999 by default): a member or balancer restarted on its port must not find it
    held by some client's closed connection (TIME_WAIT of a socket without SO_REUSEADDR blocks
    the bind for a minute)."""
    ephemeral = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            ephemeral = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    low = max(1024, ephemeral - 12000)
    for _ in range(200):
        base = random.randrange(low, max(low + 1, ephemeral - count))
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no run of {count} free ports below {ephemeral}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EtcdCluster:
    """``size`` etcd members on loopback: client ports ``client_port + i``, peer ports
    ``peer_port + i``, data under ``folder``."""

    def __init__(self, folder: str, size: int = 3, client_port: int = 23791,
                 peer_port: int = 23801, host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.size = size
        self.host = host
        self.client_ports = [client_port + i for i in range(size)]
        self.peer_ports = [peer_port + i for i in range(size)]
        self.members: list[subprocess.Popen[bytes] | None] = [None] * size
        self._binary = shutil.which("etcd")
        if self._binary is None:
            raise FileNotFoundError("etcd is not installed (Debian: apt-get install "
                                    "etcd-server)")

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return tuple((self.host, p) for p in self.client_ports)

    def address(self, prefix: str) -> str:
        """The ``LB_REGISTRY`` of a deployment keeping its keys under ``prefix``."""
        return str(EtcdAddress(self.endpoints, "/" + prefix.strip("/")))

    def _command(self, i: int, state: str) -> list[str]:
        assert self._binary is not None
        cluster = ",".join(f"e{j}=http://{self.host}:{p}" for j, p in enumerate(self.peer_ports))
        client = f"http://{self.host}:{self.client_ports[i]}"
        peer = f"http://{self.host}:{self.peer_ports[i]}"
        return [self._binary, "--name", f"e{i}", "--data-dir", os.path.join(self.folder, f"e{i}"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", f"hashlb-{os.path.basename(self.folder)}",
                # Every registry write adds a revision: keep the last 10,000, or the history
                # fills etcd's 2 GB quota in days and the cluster refuses writes.
                "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000"]

    def start_member(self, i: int, state: str = "new") -> None:
        log_file = open(os.path.join(self.folder, f"e{i}.log"), "ab")  # noqa: SIM115
        with log_file:
            self.members[i] = subprocess.Popen(
                self._command(i, state), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - see _die_with_parent

    def start(self, timeout: float = 30.0) -> None:
        """Every member, then wait until the cluster takes a write."""
        os.makedirs(self.folder, exist_ok=True)
        for i in range(self.size):
            self.start_member(i)
        self.wait_writable(timeout)

    def wait_writable(self, timeout: float) -> None:
        Etcd(self.endpoints, deadline=timeout).txn([], [put("/hashlb-health", b"ok")])

    def pid(self, i: int) -> int:
        member = self.members[i]
        assert member is not None
        return member.pid

    def signal(self, i: int, sig: int) -> None:
        member = self.members[i]
        if member is not None and member.poll() is None:
            os.kill(member.pid, sig)

    def kill(self, i: int) -> None:
        self.signal(i, signal.SIGKILL)
        member = self.members[i]
        if member is not None:
            member.wait()

    def restart(self, i: int) -> None:
        """A killed member back with its data (it rejoins the cluster)."""
        self.kill(i)
        self.start_member(i, state="existing")

    def leader(self) -> int | None:
        """Which member leads etcd's own raft, from each member's status."""
        return Etcd(self.endpoints, deadline=2.0).raft_leader()

    def close(self) -> None:
        """Each member in turn: a leader stopped with its followers still up hands its
        leadership over at once; stopped beside them, it waits 7 s for a transfer that
        cannot happen."""
        for i, member in enumerate(self.members):
            if member is None:
                continue
            self.signal(i, signal.SIGCONT)
            self.signal(i, signal.SIGTERM)
            try:
                member.wait(timeout=10)
            except subprocess.TimeoutExpired:
                member.kill()
                member.wait()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lb-ha", description="A highly available stack on this machine: 3 etcd members, "
        "2 supervisors, several balancers on consecutive ports from LB_PORT, local replicas. "
        "Settings come from LB_* variables (LB_REGISTRY is set here). Ctrl-C stops all of it.")
    parser.add_argument("--balancers", type=int, default=3, help="balancers (default 3)")
    parser.add_argument("--supervisors", type=int, default=2, help="supervisors (default 2)")
    parser.add_argument("--etcd-port", type=int, default=23791,
                        help="first etcd client port (default 23791; peers from 23801)")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not 1 <= args.balancers <= 16 or not 1 <= args.supervisors <= 8:
        parser.error("1..16 balancers and 1..8 supervisors")
    return args


class HaStack:
    """The processes of a highly available stack, each reachable by role and index (tests and
    the benchmark kill and pause them one by one). ``logs``: a folder for each process's
    output (default: this process's own)."""

    def __init__(self, settings: Settings, balancers: int = 3, supervisors: int = 2,
                 etcd_port: int = 23791, logs: str | None = None,
                 ready_timeout: float = 60.0) -> None:
        self.folder = tempfile.mkdtemp(prefix=f"{settings.deployment}-ha-")
        self.cluster = EtcdCluster(os.path.join(self.folder, "etcd"), client_port=etcd_port,
                                   peer_port=etcd_port + 10)
        registry = self.cluster.address(f"hashlb/{settings.deployment}")
        self.settings = dataclasses.replace(settings, registry=registry)
        self.logs = logs
        self.ready_timeout = ready_timeout
        self.lifeline, self._lifeline_write = lifeline.create()
        self.env = {**os.environ, **self.settings.to_env(), **lifeline.child_env(self.lifeline)}
        self.ports = [self.settings.port + i for i in range(balancers)]
        self.balancers: list[subprocess.Popen[bytes] | None] = [None] * balancers
        self.supervisors: list[subprocess.Popen[bytes] | None] = [None] * supervisors
        self.signalled: list[int] = []
        self._said: set[str] = set()

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.settings.host}:{p}" for p in self.ports]

    def registry(self) -> EtcdRegistry:
        assert self.settings.etcd is not None
        return EtcdRegistry(self.settings.etcd, self.settings.lock_timeout)

    def start(self) -> None:
        self.cluster.start()
        log.info("etcd: %d members on %s", self.cluster.size,
                 ", ".join(f"{h}:{p}" for h, p in self.cluster.endpoints))
        backend = create_backend(self.settings)
        backend.stop_all()  # an earlier run's replicas of this deployment
        backend.prepare()
        ensure_registry(self.settings, self.registry(), reset=True)
        for i in range(len(self.supervisors)):
            self.start_supervisor(i)
        for i in range(len(self.balancers)):
            self.start_balancer(i)

    def start_supervisor(self, i: int) -> None:
        self.supervisors[i] = self._spawn(f"supervisor-{i + 1}",
                                          [sys.executable, "-m", "supervisor"], {})

    def start_balancer(self, i: int) -> None:
        port = self.ports[i]
        metrics = prepare_multiprocess_dir(os.path.join(self.folder, f"balancer-{port}",
                                                        "registry.json"))
        self.balancers[i] = self._spawn(
            f"balancer-{port}", [sys.executable, "-m", "gunicorn", "-c",
                                 "python:lb.gunicorn_conf"],
            {"LB_PORT": str(port), ENV_DIR: metrics})

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = None
        if self.logs is not None:
            out = open(os.path.join(self.logs, f"{name}.log"), "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(cmd, env={**self.env, **env}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT if out else None,
                                    pass_fds=(self.lifeline,))
        finally:
            if out is not None:
                out.close()

    def processes(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        named = [(f"supervisor {i + 1}", p) for i, p in enumerate(self.supervisors)]
        named += [(f"balancer :{port}", p) for port, p in zip(self.ports, self.balancers)]
        return [(name, p) for name, p in named if p is not None]

    def wait_ready(self) -> bool:
        registry = self.registry()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self.signalled:
            try:
                if all(r.state == READY for r in registry.read().members()):
                    return True
            except RegistryError:
                pass
            time.sleep(0.2)
        return False

    def run(self) -> int:
        """Until a signal. A process that dies is said once, and left dead: the others go on
        serving, which is the point."""
        while not self.signalled:
            for name, proc in self.processes():
                if proc.poll() is not None and name not in self._said:
                    log.warning("%s exited with %s; the others go on", name, proc.returncode)
                    self._said.add(name)
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """Balancers, then supervisors, then every replica of the deployment, then etcd."""
        procs = [p for _name, p in reversed(self.processes())]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused one must hear the SIGTERM
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            stopped = create_backend(self.settings).stop_all()
            log.info("stopped %d replicas", stopped)
        except BackendError as exc:
            log.error("could not stop the replicas: %s", exc)
        # The local replicas' logs (lb.backends.local): this run's, like everything else.
        shutil.rmtree(os.path.join(os.path.dirname(self.settings.registry_path), "logs"),
                      ignore_errors=True)
        self.cluster.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        for fd in (self._lifeline_write, self.lifeline):
            try:
                os.close(fd)
            except OSError:
                pass  # stopped twice


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"lb-ha: {exc}")
    configure_logging(settings)
    try:
        stack = HaStack(settings, args.balancers, args.supervisors, args.etcd_port,
                        ready_timeout=args.ready_timeout)
    except FileNotFoundError as exc:
        sys.exit(f"lb-ha: {exc}")

    def note(signum: int, _frame: object) -> None:
        stack.signalled.append(signum)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    code = 1
    try:
        stack.start()
        if stack.wait_ready():
            log.info("ready: %s (registry %s; Ctrl-C stops everything)",
                     "  ".join(stack.urls), stack.settings.registry)
            code = stack.run()
        elif stack.signalled:
            code = 0
        else:
            log.error("replicas were not ready within %.0fs", stack.ready_timeout)
    except (EtcdUnreachable, RegistryError, BackendError) as exc:
        log.error("cannot start: %s", exc)
    finally:
        stack.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
