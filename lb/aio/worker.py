"""The balancer's event-driven gunicorn worker (``LB_WORKER=async``, the default).

gunicorn stays the process manager: it forks these workers, restarts the ones that die or stop
notifying, and stops them on its signals. Each worker runs one uvloop event loop serving
``lb.aio.server`` on gunicorn's listening sockets; the Flask app (``lb.app:create_app()``, what
gunicorn loads) answers everything but routed GETs from a thread pool of ``LB_THREADS``, through
a2wsgi.

Stopping: SIGTERM (graceful) stops accepting, closes idle connections, lets requests in flight
finish for up to gunicorn's graceful timeout, then exits; SIGINT and SIGQUIT (quick) drop every
connection and exit at once. Neither waits on a blocked thread, so gunicorn never has to
SIGKILL a worker that is shutting down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import uvloop
from a2wsgi import WSGIMiddleware
from gunicorn import SERVER
from gunicorn.workers import base

from lb.aio.accept import Acceptor, ConnectionTable, Share, client_cap, client_cap_source
from lb.aio.server import ClientConnection, Limits, Server
from lb.aio.upstream import AsyncForwarder, ReplicaPool
from lb.balancer import Balancer
from lb.registry import RegistryView
from lb.settings import graceful_drain
from lb.tls import is_tls_listener, server_context
from lb.watch import RegistryWatch

NOTIFY_SECONDS = 1.0  # how often the worker tells the arbiter it is alive, and sweeps deadlines
# How stale a scrape may find this worker's counts: a few writes to the shared files a second
# instead of several per request (lb.ops.metrics.LoopCounts.flush).
METRICS_FLUSH_SECONDS = 0.1


class AsyncWorker(base.Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.quick = False  # SIGINT/SIGQUIT: no grace
        self.app_calls = 0  # Flask calls still running when the loop stopped
        self._wake: asyncio.Event | None = None
        # Set by the arbiter before the fork (lb.gunicorn_conf.pre_fork): the table of every
        # worker's connections and this worker's slot in it (lb.aio.accept).
        self.connection_table: ConnectionTable | None = None
        self.connection_slot: int | None = None
        self.share: Share | None = None
        self.acceptors: list[Acceptor] = []

    def init_process(self) -> None:
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._wake = asyncio.Event()
        super().init_process()  # signals, load_wsgi (the Flask app), then run()

    def init_signals(self) -> None:
        assert self.loop is not None
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        handlers = {signal.SIGTERM: self._graceful, signal.SIGQUIT: self._quick,
                    signal.SIGINT: self._quick, signal.SIGUSR1: self.log.reopen_files,
                    signal.SIGWINCH: lambda: None, signal.SIGABRT: self._abort}
        for sig, handler in handlers.items():
            self.loop.add_signal_handler(sig, handler)

    def _graceful(self) -> None:
        self.alive = False
        self._stop_accepting()
        self._wake_up()

    def _quick(self) -> None:
        self.alive = False
        self.quick = True
        self._stop_accepting()
        self._wake_up()

    def _stop_accepting(self) -> None:
        # At once (signal handlers run on the loop): no connection is taken after the signal,
        # and the other workers no longer leave any to this one.
        for acceptor in self.acceptors:
            acceptor.close()
        if self.share is not None:
            self.share.release()

    def _abort(self) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def run(self) -> None:
        assert self.loop is not None
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()
        if self.app_calls:
            # A call of the Flask app is still running in a pool thread (an /add waiting for
            # its replicas): the interpreter would wait for it at exit. Its registry entries
            # are the supervisor's to finish, as for any worker that dies mid-call.
            self.log.warning("exiting with %d admin call(s) unfinished", self.app_calls)
            logging.shutdown()
            os._exit(0)

    async def _serve(self) -> None:
        assert self.loop is not None and self._wake is not None
        loop = self.loop
        flask_app = self.wsgi
        balancer = Balancer.of(flask_app)  # the parts create_app built: one router, one metrics
        settings = balancer.settings
        # Client connections held at once: the rest of the descriptors stay for replica
        # connections, the registry and the logs (lb.aio.accept.client_cap).
        cap = client_cap(settings)
        self.log.info("holding at most %d client connections at once (%s)", cap,
                      client_cap_source(settings))
        pool = ReplicaPool(loop, settings.connect_timeout, settings.upstream_timeout,
                           settings.read_timeout, settings.max_reply, connection_limit=cap)
        bridge = WSGIMiddleware(flask_app, workers=settings.threads)
        limits = Limits(self.cfg.limit_request_line, self.cfg.limit_request_fields,
                        self.cfg.limit_request_field_size, settings.max_body)
        counts = balancer.metrics.batched()  # the loop's, written every tenth of a second
        server = Server(settings, limits, AsyncForwarder(settings, balancer.router, pool, counts),
                        bridge, counts, self.cfg.keepalive, SERVER)
        # Routing then looks at the registry file only after it changed, not on every request
        # (the etcd registry's view has a watch of its own).
        view = balancer.router.view
        watch = RegistryWatch.attach(view, loop) if isinstance(view, RegistryView) else None

        def flush_metrics() -> None:
            counts.flush()
            loop.call_later(METRICS_FLUSH_SECONDS, flush_metrics)

        flush_metrics()
        # New connections one at a time, to the worker holding fewest, none past the cap
        # (lb.aio.accept).
        self.share = share = Share(
            self.connection_table, self.connection_slot,
            lambda: len(server.connections) + sum(len(a.opening) for a in self.acceptors), cap)
        server.lost = share.publish
        tls = server_context(settings)  # for the HTTPS listener, if there is one (lb.tls)
        self.acceptors = [
            Acceptor(loop, listener.sock, lambda: ClientConnection(server, loop), share,
                     tls if is_tls_listener(settings, listener.sock.getsockname()) else None,
                     settings.client_timeout)
            for listener in self.sockets]
        if self.alive:  # not stopped while loading
            for acceptor in self.acceptors:
                acceptor.start()
            share.publish()  # accepting: from now on the others leave it connections
        sweep_every = max(0.1, min(NOTIFY_SECONDS, settings.client_timeout / 4))
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            server.sweep(loop.time())
            try:
                await asyncio.wait_for(self._wake.wait(), sweep_every)
            except TimeoutError:
                pass
        # Stopping: no new connections; idle ones closed; busy ones close after their reply.
        self._stop_accepting()
        server.shut(graceful=not self.quick)
        drain = graceful_drain(self.cfg.graceful_timeout)
        deadline = loop.time() + (0 if self.quick else drain)
        while server.connections and loop.time() < deadline and not self.quick:
            self.notify()
            await asyncio.sleep(0.05)
        if server.connections and not self.quick:
            self.log.warning("stopping: %d connection(s) still busy after %gs, closed",
                             len(server.connections), drain)
        server.shut(graceful=False)
        counts.flush()
        if watch is not None:
            watch.close()
        self.app_calls = server.app_calls
        pool.close()
        bridge.executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.sleep(0)  # let the transports finish closing
