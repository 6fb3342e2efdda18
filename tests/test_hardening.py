"""What an outside review broke, on real stacks: a corrupt or missing registry, a registry
folder that cannot be written, zombie replicas, an /add whose worker was killed, and ``lb-run``
killed with SIGKILL. Each test prints its figures (``pytest -s``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

from lb.backends import ReplicaSpec
from lb.backends.local import ENV_DEPLOYMENT, LocalBackend
from lb.leases import Purpose
from lb.registry import READY, RegistryError, State
from lb.settings import Settings
from tests.conftest import RunningStack, deployment_processes, free_port
from tests.helpers_chaos import (
    Load,
    balancer_workers_of,
    processes_match_registry,
    report,
    supervisor_of,
    wait_for,
)
from tests.helpers_stack import immutable

pytestmark = pytest.mark.system


def shape(state: State) -> list[tuple[str, int, list[int], str | None]]:
    return [(r.hostname, r.server_id, r.slots, r.handle) for r in state.members()]


def readable(stack: RunningStack) -> State | None:
    try:
        return stack.state()
    except RegistryError:
        return None


def assert_no_path(stack: RunningStack, reply: requests.Response) -> None:
    """A reply names no file: neither the registry's nor its folder."""
    folder = os.path.dirname(stack.settings.registry_path)
    for secret in (folder, "registry.json", "/tmp", str(Path(folder).parent)):
        assert secret not in reply.text, f"{reply.text!r} reveals {secret!r}"


def refused(stack: RunningStack, reply: requests.Response, words: str) -> None:
    """503 in the envelope, saying ``words``, and no path."""
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["status"] == "failure" and body["message"].startswith("<Error> "), body
    assert words in body["message"], body
    assert_no_path(stack, reply)


def every_worker_has_read(stack: RunningStack) -> None:
    """Until each balancer worker has a state to go on: a worker still booting when the file
    breaks has none (it answers 503 until the file is restored), and on a loaded machine the
    stack can answer through one worker while the other still boots."""
    wanted = stack.settings.workers
    wait_for(lambda: None if stack.log().count("starts with registry version") >= wanted
             else "a worker is still booting", 60)
    # A worker may have read its first state while the replicas were still starting; its view
    # refreshes every heartbeat interval, so a few of them later its last good state is the
    # ready set (else routing from it would find no replica ready, and wait, then 503).
    time.sleep(3 * stack.settings.heartbeat_interval)


def admin_calls(stack: RunningStack) -> dict[str, requests.Response]:
    return {
        "rep": stack.get("/rep"),
        "add": stack.post("/add", json={"n": 1}),
        "rm": stack.delete("/rm", json={"n": 1}),
        "status": stack.get("/_lb/status.json"),
    }


# -- a corrupt or missing registry file -------------------------------------------------------------
@pytest.mark.parametrize("damage", ["corrupt", "empty", "missing"])
def test_a_lost_registry_file_stops_no_request_and_the_supervisor_restores_it(
        make_stack: Callable[..., RunningStack], damage: str) -> None:
    stack = make_stack()
    every_worker_has_read(stack)
    before = stack.state()
    path = Path(stack.settings.registry_path)
    load = Load(stack.url, total=400, seconds=4.0, threads=4).start()
    time.sleep(1.0)
    with stack.registry.locked():  # not between a writer's read and its rename
        damaged = time.monotonic()
        if damage == "missing":
            path.unlink()
        else:
            path.write_text("{garbage" if damage == "corrupt" else "")
    wait_for(lambda: None if readable(stack) else "still unreadable", 30, interval=0.02)
    restored = time.monotonic() - damaged
    load.wait()
    assert load.failures == [], load.failures[:5]
    after = stack.wait_ready(3)
    assert shape(after) == shape(before)  # the same replicas, handles and slots: nothing moved
    assert after.version > before.version
    assert stack.rep() == before.rep()
    kept = list(path.parent.glob("registry.json.corrupt-*"))
    assert len(kept) == (0 if damage == "missing" else 1)
    assert stack.log().count("restored it from the last good state") == 1
    report(f"registry file {damage}", restored_after_s=round(restored, 3), requests=load.ok,
           failed=len(load.failures))


def test_an_unreadable_registry_that_cannot_be_restored(
        make_stack: Callable[..., RunningStack]) -> None:
    """Fail static, observed for seconds: the supervisor cannot rewrite the file, so routing
    goes on with the last good set, admin calls are refused without naming a file, readiness
    says what is wrong, and the log says once that a person must act."""
    stack = make_stack()
    every_worker_has_read(stack)
    before = stack.state()
    path = Path(stack.settings.registry_path)
    load = Load(stack.url, total=800, seconds=8.0, threads=4).start()
    with immutable(path.parent):
        with stack.registry.locked():
            last_written = stack.state().version
            path.write_text("{garbage")  # the file itself can still be written in place
        broken = time.monotonic()
        time.sleep(2.0)
        for reply in admin_calls(stack).values():
            refused(stack, reply, "The replica registry file is corrupt")
        ready = stack.get("/_lb/readyz")
        assert ready.status_code == 200, ready.text
        message = ready.json()["message"]
        # A state the worker really read: a worker with no request since the supervisor's last
        # write still holds the one before it, so the version is bounded above, not pinned.
        assert message["routable"] == 3
        assert 1 <= message["registry_version"] <= last_written
        assert "corrupt" in message["stale"] and "last good state" in message["stale"]
        assert_no_path(stack, ready)
        for _ in range(20):
            assert stack.get("/home").status_code == 200
        wait_for(lambda: None if "a person must act" in stack.log() else "not said", 10)
        time.sleep(2.0)  # more rounds, still said once
    writable = time.monotonic()
    wait_for(lambda: None if readable(stack) else "still unreadable", 30, interval=0.02)
    restored = time.monotonic() - writable
    load.wait()
    assert load.failures == [], load.failures[:5]
    assert shape(stack.wait_ready(3)) == shape(before)
    log = stack.log()
    assert log.count("a person must act") == 1, log
    assert log.count("supervising again after") == 1
    # Each balancer worker says once that it goes on with the last good state.
    assert 1 <= log.count("routing goes on with the last good state") <= stack.settings.workers
    assert stack.get("/rep").status_code == 200
    report("registry unreadable and not restorable", stale_s=round(writable - broken, 1),
           restored_after_writable_s=round(restored, 3), requests=load.ok,
           failed=len(load.failures))


# -- a registry folder that cannot be written -------------------------------------------------------
def test_an_unwritable_registry_folder_then_a_dead_replica(
        make_stack: Callable[..., RunningStack]) -> None:
    """The supervisor survives and says so once; admin calls are refused with the reason;
    clients lose nothing; when the folder is writable again, everything recovers by itself."""
    stack = make_stack()
    before = stack.state()
    supervisor = supervisor_of(stack.proc.pid)
    assert supervisor is not None
    victim = next(r for r in before.members() if r.server_id == 2)
    folder = Path(stack.settings.registry_path).parent
    load = Load(stack.url, total=1500, seconds=15.0, threads=4).start()
    with immutable(folder):
        time.sleep(0.5)
        os.kill(int((victim.handle or "").split("/")[0]), signal.SIGKILL)
        killed = time.monotonic()
        add, rm = stack.post("/add", json={"n": 1}), stack.delete("/rm", json={"n": 1})
        for reply in (add, rm):
            refused(stack, reply, "The replica registry cannot be written (Operation not "
                                  "permitted)")
        wait_for(lambda: None if (stack.get("/_lb/readyz").json()["message"]["stale"] or ""
                                  ).startswith("The registry has not been written") else
                 "readyz does not say so", 20)
        time.sleep(3.0)
        assert supervisor.is_running() and supervisor_of(stack.proc.pid) == supervisor
        assert [r.hostname for r in stack.state().members()] == [
            r.hostname for r in before.members()]  # nothing could be recorded
    writable = time.monotonic()

    def replaced() -> str | None:
        state = stack.state()
        if state.find(victim.hostname) or not all(r.state == READY for r in state.members()):
            return f"{[(r.hostname, r.state) for r in state.members()]}"
        return processes_match_registry(state, stack.settings.deployment)

    wait_for(replaced, 30, interval=0.05)
    recovered = time.monotonic() - writable
    load.wait()
    assert load.failures == [], load.failures[:5]
    log = stack.log()
    assert "supervisor exited" not in log
    assert log.count("supervising is stuck") == 1, log
    assert log.count(f"replica {victim.hostname} (server id 2) is down") == 1
    assert log.count("supervising again after") == 1
    new = next(r for r in stack.state().members() if r.server_id == 2)
    assert new.slots == victim.slots
    report("registry folder unwritable, replica killed", unwritable_s=round(writable - killed, 1),
           recovered_after_writable_s=round(recovered, 3), requests=load.ok,
           failed=len(load.failures), supervisor_restarts=log.count("supervisor exited"))


# -- zombies ------------------------------------------------------------------------------------------
def zombies_under(parents: list[psutil.Process]) -> list[str]:
    found = []
    for parent in parents:
        try:
            for child in parent.children():
                if child.status() == psutil.STATUS_ZOMBIE:
                    found.append(f"{child.pid} under {parent.pid}")
        except psutil.NoSuchProcess:
            pass
    return found


def test_no_zombie_when_someone_else_stops_a_replica_a_worker_started(
        make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack()
    reply = stack.post("/add", json={"n": 2, "hostnames": ["Z1", "Z2"]})
    assert reply.status_code == 200, reply.text
    masters = [psutil.Process(int((r.handle or "").split("/")[0]))
               for r in stack.state().members() if r.hostname in ("Z1", "Z2")]
    assert len(masters) == 2
    workers = balancer_workers_of(stack.proc.pid)
    assert {m.ppid() for m in masters} <= {w.pid for w in workers}  # a worker's children
    for m in masters:
        m.kill()  # someone else: neither that worker nor its backend
    psutil.wait_procs(masters, timeout=5)  # gone (zombie or reaped), not necessarily reaped
    stopped = time.monotonic()
    watched = [*workers, *filter(None, [supervisor_of(stack.proc.pid)])]
    wait_for(lambda: ", ".join(zombies_under(watched)) or None, 10, interval=0.05)
    report("zombie replicas", reaped_within_s=round(time.monotonic() - stopped, 3))
    stack.wait_ready(5)


def test_the_local_backend_reaps_a_replica_it_started_whoever_stops_it(tmp_path: Path) -> None:
    settings = Settings.from_env({}, deployment=f"zb{os.getpid()}",
                                 registry=str(tmp_path / "registry.json"))
    backend = LocalBackend(settings)
    inst = backend.start(ReplicaSpec("Z1", 1))
    try:
        pid = int(inst.handle.split("/")[0])
        os.kill(pid, signal.SIGKILL)  # not backend.stop(): nothing of the backend runs after

        def reaped() -> str | None:
            try:
                return f"{pid} is a zombie" if psutil.Process(pid).status() == \
                    psutil.STATUS_ZOMBIE else f"{pid} still runs"
            except psutil.NoSuchProcess:
                return None

        wait_for(reaped, 10, interval=0.02)
    finally:
        backend.stop_all()


# -- an /add whose worker was killed ------------------------------------------------------------------
def test_an_add_whose_worker_died_is_finished_long_before_its_deadline(
        make_stack: Callable[..., RunningStack]) -> None:
    # The hold's deadline is LB_START_TIMEOUT + 10 = 70 s: only a dead owner recognised as
    # such lets the entry go sooner.
    stack = make_stack(start_timeout=60)
    for attempt in range(5):
        name = f"Slow{attempt}"
        caller = threading.Thread(target=_post_quietly, args=(stack, name), daemon=True)
        caller.start()
        owner = None
        deadline = time.monotonic() + 10
        while owner is None and time.monotonic() < deadline:
            state = readable(stack)
            entry = state.find(name) if state else None
            if entry and entry.lease and entry.lease.purpose is Purpose.ADD and entry.held:
                owner = entry.lease.holder
            else:
                time.sleep(0.005)
        assert owner is not None, "the /add never reserved its entry"
        os.kill(int(owner.split(":")[1]), signal.SIGKILL)  # the balancer worker doing the /add
        killed = time.monotonic()
        caller.join(30)
        entry = stack.state().find(name)
        if entry is not None and entry.leased_to(owner):
            break  # killed half-way: the case under test
    else:
        pytest.fail("every /add finished before its worker could be killed")

    def finished() -> str | None:
        found = stack.state().find(name)
        if found is None or found.state != READY or found.held:
            return f"{name}: {found}"
        return None

    wait_for(finished, 20, interval=0.05)
    took = time.monotonic() - killed
    assert "holding replica " + name + " has died" in stack.log()
    assert processes_match_registry(stack.wait_ready(4), stack.settings.deployment) is None
    report("add whose worker died", finished_after_s=round(took, 3), hold_deadline_s=70)


def _post_quietly(stack: RunningStack, name: str) -> None:
    try:
        stack.post("/add", json={"n": 1, "hostnames": [name]}, timeout=90)
    except requests.RequestException:
        pass  # its worker was killed: the connection drops


# -- lb-run killed with SIGKILL -----------------------------------------------------------------------
def stack_processes(deployment: str) -> list[psutil.Process]:
    """lb-run's children and the replicas: everything carrying the deployment's name."""
    found = []
    for proc in psutil.process_iter(["environ", "name"], ad_value=None):
        env = proc.info["environ"] or {}
        if deployment in (env.get("LB_DEPLOYMENT"), env.get(ENV_DEPLOYMENT)):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
    return found


def test_nothing_outlives_lb_run_killed_with_sigkill(
        make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack()
    assert stack.post("/add", json={"n": 1}).status_code == 200  # a worker's replica too
    deployment = stack.settings.deployment
    lb_run = stack.proc.pid
    before = [p for p in stack_processes(deployment) if p.pid != lb_run]
    assert len(before) >= 4 + 1 + 2  # 4 replicas' masters, supervisor, balancer master, ...
    stack.proc.kill()
    stack.proc.wait()
    killed = time.monotonic()
    # Names read while listing: a process may end between the listing and a later question.
    wait_for(lambda: ", ".join(f"{p.pid} {p.info['name']}" for p in stack_processes(deployment))
             or None, 30, interval=0.1)
    report("lb-run SIGKILL", processes=len(before),
           all_gone_after_s=round(time.monotonic() - killed, 2))


@pytest.mark.parametrize("keep", [False, True])
def test_the_next_start_stops_what_an_earlier_run_left(
        make_stack: Callable[..., RunningStack], keep: bool) -> None:
    """Leftovers that could not act on the lifeline (stopped with SIGSTOP when lb-run died) are
    stopped by the next start of the same deployment, with or without --keep-registry."""
    first = make_stack()
    supervisor = supervisor_of(first.proc.pid)
    assert supervisor is not None
    replica = psutil.Process(int((first.state().members()[0].handle or "").split("/")[0]))
    stuck = [supervisor, replica, *replica.children()]
    for p in stuck:
        p.suspend()
    try:
        first.proc.kill()
        first.proc.wait()
        # Its leftovers are the next run's to stop (checked below), not the fixture's, whose
        # clean-up check would otherwise kill the next run's replicas of the same deployment.
        make_stack.started.remove(first)  # type: ignore[attr-defined]
        time.sleep(1.0)
        assert all(p.is_running() for p in stuck)  # left behind: they could not act
        settings = first.settings
        second = make_stack(*(["--keep-registry"] if keep else []),
                            deployment=settings.deployment, registry=settings.registry,
                            port=free_port())
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stuck)
    finally:
        for p in stuck:  # whatever happened above, nothing stays stopped forever
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    state = second.wait_ready(3)
    assert [r.hostname for r in state.members()] == ["Server1", "Server2", "Server3"]
    assert processes_match_registry(state, settings.deployment) is None
    assert "processes left by an earlier run" in second.log()


def test_a_second_run_of_a_running_deployment_is_refused(
        make_stack: Callable[..., RunningStack]) -> None:
    first = make_stack()
    before = first.state()
    env = {**os.environ, **first.settings.to_env(), "LB_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "lb"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "already runs" in done.stderr, done.stderr
    time.sleep(1.0)
    assert shape(first.state()) == shape(before)  # its replicas untouched
    assert first.get("/home").status_code == 200
    assert not any(p.status() == psutil.STATUS_ZOMBIE
                   for p in deployment_processes(first.settings.deployment))
