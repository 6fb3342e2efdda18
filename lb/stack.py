"""``lb-run``: the whole system in one command.

Starts a fresh registry, the supervisor (which brings up the N replicas) and the balancer under
gunicorn; waits until the replicas answer; on Ctrl-C or SIGTERM stops the balancer and the
supervisor, then every replica of the deployment, and nothing else. A supervisor that dies is
started again (after 0.5, 1, 2 ... seconds if it keeps dying); if the balancer dies, everything
stops. Killed with SIGKILL, it leaves nothing running either: everything it started holds its
lifeline (``lb.lifeline``) and stops when it is cut, and the next start of the same deployment
stops whatever is left of an earlier one (refusing to start if that one's ``lb-run`` still runs).

``--role balancer`` or ``--role supervisor`` starts one part only, against a registry another
part shares (``LB_REGISTRY=etcd://...``, or the same file): such a run, and any run on the
etcd registry, neither resets the registry nor stops the deployment's replicas, which other
balancers and supervisors may be serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import NoReturn

import psutil

from lb import lifeline
from lb.backends import BackendError, create_backend
from lb.bootstrap import ensure_registry
from lb.logs import configure_logging
from lb.ops.metrics import ENV_DIR, prepare_multiprocess_dir
from lb.owners import owner_alive, owner_tag
from lb.registry import (
    READY,
    REMOVING,
    STARTING,
    RegistryError,
    RegistryUnreadable,
    State,
)
from lb.settings import Settings, SettingsError, settings_table
from lb.stores import open_registry
from lb.strategies import expected_shares
from lb.tls import served_urls, server_context

log = logging.getLogger("lb-run")

# Every process of a stack (supervisor, balancer, the local replicas they start: children
# inherit the environment) carries the deployment and the identity of its lb-run.
ENV_STACK = "HASHLB_STACK"
ENV_RUN = "HASHLB_RUN"
LEFTOVER_STOP_TIMEOUT = 10.0
LONGEST_RESTART_WAIT = 30.0
ROLES = ("all", "balancer", "supervisor")


class AlreadyRunning(Exception):
    """Another lb-run of the same deployment is alive."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lb-run",
        description="Run the load balancer, its supervisor and N replicas (local processes by "
                    "default) until Ctrl-C. Settings come from LB_* environment variables.",
        epilog="settings (environment variable, default, meaning):\n" + settings_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keep-registry", action="store_true",
                        help="resume from the existing registry instead of starting afresh; "
                             "refused when it was written with another hash map (LB_HASH, "
                             "LB_SLOTS, LB_VIRTUAL, LB_PROBING)")
    parser.add_argument("--migrate-hash", action="store_true",
                        help="with --keep-registry: place every replica's virtual servers again "
                             "under the settings' hash map instead of refusing (keys move)")
    parser.add_argument("--role", choices=ROLES, default="all",
                        help="what to run: all (balancer and supervisor, the default), "
                             "balancer or supervisor alone, against a shared registry")
    parser.add_argument("--ready-timeout", type=float, default=60.0,
                        help="seconds to wait for the first replicas (default 60)")
    args = parser.parse_args(argv)
    if args.migrate_hash and not args.keep_registry:
        parser.error("--migrate-hash needs --keep-registry (a fresh registry has nothing to "
                     "migrate)")
    return args


class Stack:
    def __init__(self, settings: Settings, role: str = "all") -> None:
        self.settings = settings
        self.role = role
        # Shared: other runs serve the same deployment, so this one owns no replica.
        self.shared = role != "all" or settings.etcd is not None
        self.registry = open_registry(settings)
        self.backend = create_backend(settings)
        self.run_id = owner_tag("run")
        # The read end goes to every child; the write end stays here alone (os.pipe() makes
        # both non-inheritable, and only pass_fds hands the read end on).
        self.lifeline, self._lifeline_write = lifeline.create()
        registry = settings.registry if settings.etcd else settings.registry_path
        self.env = {**os.environ, **settings.to_env(), "LB_REGISTRY": registry,
                    ENV_STACK: self.stack_name, ENV_RUN: self.run_id,
                    **lifeline.child_env(self.lifeline)}
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.balancer: subprocess.Popen[bytes] | None = None
        self.signalled: list[int] = []
        self.claimed = False  # no other run of this deployment is alive: its processes are ours
        self._restarts = 0
        self._restart_at = self._started_at = 0.0

    @property
    def stack_name(self) -> str:
        """The deployment and its registry (and, shared, the part and port): what makes two
        runs "the same run"."""
        name = f"{self.settings.deployment}:{self.settings.registry or self.settings.registry_path}"
        return f"{name}:{self.role}:{self.settings.port}" if self.shared else name

    def start(self, keep_registry: bool) -> State:
        """Start everything; the registry's state it starts from."""
        # Leftovers of an earlier run that did not end cleanly: its processes, then any replica
        # of the deployment (also those a supervisor not started by lb-run left).
        self.stop_leftovers()
        self.claimed = True
        if self.shared:  # the registry and the replicas are everyone's: created if missing
            if self.role != "balancer":
                self.backend.prepare()
            state = ensure_registry(self.settings, self.registry)
        else:
            self.stop_replicas()
            self.backend.prepare()  # e.g. the replicas' Docker network
            state = ensure_registry(self.settings, self.registry, reset=not keep_registry)
            if keep_registry:
                self.resume_registry()
                state = self.registry.read()
        # Metrics of every balancer worker and the supervisor, added up at scrape time (a
        # folder of this run's own when others on this host share the deployment).
        anchor = self.settings.registry_path
        if self.shared:
            anchor = os.path.join(os.path.dirname(anchor), f"{self.role}-{self.settings.port}",
                                  "registry.json")
        self.env[ENV_DIR] = prepare_multiprocess_dir(anchor)
        if self.role != "balancer":
            self.supervisor = self._spawn([sys.executable, "-m", "supervisor"])
        if self.role != "supervisor":
            self.balancer = self._spawn([sys.executable, "-m", "gunicorn",
                                         "-c", "python:lb.gunicorn_conf"])
        self._started_at = time.monotonic()
        return state

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                pass_fds=(self.lifeline,))

    def stop_leftovers(self) -> int:
        """Stop the processes of an earlier run of this deployment whose lb-run is gone; how
        many there were. Raises ``AlreadyRunning`` if that lb-run is alive."""
        leftovers: list[psutil.Process] = []
        for proc in psutil.process_iter(["environ"], ad_value=None):
            env = proc.info["environ"] or {}
            if env.get(ENV_STACK) != self.stack_name or proc.pid == os.getpid():
                continue
            run = env.get(ENV_RUN, "")
            alive = owner_alive(run)
            if alive:
                raise AlreadyRunning(f"deployment {self.settings.deployment} already runs "
                                     f"(lb-run pid {run.split(':')[1]}); stop it first")
            if alive is None:
                log.warning("leaving process %d alone: its lb-run (%s) cannot be checked from "
                            "here", proc.pid, run)
                continue
            leftovers.append(proc)
        for proc in leftovers:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        _gone, alive_ones = psutil.wait_procs(leftovers, timeout=LEFTOVER_STOP_TIMEOUT)
        for proc in alive_ones:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive_ones, timeout=5)
        if leftovers:
            log.warning("stopped %d processes left by an earlier run of %s", len(leftovers),
                        self.settings.deployment)
        return len(leftovers)

    def resume_registry(self) -> None:
        """Resuming: every replica of the deployment was just stopped, so each wanted entry
        gets a new process under its own name, server id and slots (not a replacement under a
        new name, as a replica that died would); half-done removals are done."""
        with self.registry.update() as state:
            state.replicas = [r for r in state.replicas if r.state != REMOVING]
            for r in state.replicas:
                r.state = STARTING
                r.unplaced()
                r.lease = None
                r.failures = r.restarts = 0
                r.not_before = 0.0

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.signalled:
            try:
                state = self.registry.read()
                if all(r.state == READY for r in state.members()):
                    return True
            except RegistryError:
                pass
            if self.balancer is not None and self.balancer.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def run(self) -> int:
        """Watch the children until a signal comes or the balancer dies."""
        while not self.signalled:
            if self.balancer is not None and self.balancer.poll() is not None:
                log.error("the balancer exited with %s; stopping", self.balancer.returncode)
                return 1
            if self.supervisor is not None and self.supervisor.poll() is not None:
                self._restart_supervisor()
            time.sleep(0.2)
        return 0

    def _restart_supervisor(self) -> None:
        """Start a dead supervisor again; one that keeps dying waits 0.5, 1, 2 ... seconds
        (up to 30) between starts, and one that ran a minute counts as healthy again."""
        assert self.supervisor is not None
        now = time.monotonic()
        if self._restart_at == 0.0:  # just found dead: decide when
            if now - self._started_at > 60:
                self._restarts = 0
            wait = (min(LONGEST_RESTART_WAIT, 0.5 * 2 ** (self._restarts - 1))
                    if self._restarts else 0.0)
            log.warning("the supervisor exited with %s; starting it again%s",
                        self.supervisor.returncode, f" in {wait:g}s" if wait else "")
            self._restart_at = now + wait
        if now >= self._restart_at:
            self.supervisor = self._spawn([sys.executable, "-m", "supervisor"])
            self._started_at, self._restart_at = now, 0.0
            self._restarts += 1

    def stop(self) -> None:
        if not self.claimed:  # another run owns this deployment: touch nothing
            return
        # The supervisor goes first so it cannot start replicas we are about to stop.
        for proc in (self.supervisor, self.balancer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (self.supervisor, self.balancer):
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.shared:
            return  # the replicas go on serving the other balancers
        try:
            stopped = self.stop_replicas()
            self.backend.release()
        except BackendError as exc:
            log.error("could not clean up: %s", exc)
        else:
            log.info("stopped %d replicas", stopped)

    def stop_replicas(self) -> int:
        """Every replica carrying this deployment's mark, whether the registry knows it or not."""
        return self.backend.stop_all()


def expected_shares_line(settings: Settings, state: State) -> tuple[int, str]:
    """The start line: the shares of all 6-digit request ids each wanted replica can expect
    under the strategy that routes, and a log level (a warning when the map is lopsided)."""
    members = sorted(state.members(), key=lambda r: r.server_id)
    if not members:
        return logging.INFO, f"hash {state.ring.hash}: no replicas at start"
    shares = expected_shares(state.lookup(settings.strategy, members))
    figures = " / ".join(f"{100 * shares.get(r.server_id, 0.0):.1f}" for r in members)
    names = ", ".join(r.hostname for r in members)
    n = len(members)
    top = max(shares.values(), default=0.0) * n
    if settings.strategy == "ring":
        head = (f"hash {state.ring.hash} (M={state.ring.slots}, K={state.ring.virtual}): "
                f"expected shares {figures} % ({names}; all 6-digit request ids)")
        tail = " - see LB_HASH"
    else:
        head = (f"strategy {settings.strategy} (LB_HASH is not used by it): expected shares "
                f"{figures} % ({names}; all 6-digit request ids)")
        tail = " - see LB_STRATEGY"
    if top > 1.5:
        return logging.WARNING, (f"{head}; the busiest replica gets {top:.1f} x its fair "
                                 f"share{tail} and docs/hash-formulas.md")
    return logging.INFO, head + tail


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
        server_context(settings)  # the certificate and key, checked before anything starts
    except SettingsError as exc:
        sys.exit(f"lb-run: {exc}")
    configure_logging(settings)
    if args.keep_registry or settings.etcd is not None:
        # Checked before anything is started or stopped: a refused resume leaves the
        # deployment's replicas exactly as they were; an etcd that cannot be reached is said
        # in one line.
        try:
            ensure_registry(settings, open_registry(settings), migrate=args.migrate_hash)
        except RegistryError as exc:
            sys.exit(f"lb-run: {exc}")
    stack = Stack(settings, args.role)

    def note(signum: int, _frame: object) -> None:
        stack.signalled.append(signum)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    code = 1
    try:
        state = stack.start(args.keep_registry)
        log.log(*expected_shares_line(settings, state))
        if stack.wait_ready(args.ready_timeout):
            rep = stack.registry.read().rep()
            if stack.balancer is None:
                log.info("supervising  N=%d %s  (Ctrl-C stops it)", rep["N"], rep["replicas"])
            else:
                log.info("ready: %s  N=%d %s  (Ctrl-C stops %s)", served_urls(settings),
                         rep["N"], rep["replicas"], "this run" if stack.shared else "everything")
            code = stack.run()
        elif not stack.signalled:
            log.error("replicas were not ready within %.0fs", args.ready_timeout)
        else:
            code = 0
    except RegistryUnreadable as exc:  # only when resuming: a fresh start replaces the file
        log.error("cannot resume: %s; start without --keep-registry to start afresh, or put a "
                  "good registry back", exc)
    except (BackendError, RegistryError, AlreadyRunning) as exc:  # say so, no traceback
        log.error("cannot start: %s", exc)
    finally:
        stack.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
