"""Hash functions as a setting, through real ``lb-run`` stacks: formulas route exactly like the
preset they write out, a plug-in is loaded by every process, a wrong formula or a registry
written with another hash is refused before anything starts, and the start line tells what
shares to expect."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from lb.bootstrap import ensure_registry
from lb.hashring import HashRing
from lb.registry import Registry
from lb.settings import Settings
from tests.conftest import RunningStack, deployment_processes, free_port

pytestmark = pytest.mark.system

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The course handout's H and Phi, written out: they must route exactly like LB_HASH=cs60002.
HANDOUT = "H = i**2 + 2*i + 17; Phi = i**2 + j**2 + 2*j + 25"


def ids_covering(ring: HashRing, per_server: int, seed: int = 3) -> list[int]:
    """Random 6-digit ids, ``per_server`` of them for every server of ``ring``."""
    rng = random.Random(seed)
    chosen: dict[int, list[int]] = {sid: [] for sid in ring.servers}
    while any(len(v) < per_server for v in chosen.values()):
        key = rng.randint(100000, 999999)
        owner = ring.lookup(key)
        assert owner is not None
        if len(chosen[owner]) < per_server:
            chosen[owner].append(key)
    return [k for keys in chosen.values() for k in keys]


def served_by(stack: RunningStack, key: int) -> str:
    reply = stack.get("/home", params={"id": str(key)})
    assert reply.status_code == 200, reply.text
    return reply.json()["message"]


def model(spec: str) -> HashRing:
    ring = HashRing(512, 9, spec)
    for sid in (1, 2, 3):
        ring.add(sid)
    return ring


def test_the_handouts_formulas_route_exactly_like_the_cs60002_preset(
        make_stack: Callable[..., RunningStack]) -> None:
    by_formula = make_stack(hash=HANDOUT, hash_key="query:id", workers=1)
    by_name = make_stack(hash="cs60002", hash_key="query:id", workers=1)
    keys = ids_covering(model("cs60002"), per_server=25)
    rng = random.Random(9)
    keys += [rng.randint(100000, 999999) for _ in range(75)]
    formula_replies = [served_by(by_formula, k) for k in keys]
    name_replies = [served_by(by_name, k) for k in keys]
    assert formula_replies == name_replies
    expected = [f"Hello from Server: {model('cs60002').lookup(k)}" for k in keys]
    assert formula_replies == expected
    assert len(set(formula_replies)) == 3  # every replica was asked, not just the busy one
    # The same placement in both registries; the canonical formulas in the formula one.
    a, b = by_formula.state(), by_name.state()
    assert [r.slots for r in a.replicas] == [r.slots for r in b.replicas]
    assert a.ring.hash == "H=i ** 2 + 2 * i + 17; Phi=i ** 2 + j ** 2 + 2 * j + 25"
    status = by_formula.get("/_lb/status.json").json()["message"]["hash_map"]
    assert status["formulas"] == {"H": "i ** 2 + 2 * i + 17",
                                  "Phi": "i ** 2 + j ** 2 + 2 * j + 25"}
    assert "Phi(i, j) = i ** 2 + j ** 2 + 2 * j + 25" in by_formula.get("/_lb/status").text
    # The start line: the shares of all 6-digit ids, before any request was sent.
    line = next(x for x in by_formula.log().splitlines() if "expected shares" in x)
    assert "expected shares 84.4 / 4.7 / 10.9 %" in line and "WARNING" in line, line
    seed_line = next(x for x in by_name.log().splitlines() if "expected shares" in x)
    assert "hash cs60002 (M=512, K=9): expected shares 84.4 / 4.7 / 10.9 %" in seed_line


def test_a_plug_in_is_loaded_by_every_process(make_stack: Callable[..., RunningStack],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # lb-run passes it on to its children
    monkeypatch.syspath_prepend(str(EXAMPLES))  # this process validates the settings too
    stack = make_stack(hash="hash_plugin:fnv1a", hash_key="query:id", workers=1)
    ring = model("hash_plugin:fnv1a")
    keys = ids_covering(ring, per_server=10)
    assert [served_by(stack, k) for k in keys] == [
        f"Hello from Server: {ring.lookup(k)}" for k in keys]
    assert stack.state().ring.hash == "hash_plugin:fnv1a"
    hash_map = stack.get("/_lb/status.json").json()["message"]["hash_map"]
    assert hash_map["description"].startswith("FNV-1a") and hash_map["formulas"] is None


# -- refused before anything starts ------------------------------------------------------------
HOSTILE = [
    "H=__import__('os').system('touch /tmp/pwned'); Phi=j",
    "H=i; Phi=().__class__.__base__.__subclasses__()",
    "H=(lambda: 9)(); Phi=j",
    "H=9**9**9; Phi=j",
    "H=" + "i*" * 5000 + "i; Phi=j",
    "H=((i+1)*2; Phi=j",
    "no_such_module_anywhere:preset",
]


def run_lb(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "lb", *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env}, check=False)
    return run, time.monotonic() - began


@pytest.mark.parametrize("spec", HOSTILE)
def test_a_hostile_formula_stops_lb_run_with_one_line_and_starts_nothing(
        spec: str, tmp_path: Path) -> None:
    deployment = f"hf{uuid.uuid4().hex[:8]}"
    folder = tmp_path / deployment
    run, seconds = run_lb({"LB_HASH": spec, "LB_DEPLOYMENT": deployment,
                           "LB_PORT": str(free_port()),
                           "LB_REGISTRY": str(folder / "registry.json")})
    print(f"\nlb-run refused {spec[:40]!r} in {seconds:.2f}s: {run.stderr.strip()[:160]}")
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lb-run: "), run.stderr
    assert "LB_HASH" in lines[0] or "hash plug-in" in lines[0]
    assert run.stdout == ""
    assert not folder.exists()  # no registry, no metrics folder: nothing was started
    assert deployment_processes(deployment) == []
    assert not Path("/tmp/pwned").exists()


def test_resuming_a_registry_written_with_another_hash_is_refused(tmp_path: Path) -> None:
    deployment = f"hm{uuid.uuid4().hex[:8]}"
    registry = Registry(str(tmp_path / "registry.json"))
    ensure_registry(Settings.from_env({}, registry=registry.path, deployment=deployment),
                    registry)
    before = Path(registry.path).read_bytes()
    env = {"LB_HASH": HANDOUT, "LB_DEPLOYMENT": deployment, "LB_PORT": str(free_port()),
           "LB_REGISTRY": registry.path}
    run, seconds = run_lb(env, "--keep-registry")
    print(f"\nrefused in {seconds:.2f}s: {run.stderr.strip()}")
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "was written with the hash map" in lines[0], run.stderr
    assert "hash seed" in lines[0] and "--migrate-hash" in lines[0]
    assert Path(registry.path).read_bytes() == before
    assert deployment_processes(deployment) == []
    run, _ = run_lb(env, "--migrate-hash")
    assert run.returncode == 2 and "--migrate-hash needs --keep-registry" in run.stderr


def test_migrate_hash_resumes_a_registry_under_the_new_hash(tmp_path: Path) -> None:
    """``--keep-registry --migrate-hash``: the registry moves to the settings' map (placed as
    a fresh start would place it), the log says so, and the stack serves by the new map."""
    deployment = f"mh{uuid.uuid4().hex[:8]}"
    registry = Registry(str(tmp_path / "registry.json"))
    ensure_registry(Settings.from_env({}, registry=registry.path, deployment=deployment),
                    registry)
    port = free_port()
    log_path = tmp_path / "lb-run.log"
    env = {**os.environ, "LB_HASH": HANDOUT, "LB_HASH_KEY": "query:id",
           "LB_DEPLOYMENT": deployment, "LB_PORT": str(port), "LB_REGISTRY": registry.path,
           "LB_WORKERS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lb", "--keep-registry",
                                 "--migrate-hash"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    stack = RunningStack(f"http://127.0.0.1:{port}", Settings.from_env(env), proc, log_path)
    try:
        deadline = time.monotonic() + 60
        while "ready: http" not in stack.log():
            assert proc.poll() is None and time.monotonic() < deadline, stack.log()
            time.sleep(0.2)
        state = stack.state()
        assert state.ring.hash == "H=i ** 2 + 2 * i + 17; Phi=i ** 2 + j ** 2 + 2 * j + 25"
        ring = model("cs60002")
        assert {r.server_id: tuple(r.slots) for r in state.replicas} == ring.placement()
        assert "moved from the hash map M=512, K=9, hash seed" in stack.log()
        keys = ids_covering(ring, per_server=5)
        assert [served_by(stack, k) for k in keys] == [
            f"Hello from Server: {ring.lookup(k)}" for k in keys]
    finally:
        stack.session.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        leftovers = deployment_processes(deployment)
        for p in leftovers:
            p.kill()
    assert leftovers == []
