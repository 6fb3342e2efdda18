"""Metrics and logs of a real stack: counters add up over both gunicorn workers and the
supervisor, and one JSON log line per request carries the id the client sent."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from lb.backends.local import ENV_TOKEN
from lb.registry import READY
from tests.conftest import RunningStack

pytestmark = pytest.mark.system

K = 300


def scrape(stack: RunningStack) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from /_lb/metrics (parsed: it must be valid text)."""
    reply = stack.get("/_lb/metrics")
    assert reply.status_code == 200, reply.text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def routed_by_pid(folder: Path) -> dict[int, float]:
    """lb_routed_requests_total per process, read straight from the multiprocess files."""
    out: dict[int, float] = {}
    for path in folder.glob("counter_*.db"):
        ident = path.stem.split("_", 1)[1]  # a pid, or "supervisor-<pid>"
        if not ident.isdigit():
            continue
        pid = int(ident)
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if s.name == "lb_routed_requests_total":
                    out[pid] = out.get(pid, 0.0) + s.value
    return out


def test_routed_counters_sum_to_the_requests_sent(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(hash="xxhash", log_format="json")
    metrics_dir = Path(stack.settings.registry_path).parent / "metrics"
    assert metrics_dir.is_dir()

    def get(i: int) -> tuple[int, str, str]:
        # A new connection per request, so both workers take some (the kernel picks).
        reply = requests.get(stack.url + "/home", timeout=30,
                             headers={"X-Request-ID": f"k-{i}", "Connection": "close"})
        return reply.status_code, reply.headers["X-Request-ID"], reply.headers["X-Served-By"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(get, range(K)))
    assert all(code == 200 for code, _, _ in results)
    assert [rid for _, rid, _ in results] == [f"k-{i}" for i in range(K)]
    served: dict[str, int] = {}
    for _, _, replica in results:
        served[replica] = served.get(replica, 0) + 1

    # The event-driven worker writes its counts ten times a second: they add up by then. A
    # scrape reads the metrics files one after another, so a flush can land between a worker's
    # counter file and its histogram file: wait until both show every request.
    deadline = time.monotonic() + 10
    samples = scrape(stack)
    while (total(samples, "lb_upstream_latency_seconds_count") < K
           or total(samples, "lb_routed_requests_total") < K) and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = scrape(stack)
    assert total(samples, "lb_routed_requests_total") == K
    by_replica = {labels["replica"]: v for labels, v in samples["lb_routed_requests_total"]
                  if labels["code"] == "200"}
    assert by_replica == served  # per replica too, as X-Served-By told each client
    assert total(samples, "lb_upstream_latency_seconds_count") == K
    assert total(samples, "lb_retries_total") == 0
    route = [v for labels, v in samples["lb_responses_total"] if labels["endpoint"] == "route"]
    assert sum(route) == K
    assert total(samples, "lb_metrics_multiprocess") == 1
    assert total(samples, "lb_replicas_desired") == 3
    assert total(samples, "lb_supervisor_ticks_total") > 0  # the supervisor's files count too

    master = next(p for p in psutil.Process(stack.proc.pid).children()
                  if "gunicorn" in " ".join(p.cmdline()))
    workers = {p.pid for p in master.children()}
    per_pid = routed_by_pid(metrics_dir)
    assert sum(per_pid.values()) == K
    assert set(per_pid) <= workers and len(per_pid) == 2, (per_pid, workers)

    # One JSON line per routed request, with the client's id and the replica that served it.
    lines = [json.loads(line) for line in stack.log().splitlines() if line.startswith("{")]
    access = {e["request_id"]: e for e in lines if e.get("logger") == "lb.access"}
    for i in (0, K // 2, K - 1):
        entry = access[f"k-{i}"]
        assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/home", 200)
        assert entry["replica"] == results[i][2]
        assert entry["level"] == "info" and entry["duration_ms"] > 0


def test_supervisor_counts_a_replacement(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack()
    victim = next(r for r in stack.state().members() if r.server_id == 2)
    assert victim.handle
    token = victim.handle.split("/", 1)[1]
    for proc in psutil.process_iter(["environ"], ad_value=None):
        if (proc.info["environ"] or {}).get(ENV_TOKEN) == token:
            os.kill(proc.pid, signal.SIGKILL)

    def replaced() -> bool:
        state = stack.state()
        r = next(r for r in state.replicas if r.server_id == 2)
        return r.hostname != victim.hostname and r.state == READY

    deadline_polls = 600  # 0.1 s each: generous on a loaded machine
    for _ in range(deadline_polls):
        if replaced():
            samples = scrape(stack)
            if total(samples, "lb_replacement_duration_seconds_count") >= 1:
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no replacement counted: {stack.state().to_dict()}")

    # One replacement, unless a start failed on a loaded machine and was tried again.
    assert total(samples, "lb_replacements_total") >= 1
    assert total(samples, "lb_replacement_duration_seconds_sum") > 0
    down = {labels["reason"]: v for labels, v in samples["lb_replicas_marked_down_total"]}
    assert down.get("process_gone", 0) + down.get("missed_heartbeats", 0) == 1, down
    missed = [v for labels, v in samples["lb_heartbeat_failures_total"]
              if labels["replica"] == victim.hostname and labels["state"] == "ready"]
    assert sum(missed) >= 1
    assert total(samples, "lb_replicas_desired") == 3
    ready = [v for labels, v in samples["lb_replicas"] if labels["state"] == "ready"]
    assert ready == [3]


def test_a_replica_that_joins_ramps_in_status_and_metrics(
        make_stack: Callable[..., RunningStack]) -> None:
    """LB_SLOW_START on a real stack: a replica added with weight 2 shows its weight and its
    ramp (just begun: a small part of its share) in /_lb/status.json, on the page and in the
    metrics, whichever gunicorn worker answers."""
    stack = make_stack(slow_start=600, strategy="maglev")
    # Replicas ready long ago: the ones that were there before the join (a fresh stack's
    # replicas all ramp together, with nothing to fall back on, so they take their keys at once).
    with stack.registry.update() as state:
        for r in state.replicas:
            r.ready_since = time.time() - 1000
    reply = stack.post("/add", json={"n": 1, "hostnames": ["big1"], "weight": 2})
    assert reply.status_code == 200, reply.text
    for _ in range(6):  # two workers: each answers some
        status = stack.get("/_lb/status.json").json()["message"]
        rows = {r["hostname"]: r for r in status["replicas"]}
        big = rows["big1"]
        assert big["weight"] == 2 and big["expected_share"] == pytest.approx(0.4, abs=0.01)
        assert big["ramp"] is not None and 0 <= big["ramp"] < 0.1  # 60 s of its 600
        assert big["share"] <= big["ramp"] * big["expected_share"] + 0.002
        assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
        assert all(rows[h]["ramp"] is None and rows[h]["share"] > rows[h]["expected_share"]
                   for h in ("Server1", "Server2", "Server3"))
        samples = scrape(stack)
        assert {labels["replica"]: v for labels, v in samples["lb_replica_weight"]} == {
            "Server1": 1, "Server2": 1, "Server3": 1, "big1": 2}
        [(labels, ramp)] = samples["lb_replica_ramp"]
        assert labels == {"replica": "big1"} and 0 <= ramp < 0.1
        share = {labels["replica"]: v for labels, v in samples["lb_replica_share"]}
        assert share["big1"] < 0.1 * 0.4 + 0.002
        page = stack.get("/_lb/status").text
        assert 'class="state ramp"' in page
