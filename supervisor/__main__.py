"""``lb-supervisor``: run the reconcile loop until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from lb.backends import BackendError, create_backend
from lb.bootstrap import HashMapMismatch, ensure_registry
from lb.logs import configure_logging
from lb.ops.supervision import SupervisorMetrics
from lb.registry import Registry, RegistryError
from lb.settings import Settings, SettingsError
from supervisor.core import Supervisor

log = logging.getLogger("supervisor")


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"lb-supervisor: {exc}")
    configure_logging(settings)
    registry = Registry(settings.registry_path, settings.lock_timeout)
    try:
        ensure_registry(settings, registry)
    except HashMapMismatch as exc:
        sys.exit(f"lb-supervisor: {exc}")
    supervisor = Supervisor(settings, registry, create_backend(settings), SupervisorMetrics())
    supervisor.release_own_holds()

    stop = threading.Event()
    # Handlers only note the signal; the loop does the work (gunicorn's arbiter does the same).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("supervising %s (backend %s, every %.2gs)", registry.path, settings.backend,
             settings.heartbeat_interval)
    while not stop.is_set():
        began = time.monotonic()
        try:
            supervisor.tick()
        except (RegistryError, BackendError) as exc:
            log.warning("tick failed, retrying: %s", exc)
        stop.wait(max(0.0, settings.heartbeat_interval - (time.monotonic() - began)))
    supervisor.close()
    log.info("supervisor stopped")


if __name__ == "__main__":
    main()
