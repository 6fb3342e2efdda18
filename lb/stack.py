"""``lb-run``: the whole system in one command.

Starts a fresh registry, the supervisor (which brings up the N replicas) and the balancer under
gunicorn; waits until the replicas answer; on Ctrl-C or SIGTERM stops the balancer and the
supervisor, then every replica of the deployment, and nothing else. A supervisor that dies is
started again; if the balancer dies, everything stops.
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

from lb.backends import BackendError, create_backend
from lb.bootstrap import ensure_registry
from lb.logs import configure_logging
from lb.ops.metrics import ENV_DIR, prepare_multiprocess_dir
from lb.registry import READY, Registry, RegistryError, State
from lb.settings import Settings, SettingsError, settings_table
from lb.strategies import expected_shares

log = logging.getLogger("lb-run")


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
    parser.add_argument("--ready-timeout", type=float, default=60.0,
                        help="seconds to wait for the first replicas (default 60)")
    args = parser.parse_args(argv)
    if args.migrate_hash and not args.keep_registry:
        parser.error("--migrate-hash needs --keep-registry (a fresh registry has nothing to "
                     "migrate)")
    return args


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry_path, settings.lock_timeout)
        self.backend = create_backend(settings)
        self.env = {**os.environ, **settings.to_env(), "LB_REGISTRY": settings.registry_path}
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.balancer: subprocess.Popen[bytes] | None = None
        self.signalled: list[int] = []

    def start(self, keep_registry: bool) -> State:
        if not keep_registry:
            self.stop_replicas()  # leftovers of an earlier run that did not end cleanly
        self.backend.prepare()  # e.g. the replicas' Docker network
        state = ensure_registry(self.settings, self.registry, reset=not keep_registry)
        # Metrics of every balancer worker and the supervisor, added up at scrape time.
        self.env[ENV_DIR] = prepare_multiprocess_dir(self.settings.registry_path)
        self.supervisor = self._spawn([sys.executable, "-m", "supervisor"])
        self.balancer = self._spawn([sys.executable, "-m", "gunicorn",
                                     "-c", "python:lb.gunicorn_conf"])
        return state

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)

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
            assert self.balancer is not None and self.supervisor is not None
            if self.balancer.poll() is not None:
                log.error("the balancer exited with %s; stopping", self.balancer.returncode)
                return 1
            if self.supervisor.poll() is not None:
                log.warning("the supervisor exited with %s; starting it again",
                            self.supervisor.returncode)
                self.supervisor = self._spawn([sys.executable, "-m", "supervisor"])
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
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
    except SettingsError as exc:
        sys.exit(f"lb-run: {exc}")
    configure_logging(settings)
    if args.keep_registry:
        # Checked before anything is started or stopped: a refused resume leaves the
        # deployment's replicas exactly as they were.
        try:
            ensure_registry(settings, Registry(settings.registry_path, settings.lock_timeout),
                            migrate=args.migrate_hash)
        except RegistryError as exc:
            sys.exit(f"lb-run: {exc}")
    stack = Stack(settings)

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
            log.info("ready: http://%s:%d  N=%d %s  (Ctrl-C stops everything)",
                     settings.host, settings.port, rep["N"], rep["replicas"])
            code = stack.run()
        elif not stack.signalled:
            log.error("replicas were not ready within %.0fs", args.ready_timeout)
        else:
            code = 0
    except BackendError as exc:  # no engine, no network: say so, no traceback
        log.error("cannot start: %s", exc)
    finally:
        stack.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
