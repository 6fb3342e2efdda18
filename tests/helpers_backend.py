"""The tests' one stand-in for the ``Backend`` seam: replicas that exist only as records.

``FakeBackend`` starts no process. ``start()`` records the spec and returns an ``Instance`` with
the handle ``<hostname>#<n>`` (``n`` counts the starts, so a second start under one name is
another replica) at ``address(spec)``: by default a loopback address nothing answers on, or,
for tests that need answers, a path of a real server's (an echo server: ``address=lambda s:
f"{echo}/r/{s.hostname}"``). ``stop()`` records the handle and forgets the replica; already
gone is success, as for every backend. ``list()`` and ``is_running()`` answer from what runs.

The knobs a test turns:

- ``running``: instances that run before anything is started (constructor arguments);
- ``start_error``: every start raises it (an image that is missing, an engine that refuses);
- ``die(hostname)``: that replica's process is gone;
- ``mute``: hostnames whose heartbeat never answers (a hung replica, or one that never comes up);
- ``late``: hostnames whose heartbeat times out (a replica busy, or hung);
- ``probe``: a stand-in for ``lb.heartbeat.probe`` (``monkeypatch.setattr(supervisor.core,
  "probe", backend.probe)``) answering for every running replica that is not mute: the
  supervisor's reconcile step runs without a process or a socket.

What happened is in ``started`` (hostnames, one per start call, failed ones included),
``start_times`` (``time.monotonic()`` of each), ``stopped`` (handles) and ``log`` (``("start",
handle)`` and ``("stop", handle)`` in order).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lb.backends import STOP_TIMEOUT, Backend, Instance, ReplicaSpec
from lb.heartbeat import ANSWERED, FAILED, LATE, Heartbeat

NOBODY = "http://127.0.0.1:9"  # the discard port: nothing answers a heartbeat there


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, *running: Instance, address: Callable[[ReplicaSpec], str] | None = None,
                 start_error: Exception | None = None) -> None:
        self.running: dict[str, Instance] = {i.handle: i for i in running}
        self.address = address or (lambda spec: f"{NOBODY}/{spec.hostname}")
        self.start_error = start_error
        self.mute: set[str] = set()
        self.late: set[str] = set()
        self.started: list[str] = []
        self.start_times: list[float] = []
        self.stopped: list[str] = []
        self.log: list[tuple[str, str]] = []

    # -- the Backend interface -----------------------------------------------------------------
    def start(self, spec: ReplicaSpec) -> Instance:
        self.started.append(spec.hostname)
        self.start_times.append(time.monotonic())
        if self.start_error is not None:
            raise self.start_error
        inst = Instance(spec.hostname, f"{spec.hostname}#{len(self.started)}",
                        self.address(spec), spec.server_id)
        self.running[inst.handle] = inst
        self.log.append(("start", inst.handle))
        return inst

    def stop(self, handle: str, timeout: float = STOP_TIMEOUT) -> None:
        self.stopped.append(handle)
        self.log.append(("stop", handle))
        self.running.pop(handle, None)

    def list(self) -> list[Instance]:
        return list(self.running.values())

    def is_running(self, handle: str) -> bool:
        return handle in self.running

    @classmethod
    def behind(cls, server: str) -> FakeBackend:
        """Replicas that are paths of ``server`` (an echo server answers on every path): their
        heartbeats and requests are answered for real, by one server in this process."""
        return cls(address=lambda spec: f"{server}/r/{spec.hostname}")

    # -- what the test does to its replicas ----------------------------------------------------
    def die(self, hostname: str) -> Instance:
        """The process of the replica called ``hostname`` is gone (killed, crashed)."""
        [inst] = [i for i in self.running.values() if i.hostname == hostname]
        del self.running[inst.handle]
        return inst

    def probe(self, address: str, timeout: float) -> Heartbeat:
        """``lb.heartbeat.probe`` for these replicas: a running one answers unless mute (then
        its heartbeat failed) or late (then it timed out)."""
        found = [i for i in self.running.values() if i.address == address]
        if any(i.hostname in self.late for i in found):
            return LATE
        if any(i.hostname not in self.mute for i in found):
            return ANSWERED
        return FAILED
