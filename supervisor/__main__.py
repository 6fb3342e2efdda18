"""``lb-supervisor``: run the reconcile loop until SIGTERM or SIGINT (or ``lb-run`` is gone)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from lb import lifeline
from lb.backends import BackendError, create_backend
from lb.bootstrap import HashMapMismatch, ensure_registry
from lb.logs import configure_logging
from lb.registry import Registry, RegistryError
from lb.settings import Settings, SettingsError
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
    registry = Registry(settings.registry_path, settings.lock_timeout)
    try:
        ensure_registry(settings, registry)
    except HashMapMismatch as exc:
        sys.exit(f"lb-supervisor: {exc}")
    except RegistryError:
        pass  # unreadable or unwritable: start_up() restores it in the loop, with back-off
    supervisor = Supervisor(settings, registry, backend, SupervisorMetrics())

    stop = threading.Event()
    # Handlers only note the signal; the loop does the work (gunicorn's arbiter does the same).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    line = lifeline.inherited()
    if line is not None:
        lifeline.watch(line, stop.set, "the supervisor")
    log.info("supervising %s (backend %s, every %.2gs)", registry.path, settings.backend,
             settings.heartbeat_interval)
    trouble = Trouble(settings.heartbeat_interval)
    started = False
    while not stop.is_set():
        began = time.monotonic()
        try:
            if not started:
                supervisor.start_up()
                started = True
            supervisor.tick()
        except Exception as exc:  # noqa: BLE001 - the loop outlives any one round's failure
            wait = trouble.failed(exc)
        else:
            trouble.cleared()
            wait = max(0.0, settings.heartbeat_interval - (time.monotonic() - began))
        stop.wait(wait)
    supervisor.close()
    log.info("supervisor stopped")


if __name__ == "__main__":
    main()
