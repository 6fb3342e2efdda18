"""Leases: who holds a registry entry, what for, until when; and the registry files written
before leases had a type (an ``owner`` string and a ``deadline``), which still load."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from lb.backends import STOP_TIMEOUT
from lb.leases import CALL_MARGIN, SUPERVISOR_HOLDER, Lease, Purpose, from_fields, to_fields
from lb.registry import READY, REMOVING, STARTING, Registry, Replica, ReplicaState

BEFORE_LEASES = Path(__file__).parent / "data" / "registry-before-leases.json"


def test_each_purpose_holds_as_long_as_it_needs() -> None:
    now = 1000.0
    add = Lease.take(Purpose.ADD, 60.0, now)
    assert add.purpose is Purpose.ADD and add.holder.startswith(f"add:{os.getpid()}:")
    assert add.until == now + 60.0 + CALL_MARGIN
    rm = Lease.take(Purpose.RM, 60.0, now)
    assert rm.purpose is Purpose.RM and rm.until == now + STOP_TIMEOUT + CALL_MARGIN
    sup = Lease.take(Purpose.SUPERVISOR, 60.0, now)
    assert (sup.holder, sup.until, sup.purpose) == (SUPERVISOR_HOLDER, now + 60.0,
                                                    Purpose.SUPERVISOR)
    assert Lease.take(Purpose.ADD, 60.0).holder != Lease.take(Purpose.ADD, 60.0).holder


def test_a_lease_holds_until_its_end_or_its_release() -> None:
    holder = Lease.take(Purpose.ADD, 5.0).holder
    entry = Replica("A1", 1, [], lease=Lease(holder, time.time() + 5))
    assert entry.held and entry.adding and entry.leased_to(holder)
    entry.release()
    assert not entry.held and not entry.adding
    assert entry.leased_to(holder)  # its holder still finds it (and sees it was let go)
    late = Replica("A2", 2, [], lease=Lease(holder, time.time() - 1))
    assert not late.held and not late.adding
    removing = Replica("R1", 3, [], state=REMOVING, lease=Lease.take(Purpose.RM, 5.0))
    assert removing.held and not removing.adding
    assert not Replica("F1", 4, []).held


def test_a_lease_dies_with_its_holder_where_that_can_be_seen() -> None:
    assert not Lease.take(Purpose.ADD, 5.0).holder_gone()  # this process: alive
    assert not Lease(SUPERVISOR_HOLDER, 0.0).holder_gone()  # no process to check: cannot tell
    kind, pid, nonce, space, ticks = Lease.take(Purpose.RM, 5.0).holder.split(":")
    other = ":".join([kind, pid, nonce, space, str(int(ticks) + 1)])  # the pid, reused
    assert Lease(other, time.time() + 5).holder_gone()


@pytest.mark.parametrize(("owner", "deadline", "lease"), [
    (None, None, None),
    ("add:1:2:3:4", 5.0, Lease("add:1:2:3:4", 5.0)),
    ("rm:dead", 0.0, Lease("rm:dead", 0.0)),
    ("supervisor", 7, Lease(SUPERVISOR_HOLDER, 7)),
    (None, 9.5, Lease(SUPERVISOR_HOLDER, 9.5)),  # before leases: the supervisor's wait
    ("add:1", None, Lease("add:1", 0.0)),  # an owner without a deadline holds nothing
])
def test_a_lease_is_an_owner_and_a_deadline_in_the_file(owner: object, deadline: object,
                                                       lease: Lease | None) -> None:
    assert from_fields(owner, deadline) == lease
    assert from_fields(*to_fields(lease)) == lease


def test_a_registry_written_before_leases_loads_and_keeps_its_meaning(tmp_path: Path) -> None:
    shutil.copy(BEFORE_LEASES, tmp_path / "registry.json")
    registry = Registry(str(tmp_path / "registry.json"))
    state = registry.read()
    assert [r.state for r in state.replicas] == [READY, STARTING, STARTING, REMOVING, STARTING]
    assert all(type(r.state) is ReplicaState for r in state.replicas)
    ready, started, adding, removing, reserved = state.replicas
    assert ready.lease is None
    # Started by the supervisor, waiting for its first heartbeat until 1700000060.
    assert started.lease == Lease(SUPERVISOR_HOLDER, 1700000060.0)
    assert adding.lease == Lease("add:4242:0f1e2d3c:5a5a5a5a5a5a:987654", 1700000070.0)
    assert adding.adding is False  # its deadline is long past
    assert removing.lease is not None and removing.lease.purpose is Purpose.RM
    assert reserved.lease == Lease(SUPERVISOR_HOLDER, 1700000030.0)

    # Written back, every field reads as before; only the supervisor's wait names its holder.
    before = json.loads(BEFORE_LEASES.read_text())
    with registry.update() as state:
        state.replicas[0].failures = 1
    after = json.loads(Path(registry.path).read_text())
    before["replicas"][0]["failures"] = 1
    before["replicas"][1]["owner"] = "supervisor"
    assert after.pop("version") == before.pop("version") + 1
    assert after == before
    assert list(after["replicas"][0]) == list(before["replicas"][0])  # same order of fields
