"""``lb-supervisor``: run the reconcile loop until SIGTERM or SIGINT (or ``lb-run`` is gone).

With the etcd registry any number may run: one leads (``lb.etcd.Leadership``) and ticks, the
others stand by, trying to lead once a round, and take over when the leader's lease runs out.
A leader whose write is refused by the fence, or whose lease it could not refresh in time,
stops acting at once and stands by again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from lb import lifeline
from lb.backends import BackendError, create_backend
from lb.bootstrap import HashMapMismatch, ensure_registry
from lb.etcd import EtcdRegistry, EtcdUnreachable, Leadership, NotLeader
from lb.logs import configure_logging
from lb.registry import RegistryError
from lb.settings import Settings, SettingsError
from lb.stores import open_registry
from supervisor.core import Supervisor
from supervisor.metrics import SupervisorMetrics

log = logging.getLogger("supervisor")

# The longest wait between rounds while they fail (a registry that cannot be written, an engine
# that does not answer): short enough that recovery follows within seconds of the cause going.
LONGEST_WAIT = 2.0


class Trouble:
    """The loop's failures: one log line when trouble starts or changes, one when it ends (not
    one per round); while it lasts, the wait before the next round doubles up to a limit."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.key: tuple[str, str] | None = None
        self.since = 0.0
        self.rounds = 0

    def failed(self, exc: Exception) -> float:
        """Note a failed round; the seconds to wait before the next."""
        # The kind and the reason, not the whole text: a temp file's random name is no change.
        key = (type(exc).__name__, exc.detail if isinstance(exc, RegistryError) else str(exc))
        if key != self.key:
            if isinstance(exc, (RegistryError, BackendError)):
                log.error("supervising is stuck: %s; replicas keep serving, retrying with "
                          "back-off", exc)
            else:  # a bug: the traceback is worth having, once
                log.exception("supervising is stuck on an unexpected error; retrying with "
                              "back-off")
            if self.key is None:
                self.since = time.monotonic()
            self.key = key
        self.rounds += 1
        return min(max(LONGEST_WAIT, self.interval), self.interval * 2 ** (self.rounds - 1))

    def cleared(self) -> None:
        if self.key is not None:
            log.warning("supervising again after %.1fs (%d failed rounds)",
                        time.monotonic() - self.since, self.rounds)
        self.key, self.rounds = None, 0


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"lb-supervisor: {exc}")
    configure_logging(settings)
    try:
        backend = create_backend(settings)
    except BackendError as exc:
        sys.exit(f"lb-supervisor: {exc}")
    registry = open_registry(settings)
    try:
        ensure_registry(settings, registry)
    except HashMapMismatch as exc:
        sys.exit(f"lb-supervisor: {exc}")
    except EtcdUnreachable as exc:
        sys.exit(f"lb-supervisor: {exc}")
    except RegistryError:
        pass  # unreadable or unwritable: start_up() restores it in the loop, with back-off
    leadership: Leadership | None = None
    if isinstance(registry, EtcdRegistry):
        leadership = Leadership(registry.etcd, registry.leader_key, settings.leader_ttl,
                                f"{socket.gethostname()}:{os.getpid()}")
        registry = registry.fenced(leadership)
    supervisor = Supervisor(settings, registry, backend, SupervisorMetrics(),
                            may_act=leadership.holds if leadership else lambda: True)

    stop = threading.Event()
    # Handlers only note the signal; the loop does the work (gunicorn's arbiter does the same).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    line = lifeline.inherited()
    if line is not None:
        lifeline.watch(line, stop.set, "the supervisor")
    log.info("supervising %s (backend %s, every %.2gs)", registry.where, settings.backend,
             settings.heartbeat_interval)
    trouble = Trouble(settings.heartbeat_interval)
    standing = Standing(leadership) if leadership is not None else None
    started = False
    while not stop.is_set():
        began = time.monotonic()
        try:
            if standing is not None and not standing.leads():
                started = False  # a new term begins with start_up()
            else:
                if not started:
                    supervisor.start_up()
                    started = True
                supervisor.tick()
        except NotLeader as exc:
            log.warning("%s: standing by", exc)
            assert leadership is not None
            leadership.step_down()
            started = False
            wait = 0.0
        except Exception as exc:  # noqa: BLE001 - the loop outlives any one round's failure
            wait = trouble.failed(exc)
        else:
            trouble.cleared()
            wait = max(0.0, settings.heartbeat_interval - (time.monotonic() - began))
        stop.wait(wait)
    supervisor.close()
    if leadership is not None:
        leadership.step_down()  # the standby need not wait for the lease to run out
    log.info("supervisor stopped")


class Standing:
    """Whether this supervisor leads, asked once a round; said once each time it changes."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.leading: bool | None = None

    def leads(self) -> bool:
        leads = self.leadership.campaign()
        if leads != self.leading:
            if leads:
                log.info("leading the supervisors (lease of %ds, term %d)",
                         self.leadership.ttl, self.leadership.token)
            else:
                log.info("standing by: %s leads", self.leadership.leader() or "nobody yet")
            self.leading = leads
        return leads


if __name__ == "__main__":
    main()
