"""The balancer worker's composition root: its parts, built once, typed, in one place.

A worker process needs settings, the registry store, the admin (``/add``, ``/rm``), metrics,
the router, the threads path's forwarder and the publisher of its answer counts. ``build_balancer`` makes them from the settings.
``lb.app.create_app`` (what gunicorn loads) builds one ``Balancer``, registers it on the Flask
app and hands it to its views and to the ``/_lb/`` endpoints (``lb.ops.blueprint.init_ops``);
the event-driven worker, whose routed GETs never reach Flask, takes the same one with
``Balancer.of(app)``. So both data paths route with one router and count in one metrics.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from flask import Flask

from lb.admin import Admin
from lb.backends import create_backend
from lb.bootstrap import ensure_registry
from lb.evidence import Publisher
from lb.ops.metrics import BalancerMetrics
from lb.registry import RegistryError
from lb.routing import Router
from lb.settings import Settings
from lb.stores import Store, open_registry
from lb.threads.forward import Forwarder

log = logging.getLogger(__name__)
EXTENSION_KEY = "lb"  # the app.extensions entry that holds the Balancer


@dataclass(frozen=True, slots=True)
class Balancer:
    """One balancer worker's parts. Frozen: the parts are made once, and each entry point
    holds the same ones (they keep their own state inside)."""

    settings: Settings
    registry: Store
    admin: Admin
    metrics: BalancerMetrics
    router: Router
    forwarder: Forwarder  # the threads path's; the event-driven worker makes its own
    evidence: Publisher  # the router's answer counts for the supervisor (lb.evidence)

    def register(self, app: Flask) -> None:
        """Make this the Balancer ``Balancer.of(app)`` returns."""
        app.extensions[EXTENSION_KEY] = self

    @staticmethod
    def of(app: Flask) -> Balancer:
        """The Balancer registered on ``app`` (by ``lb.app.create_app``)."""
        balancer = app.extensions.get(EXTENSION_KEY)
        if isinstance(balancer, Balancer):
            return balancer
        # As Flask extensions say it: a usage error, not a missing key to catch.
        raise RuntimeError(f"Flask app {app.name!r} has no lb.balancer.Balancer: it was not "
                           "made by lb.app.create_app")


def build_balancer(settings: Settings) -> Balancer:
    """The parts for ``settings``: opens the registry (creating it if there is none), and
    starts the router's view following it."""
    registry = open_registry(settings)
    try:
        ensure_registry(settings, registry)
    except RegistryError as exc:
        # A worker (re)started while the file is unreadable serves 503s until the supervisor
        # restores it, instead of failing to boot, which would make gunicorn stop them all.
        log.error("starting without a registry: %s", exc)
    # With the file store this balancer starts and stops the replicas of its own /add and
    # /rm; with etcd, the leading supervisor alone acts on replicas (lb.admin).
    admin = Admin(settings, registry, None if registry.kind == "etcd" else create_backend(settings))
    metrics = BalancerMetrics()
    router = Router(settings, registry, metrics)
    forwarder = Forwarder(settings, router)
    # Fail static needs a last good state: one from the start, kept recent.
    try:
        state = router.view.current()
        log.info("balancer worker %d starts with registry version %d (%d routable)",
                 os.getpid(), state.version, len(state.routable()))
    except RegistryError:
        pass  # the view has said why; it keeps trying
    router.view.follow(settings.heartbeat_interval)
    # Started in the worker by lb.gunicorn_conf.post_worker_init, withdrawn at its exit.
    evidence = Publisher(registry, lambda: router.answered, settings.heartbeat_interval / 2)
    return Balancer(settings, registry, admin, metrics, router, forwarder, evidence)
