"""Chaos: replicas killed with SIGKILL while clients keep sending GETs.

Target: not one failed request the client can see, and N replicas again after every kill. The
size is a setting: ``CHAOS_REQUESTS`` (default 4000), ``CHAOS_KILLS`` (default 4) and
``CHAOS_INTERVAL`` (seconds between kills, default 3); a soak run is e.g.
``CHAOS_REQUESTS=20000 CHAOS_KILLS=10 CHAOS_INTERVAL=5``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import psutil
import pytest

from lb.registry import READY
from tests.conftest import RunningStack
from tests.helpers_chaos import (
    Load,
    env_float,
    env_int,
    processes_match_registry,
    report,
    wait_for,
)
from tests.helpers_echo import processes_of

pytestmark = pytest.mark.system


def kill_replica(handle: str, whole: bool) -> int:
    """SIGKILL a replica: every process of it (``whole``), or only its gunicorn master."""
    pid = int(handle.partition("/")[0])
    procs = processes_of(handle)
    victims = procs if whole else [p for p in procs if p.pid == pid]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return len(victims)


def restored(stack: RunningStack, n: int, gone: str) -> Callable[[], str | None]:
    def check() -> str | None:
        state = stack.state()
        members = state.members()
        names = [r.hostname for r in members]
        if gone in names or len(members) != n or any(r.state != READY for r in members):
            return f"members={[(r.hostname, r.state) for r in members]}"
        return None
    return check


def test_replica_kills_under_load_fail_no_request(make_stack: Callable[..., RunningStack]) -> None:
    total = env_int("CHAOS_REQUESTS", 4000)
    kills = env_int("CHAOS_KILLS", 4)
    interval = env_float("CHAOS_INTERVAL", 3.0)
    stack = make_stack()
    n = stack.settings.n
    load = Load(stack.url, total, seconds=(kills + 1) * interval, threads=8,
                limit=(kills + 1) * interval + 240).start()
    survived, restore_times = 0, []
    for i in range(kills):
        time.sleep(max(0.0, load.began + (i + 0.5) * interval - time.monotonic()))
        # Server ids in turn (1, 2, 3, 1, ...): the busiest replica is hit too (the seed's
        # hash sends it ~97% of requests), and a replacement keeps its predecessor's id.
        victim = next(r for r in stack.state().members() if r.server_id == i % n + 1)
        assert victim.handle is not None
        whole = i % 2 == 0  # alternate: the whole replica, or only its gunicorn master
        assert kill_replica(victim.handle, whole) >= 1
        t0 = time.monotonic()
        wait_for(restored(stack, n, victim.hostname), timeout=60)
        restore_times.append(time.monotonic() - t0)
        survived += 1
    load.wait()
    state = stack.wait_ready(n, timeout=60)
    wait_for(lambda: processes_match_registry(stack.state(), stack.settings.deployment), 30)
    report("chaos: replica SIGKILL under load", requests=load.sent, ok=load.ok,
           failures=len(load.failures), kills=kills, kills_survived=survived,
           restore_max_s=round(max(restore_times, default=0), 2),
           restore_mean_s=round(sum(restore_times) / max(1, len(restore_times)), 2),
           duration_s=round(load.duration, 1), served_by=dict(load.served_by),
           replacements=len({r.hostname for r in state.replicas} - {"Server1", "Server2",
                                                                       "Server3"}))
    assert load.sent == total
    assert load.failures == [], load.failures[:5]
    assert load.ok == total
    assert survived == kills
