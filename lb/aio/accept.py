"""New connections shared out evenly among the balancer's async workers.

Every worker listens on the socket gunicorn opened. Left to uvloop, the first worker to wake
accepts every connection waiting: a client or a proxy in front that opens a few keep-alive
connections at once lands whole on one worker, one core, while the others idle (measured: 6
connections of wrk split 6/0 between 2 workers in 5 runs of 8, 24 connections in 1 run of 6).
Here a worker takes one connection at a time, and leaves it to another worker that holds fewer.
HAProxy hands each new connection to its least loaded thread in the same spirit.

The workers see each other's counts in a small table of shared memory (``ConnectionTable``)
that gunicorn's arbiter makes before it forks them, with a slot per worker it assigns
(``lb.gunicorn_conf.pre_fork``). A worker that defers waits at most ``PATIENCE_SECONDS``: if
the worker that holds fewer does not take the connection by then (busy, stopped), it does.

A worker holds at most ``client_cap`` client connections at once, so that its replica
connections, the registry and its logs always find a file descriptor: at the cap it stops
accepting (the connection waits in the listen backlog, or another worker takes it) until one
of its connections ends. Without it, a few hundred idle connections took every descriptor and
clients already connected got 502s (no replica connection could be opened) and 503s (nor the
registry file).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import resource
import select
import socket
import ssl
from collections.abc import Callable, Iterable

from lb.settings import Settings
from lb.tls import PEEK_BYTES, opens_plain_http, refuse_plain_http

log = logging.getLogger("lb.aio")

FREE = -1  # a slot no accepting worker holds
RETRY_SECONDS = 0.001  # a worker that deferred looks at the socket again after this
PATIENCE_SECONDS = 0.005  # ... and takes the connection itself once it waited this long
BACKOFF_SECONDS = 1.0  # out of file descriptors: stop accepting for this long (as asyncio does)
# What accept() can meet that is the system's trouble, not the connection's.
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Descriptors a worker needs besides its connections: listeners, logs, metrics files, the
# registry and its lock, inotify, the loop's own (epoll, io_uring, pipes), the Flask app's
# calls. An idle worker holds about 25.
RESERVED_DESCRIPTORS = 64
# What a descriptor limit of "unlimited" means in practice: Linux's default fs.nr_open.
UNLIMITED_DESCRIPTORS = 1 << 20


def client_cap(settings: Settings, nofile: int | None = None) -> int:
    """The most client connections one worker holds at once: ``LB_MAX_CLIENTS``, or when it
    is 0, half of what the descriptor limit (``nofile``, by default this process's soft
    RLIMIT_NOFILE) leaves past ``RESERVED_DESCRIPTORS``. The other half is for connections to
    replicas, in use and idle together: a client has one request in flight at a time, so those
    in use never outnumber the clients, and the pool is to hold no more than that many in all
    (``ReplicaPool``'s ``connection_limit``)."""
    if settings.max_clients:
        return settings.max_clients
    return max(1, (_descriptor_limit(nofile) - RESERVED_DESCRIPTORS) // 2)


def client_cap_source(settings: Settings) -> str:
    """Where ``client_cap`` came from, for the worker's log."""
    if settings.max_clients:
        return "LB_MAX_CLIENTS"
    return (f"LB_MAX_CLIENTS=0: half of the descriptor limit {_descriptor_limit(None)} "
            f"past {RESERVED_DESCRIPTORS} reserved")


def _descriptor_limit(nofile: int | None) -> int:
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile > UNLIMITED_DESCRIPTORS:
        return UNLIMITED_DESCRIPTORS
    return nofile


def should_take(mine: int, others: Iterable[int], waited: float) -> bool:
    """Whether a worker holding ``mine`` connections takes the next one, when the other
    workers hold ``others`` (FREE: no accepting worker) and it has waited ``waited`` seconds
    for them to take it."""
    fewest = min((n for n in others if n != FREE), default=None)
    return fewest is None or mine <= fewest or waited >= PATIENCE_SECONDS


class ConnectionTable:
    """How many connections each worker holds: one 8-byte slot per worker, in anonymous shared
    memory made before the workers are forked (each writes its own slot, reads the others')."""

    def __init__(self, slots: int = 64) -> None:
        self._memory = mmap.mmap(-1, slots * 8)  # MAP_SHARED: forked workers share the pages
        self.counts = memoryview(self._memory).cast("q")
        for slot in range(slots):
            self.counts[slot] = FREE

    def claim(self, taken: Iterable[int]) -> int | None:
        """The lowest slot not in ``taken`` (the live workers'); None when every slot is taken
        (that worker then takes every connection it is woken for). The slot stays FREE until
        its worker accepts: nobody waits for a worker still loading the app."""
        used = set(taken)
        return next((slot for slot in range(len(self.counts)) if slot not in used), None)

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.counts[slot] = FREE

    def others(self, slot: int) -> list[int]:
        counts = self.counts.tolist()
        del counts[slot]
        return counts


class Share:
    """One worker's slot in the table: what it publishes, what it reads of the others; and
    its cap (0: none), which its acceptors wait under."""

    def __init__(self, table: ConnectionTable | None, slot: int | None,
                 held: Callable[[], int], cap: int = 0) -> None:
        self.table = table
        self.slot = slot if table is not None else None
        self.held = held  # the connections the worker holds, those still being set up included
        self.cap = cap
        self._waiting: list[Callable[[], None]] = []  # acceptors paused at the cap

    def full(self) -> bool:
        """The worker holds as many connections as its cap allows."""
        return 0 < self.cap <= self.held()

    def when_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once the worker is under its cap again (``publish``)."""
        self._waiting.append(resume)

    def publish(self) -> None:
        """The worker took or lost a connection."""
        if self.table is not None and self.slot is not None:
            self.table.counts[self.slot] = self.held()
        if self._waiting and not self.full():
            waiting, self._waiting = self._waiting, []
            for resume in waiting:
                resume()

    def takes(self, waited: float) -> bool:
        """Whether the worker takes the waiting connection (``should_take``)."""
        if self.table is None or self.slot is None:
            return True
        return should_take(self.held(), self.table.others(self.slot), waited)

    def release(self) -> None:
        """The worker accepts no more: the others no longer wait for it."""
        if self.table is not None:
            self.table.release(self.slot)
        self.slot = None


class Acceptor:
    """Accepts a listening socket's connections for one worker, one at a time, and hands each
    to ``factory``'s protocol on the loop.

    It listens, or waits without listening: a moment (another worker may take the
    connection), a second (out of descriptors), or until the worker is under its cap again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], share: Share,
                 tls: ssl.SSLContext | None = None, tls_timeout: float = 30.0) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.share = share
        # The HTTPS listener's: its connections are TLS, after a look at their first bytes
        # (lb.tls), which must come, and the handshake end, within tls_timeout seconds.
        self.tls = tls
        self.tls_timeout = tls_timeout
        self.opening: set[asyncio.Task[object]] = set()  # accepted, still being set up
        self._since: float | None = None  # when this worker first deferred the waiting one
        self._timer: asyncio.TimerHandle | None = None
        self._listening = False
        self._closed = False
        sock.setblocking(False)

    def start(self) -> None:
        if self._closed or self._listening:
            return
        if self.share.full():
            self.share.when_room(self._resume)
            return
        self._listening = True
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        """Accept no more (the socket itself is gunicorn's)."""
        self._closed = True
        self._stop_listening()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop_listening(self) -> None:
        if self._listening:
            self.loop.remove_reader(self.sock.fileno())
            self._listening = False

    def _readable(self) -> None:
        if self.share.full():  # another acceptor of the worker took the last one
            self._wait_for_room()
            return
        now = self.loop.time()
        if self._since is None:
            self._since = now
        if not self.share.takes(now - self._since):
            self._pause(RETRY_SECONDS)
            return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            self._since = None  # another worker took it
            return
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                log.error("accepting a connection: %s; accepting again in %.0f s", exc,
                          BACKOFF_SECONDS)
                self._pause(BACKOFF_SECONDS)
            return  # ECONNABORTED and the like: that client is gone already
        self._since = None
        conn.setblocking(False)
        task = self.loop.create_task(self._open(conn))
        self.opening.add(task)
        task.add_done_callback(self._opened)
        self.share.publish()
        if self.share.full():
            self._wait_for_room()

    def _wait_for_room(self) -> None:
        """At the cap: not listening until one of the worker's connections ends. The
        connections arriving meanwhile wait in the listen backlog, or another worker takes
        them (this one publishes the most a worker holds, so none defers to it)."""
        self._stop_listening()
        self.share.when_room(self._resume)

    async def _open(self, conn: socket.socket) -> object:
        try:
            if self.tls is None:
                return await self.loop.connect_accepted_socket(self.factory, conn)
            if opens_plain_http(await self._first_bytes(conn)):
                refuse_plain_http(conn)
                return None
            return await self.loop.connect_accepted_socket(
                self.factory, conn, ssl=self.tls, ssl_handshake_timeout=self.tls_timeout)
        except OSError as exc:  # TimeoutError and ssl.SSLError among them
            if self.tls is not None:
                log.info("TLS connection not set up: %s", exc or type(exc).__name__)
            conn.close()  # the client left before its connection was set up
            return None

    async def _first_bytes(self, conn: socket.socket) -> bytes:
        """The connection's first bytes, left unread (TimeoutError if none come in time)."""
        readable: asyncio.Future[None] = self.loop.create_future()
        fd = conn.fileno()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        self.loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(readable, self.tls_timeout)
        finally:
            self.loop.remove_reader(fd)
        return conn.recv(PEEK_BYTES, socket.MSG_PEEK)

    def _opened(self, task: asyncio.Task[object]) -> None:
        self.opening.discard(task)
        self.share.publish()

    def _pause(self, seconds: float) -> None:
        self._stop_listening()
        self._timer = self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self._closed or self._listening:
            return
        waiting = select.poll()  # poll: select() fails on descriptors past 1,023
        waiting.register(self.sock.fileno(), select.POLLIN)
        if not waiting.poll(0):
            self._since = None  # taken by another worker while this one waited
        self.start()
