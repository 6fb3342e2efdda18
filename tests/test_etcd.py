"""What only the etcd store does: its address, its write lock and fence, writes whose answer
is lost, the supervisors' election, a view through the loss of the cluster's quorum, and the one
line a deployment says when no member can be reached.

Real etcd members throughout (``tests/helpers_etcd.py``); the one stand-in is a lost reply,
made at the edge of the seam (``Etcd.txn``) after the real transaction ran.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import etcd3gw
import pytest
from etcd3gw.exceptions import ConnectionFailedError

import lb.etcd
from lb.bootstrap import initial_state
from lb.etcd import EtcdRegistry, EtcdUnreachable, Leadership, NotLeader, delete
from lb.ha import EtcdCluster
from lb.registry import RegistryBusy, RegistryWriteUnknown, State
from lb.routing import registry_trouble
from lb.settings import EtcdAddress, Settings, SettingsError
from tests.conftest import free_port, kill_deployment
from tests.helpers_etcd import etcd_cluster, etcd_prefix, etcd_registry, new_cluster  # noqa: F401

WAIT = 30.0  # seconds a bounded wait gives up after


def seed() -> State:
    return initial_state(Settings.from_env({}, n=2))


def eventually(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


def bump(registry: EtcdRegistry) -> None:
    with registry.update() as state:
        state.replicas[0].failures += 1


# -- the address ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "endpoints", "prefix"), [
    ("etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/shop",
     (("10.0.0.1", 2379), ("10.0.0.2", 2379), ("10.0.0.3", 2379)), "/shop"),
    ("etcd://etcd-a:23791", (("etcd-a", 23791),), "/hashlb/web"),  # the deployment's prefix
    ("etcd://etcd-a", (("etcd-a", 2379),), "/hashlb/web"),  # etcd's own port
    ("etcd://a:1, b:2/deep/prefix/", (("a", 1), ("b", 2)), "/deep/prefix"),
    ("etcd://[::1]:2379/v6", (("::1", 2379),), "/v6"),
])
def test_an_etcd_address_names_its_members_and_prefix(
        url: str, endpoints: tuple[tuple[str, int], ...], prefix: str) -> None:
    address = EtcdAddress.parse(url, deployment="web")
    assert (address.endpoints, address.prefix) == (endpoints, prefix)
    assert EtcdAddress.parse(str(address)) == address  # said back as it can be read again


@pytest.mark.parametrize(("url", "message"), [
    ("http://a:2379", "not an etcd:// address"),
    ("etcd://", "bad member ''"),
    ("etcd://a:2379,,b:2379", "bad member ''"),
    ("etcd://a:port", "bad member 'a:port'"),
    ("etcd://a:0", "bad member 'a:0'"),
    ("etcd://a:65536", "bad member 'a:65536'"),
    ("etcd://:2379/p", "bad member ':2379'"),
])
def test_a_bad_etcd_address_says_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        EtcdAddress.parse(url)


def test_a_bad_etcd_registry_setting_is_a_settings_error_naming_it() -> None:
    with pytest.raises(SettingsError, match=r"registry 'etcd://a:port/p': bad member 'a:port'"):
        Settings.from_env({"LB_REGISTRY": "etcd://a:port/p"})
    good = Settings.from_env({"LB_REGISTRY": "etcd://a:1,b:2/p"})
    assert good.etcd == EtcdAddress((("a", 1), ("b", 2)), "/p")


# -- the write lock ------------------------------------------------------------------------------
@pytest.mark.system
@pytest.mark.parametrize("then", ["nobody wrote", "another writer wrote"])
def test_a_writer_that_lost_its_lock_writes_nothing_and_is_busy(
        etcd_registry: EtcdRegistry,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    """A pause longer than the lock's lease: the lease runs out (here: revoked), and the write
    that follows must not land, whether or not someone else wrote meanwhile."""
    etcd_registry.create(seed())
    granted: list[int] = []
    real_grant = etcd_registry.etcd.grant
    monkeypatch.setattr(etcd_registry.etcd, "grant",
                        lambda ttl: granted.append(real_grant(ttl)) or granted[-1])
    other = EtcdRegistry(etcd_registry.address, lock_timeout=5.0)  # another process's
    with pytest.raises(RegistryBusy, match="the write lock was lost"), \
            etcd_registry.update() as state:
        state.replicas[0].failures = 99
        etcd_registry.etcd.revoke(granted[-1])  # our lock lease is gone
        if then == "another writer wrote":
            bump(other)  # takes the free lock, writes
    after = etcd_registry.read()
    assert after.replicas[0].failures == (1 if then == "another writer wrote" else 0)
    assert after.version == (2 if then == "another writer wrote" else 1)
    bump(etcd_registry)  # and the next write, under a new lock, goes through
    assert etcd_registry.read().version == after.version + 1


# -- the fence -----------------------------------------------------------------------------------
@pytest.fixture
def leaderships(etcd_registry: EtcdRegistry) -> Iterator[Callable[..., Leadership]]:  # noqa: F811
    """Contenders for the leadership of the test's prefix; all step down at the end."""
    made: list[Leadership] = []

    def make(identity: str, ttl: int = 5) -> Leadership:
        leadership = Leadership(etcd_registry.etcd, etcd_registry.leader_key, ttl, identity)
        made.append(leadership)
        return leadership

    yield make
    for leadership in made:
        leadership.step_down()


@pytest.mark.system
@pytest.mark.parametrize("lost", ["on the server", "by its own clock"])
def test_a_fenced_write_of_a_supervisor_that_no_longer_leads_is_refused(
        etcd_registry: EtcdRegistry,  # noqa: F811
        leaderships: Callable[..., Leadership], lost: str) -> None:
    """On the server: its leader key went (its lease ran out) and another won, while this one
    still believes it leads. By its own clock: it knows it may no longer lead."""
    etcd_registry.create(seed())
    a = leaderships("a")
    assert a.campaign()
    fenced = etcd_registry.fenced(a)
    bump(fenced)  # while it leads, its writes go through
    assert etcd_registry.read().version == 2
    if lost == "on the server":
        etcd_registry.etcd.txn([], [delete(etcd_registry.leader_key)])
        assert leaderships("b").campaign()
        assert a.holds()  # it has not noticed
    else:
        a.step_down()
    with pytest.raises(NotLeader), fenced.update() as state:
        state.replicas[0].failures = 99
    assert etcd_registry.read().version == 2
    assert etcd_registry.read().replicas[0].failures == 1


# -- a lost answer -------------------------------------------------------------------------------
def _puts_to(key: str, success: list[dict[str, Any]]) -> bool:
    target = base64.b64encode(key.encode()).decode()
    return any(op.get("request_put", {}).get("key") == target for op in success)


@pytest.mark.system
@pytest.mark.parametrize("lost", ["the reply", "the request"])
def test_a_state_write_whose_answer_is_lost_lands_exactly_once(
        etcd_registry: EtcdRegistry,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    """No member answered the write in time: it may or may not have run. A reply lost after it
    ran must not be written again on top; a request lost before must be sent again. Either way
    ``update()`` returns normally and the state moves one version."""
    etcd_registry.create(seed())
    real_txn = etcd_registry.etcd.txn
    landed: list[int] = []
    dropped: list[str] = []

    def lossy(compare: list[dict[str, Any]], success: list[dict[str, Any]],
              failure: list[dict[str, Any]] | None = None,
              deadline: float | None = None) -> tuple[bool, int]:
        writes_state = _puts_to(etcd_registry.state_key, success)
        if not writes_state or dropped or lost == "the reply":
            ok, revision = real_txn(compare, success, failure, deadline)
            if ok and writes_state:
                landed.append(revision)
            if not writes_state or dropped:
                return ok, revision
        dropped.append(lost)
        raise EtcdUnreachable("cannot reach etcd at (write: no member answered)",
                              "no member answered in time")

    monkeypatch.setattr(etcd_registry.etcd, "txn", lossy)
    bump(etcd_registry)
    assert dropped == [lost]
    assert len(landed) == 1  # one transaction wrote the state
    assert etcd_registry.get().mod_revision == landed[0]  # and nothing after it
    assert etcd_registry.read().version == 2
    assert etcd_registry.read().replicas[0].failures == 1


@pytest.mark.system
def test_a_write_that_cannot_be_confirmed_says_it_may_have_landed(
        etcd_registry: EtcdRegistry,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster answers no more right after a write was sent (quorum lost): neither the
    write nor the read-back can say whether it was applied. The error says so, and so does
    what a client is told: not "nothing was changed", which may be false."""
    etcd_registry.create(seed())
    real_txn, real_get = etcd_registry.etcd.txn, etcd_registry.etcd.get
    gone: list[bool] = []

    def then_gone(compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None,
                  deadline: float | None = None) -> tuple[bool, int]:
        if gone:
            raise EtcdUnreachable("cannot reach etcd at (write: timed out)", "no member")
        result = real_txn(compare, success, failure, deadline)
        if _puts_to(etcd_registry.state_key, success):
            gone.append(True)  # sent and applied; from here on nothing answers
            raise EtcdUnreachable("cannot reach etcd at (write: timed out)", "no member")
        return result

    def unreachable(*args: Any, **kw: Any) -> Any:
        if gone:
            raise EtcdUnreachable("cannot reach etcd at (read: timed out)", "no member")
        return real_get(*args, **kw)

    monkeypatch.setattr(etcd_registry.etcd, "txn", then_gone)
    monkeypatch.setattr(etcd_registry.etcd, "get", unreachable)
    with pytest.raises(RegistryWriteUnknown) as caught:
        bump(etcd_registry)
    said = registry_trouble(caught.value)
    assert "may or may not have been made" in said and "nothing was changed" not in said
    monkeypatch.undo()
    assert etcd_registry.read().version == 2  # it had landed, as it may


@pytest.mark.system
@pytest.mark.parametrize("which", ["lock", "state"])
def test_a_member_that_dies_answering_costs_a_retry_not_a_second_write(
        etcd_registry: EtcdRegistry,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """One member ran the transaction and its answer never came (the connection broke): the
    same transaction goes to the next member, where its comparisons fail. Taking the lock,
    that failure is recognised as our own key; writing the state, as our own bytes."""
    etcd_registry.create(seed())
    key = etcd_registry.lock_key if which == "lock" else etcd_registry.state_key
    real_post = etcd3gw.Etcd3Client.post
    broken: list[str] = []
    landed: list[int] = []

    def post(self: etcd3gw.Etcd3Client, url: str, *args: Any, json: Any = None,
             **kwargs: Any) -> Any:
        reply = real_post(self, url, *args, json=json, **kwargs)
        if url.endswith("/kv/txn") and _puts_to(etcd_registry.state_key, json["success"]) \
                and reply.get("succeeded"):
            landed.append(int(reply["header"]["revision"]))
        if url.endswith("/kv/txn") and _puts_to(key, json["success"]) and not broken:
            broken.append(url)
            raise ConnectionFailedError("connection reset by peer")
        return reply

    monkeypatch.setattr(etcd3gw.Etcd3Client, "post", post)
    bump(etcd_registry)
    assert len(broken) == 1
    assert len(landed) == 1 and etcd_registry.get().mod_revision == landed[0]
    assert etcd_registry.read().version == 2
    assert etcd_registry.read().replicas[0].failures == 1
    assert etcd_registry.etcd.get(etcd_registry.lock_key).data is None  # the lock went too


# -- the supervisors' election -------------------------------------------------------------------
@pytest.mark.system
def test_of_two_contenders_exactly_one_leads_until_it_steps_down(
        etcd_registry: EtcdRegistry, leaderships: Callable[..., Leadership]) -> None:  # noqa: F811
    a, b = leaderships("a"), leaderships("b")
    with ThreadPoolExecutor(2) as pool:
        won = list(pool.map(lambda x: x.campaign(), [a, b]))
    assert sorted(won) == [False, True]
    leader, other = (a, b) if won[0] else (b, a)
    assert leader.holds() and not other.holds()
    assert etcd_registry.leader() == leader.identity
    assert not other.campaign()  # asking again changes nothing
    first_term = leader.token
    assert leader.campaign() and leader.token == first_term  # nor does the leader's
    leader.step_down()
    assert not leader.holds()
    assert other.campaign()  # at once: the key went with the lease
    assert etcd_registry.leader() == other.identity
    assert other.token > first_term  # a new fencing token


@pytest.mark.system
def test_a_paused_leader_lets_go_before_its_lease_runs_out_on_the_server(
        etcd_registry: EtcdRegistry, leaderships: Callable[..., Leadership]) -> None:  # noqa: F811
    """A leader that stops refreshing its lease (a pause, a process stopped) must stop trusting
    its leadership before etcd lets another lead: two leaders never act at once."""
    ttl = 3
    a, b = leaderships("a", ttl), leaderships("b", ttl)
    assert a.campaign()
    a._stop.set()  # its refresher stops, as in a pause; its lease is not revoked
    assert a._keeper is not None
    a._keeper.join(ttl)
    eventually(lambda: not a.holds(), "the paused leader lets go", timeout=2 * ttl)
    assert etcd_registry.leader() == "a"  # still its key on the server: nobody else leads
    assert not b.campaign()
    eventually(b.campaign, "the other leads after the lease ran out", timeout=ttl + WAIT)
    assert etcd_registry.leader() == "b" and not a.holds()


# -- a view when the cluster loses its quorum ----------------------------------------------------
@pytest.mark.system
def test_a_view_serves_its_last_state_without_a_quorum_and_recovers_by_itself(
        new_cluster: Callable[[], EtcdCluster],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb.etcd, "WATCH_IDLE", 1.0)  # a quiet watch re-made every second
    cluster = new_cluster()
    registry = EtcdRegistry(EtcdAddress(cluster.endpoints, "/quorum"), lock_timeout=2.0)
    registry.create(seed())
    bump(registry)
    view = registry.view()
    view.follow()
    try:
        eventually(lambda: view.current().version == 2 and view.problem is None,
                   "the view follows")
        good = view.current()
        cluster.kill(0)
        cluster.kill(1)
        eventually(lambda: view.problem is not None, "the view notices the lost quorum")
        assert isinstance(view.problem, EtcdUnreachable)
        assert view.current() is good  # routing goes on with the last state
        assert view.stale_since is not None
        with pytest.raises(EtcdUnreachable):
            view.latest()
        cluster.restart(0)
        cluster.restart(1)
        eventually(lambda: view.problem is None, "the view recovers by itself")
        assert view.current().version == 2
        bump(registry)
        eventually(lambda: view.current().version == 3, "the view follows again")
    finally:
        view.close()


# -- no member at all ----------------------------------------------------------------------------
@pytest.mark.system
def test_lb_run_says_in_one_line_that_etcd_cannot_be_reached() -> None:
    port = free_port()  # closed: nothing listens there
    deployment = f"t{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "LB_REGISTRY": f"etcd://127.0.0.1:{port}/p", "LB_LOCK_TIMEOUT": "1",
           "LB_DEPLOYMENT": deployment, "LB_PORT": str(free_port())}
    try:
        done = subprocess.run([sys.executable, "-m", "lb"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    finally:
        assert kill_deployment(deployment) == 0  # nothing was started
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"lb-run: cannot reach etcd at 127.0.0.1:{port}")
