"""The balancer's own endpoints under /_lb/, request ids, log lines and the status document,
on an in-process app (no gunicorn, no supervisor, no replica processes)."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from analysis import balance
from lb.app import create_app
from lb.balancer import Balancer
from lb.ctl import show_status
from lb.hashring import PRESETS
from lb.logs import JsonFormatter, logging_config
from lb.ops.metrics import ENV_DIR, prepare_multiprocess_dir
from lb.ops.status import Counts, RateWindow, arcs, build_status, key_space
from lb.registry import READY, Registry
from lb.settings import Settings, SettingsError
from lb.slowstart import Ramped
from lb.strategies import Maglev, well_mixed_ring
from lb.threads.forward import Upstream
from tests.helpers_stack import immutable

HEX32 = re.compile(r"[0-9a-f]{32}\Z")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    monkeypatch.delenv(ENV_DIR, raising=False)  # single-process metrics: this app's own
    yield create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-ops"})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def js(reply: Any) -> Any:
    """A test client reply's JSON body (which must be there)."""
    body = reply.get_json()
    assert body is not None, reply.data
    return body


def file_registry(app: Flask) -> Registry:
    """The app's registry: the file (these tests use no etcd)."""
    registry = Balancer.of(app).registry
    assert isinstance(registry, Registry)
    return registry


def make_ready(app: Flask, address: str) -> None:
    """Mark every replica ready at ``address`` (nothing need answer there)."""
    with file_registry(app).update() as state:
        for r in state.replicas:
            r.state, r.address, r.handle, r.last_heartbeat = READY, address, "1/x", 1.0


def metric_values(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = client.get("/_lb/metrics")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(reply.get_data(as_text=True)):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


# -- the reserved prefix --------------------------------------------------------------------------
def test_healthz_is_alive_whatever_the_replicas(client: FlaskClient) -> None:
    reply = client.get("/_lb/healthz")
    assert (reply.status_code, reply.json) == (200, {"message": "alive", "status": "successful"})


def test_readyz_needs_a_routable_replica(app: Flask, client: FlaskClient) -> None:
    reply = client.get("/_lb/readyz")
    assert reply.status_code == 503
    assert reply.json == {"message": "<Error> Not ready: no routable replica",
                          "status": "failure"}
    make_ready(app, f"http://127.0.0.1:{closed_port()}")
    reply = client.get("/_lb/readyz")
    assert reply.status_code == 200
    version = Balancer.of(app).registry.read().version
    assert reply.json == {"message": {"ready": True, "routable": 3, "registry_version": version,
                                      "stale": None}, "status": "successful"}


def test_readyz_fails_when_the_registry_was_never_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that starts while the file is unreadable has no last good state to go on."""
    monkeypatch.delenv(ENV_DIR, raising=False)
    path = tmp_path / "registry.json"
    path.write_text("not json")
    reply = create_app({"registry": str(path), "deployment": "t-ops"}).test_client().get(
        "/_lb/readyz")
    assert reply.status_code == 503
    assert js(reply)["message"].startswith(
        "<Error> Not ready: the replica registry file is corrupt (not valid JSON")
    assert str(tmp_path) not in reply.text and "registry.json" not in reply.text


@pytest.mark.parametrize("path", ["/_lb", "/_lb/", "/_lb/nope", "/_lb/metrics/x", "/_lb/home"])
def test_reserved_paths_are_never_routed(app: Flask, client: FlaskClient, path: str) -> None:
    make_ready(app, f"http://127.0.0.1:{closed_port()}")
    reply = client.get(path)
    assert reply.status_code == 404
    assert reply.json == {"message": f"<Error> '{path}' is not an endpoint of the balancer "
                                     "(/_lb/ is reserved for it)", "status": "failure"}


def test_wrong_method_on_a_reserved_endpoint_is_405(client: FlaskClient) -> None:
    reply = client.post("/_lb/metrics")
    assert reply.status_code == 405
    assert js(reply)["status"] == "failure"
    assert "GET" in reply.headers["Allow"]


def test_paths_outside_the_prefix_are_still_routed(app: Flask, client: FlaskClient) -> None:
    make_ready(app, f"http://127.0.0.1:{closed_port()}")
    for path in ("/_lbx", "/x/_lb/metrics", "/static/status.js"):
        reply = client.get(path)
        assert reply.status_code == 502, path  # routed: every replica was tried, none answered
        assert js(reply)["message"].startswith("<Error> No replica could serve the request")


# -- request ids ----------------------------------------------------------------------------------
def forwarded_ids(app: Flask, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the router answer 200 itself and remember the X-Request-ID it would forward."""
    router = Balancer.of(app).router
    seen: list[str] = []
    make_ready(app, "http://127.0.0.1:9")

    def forward(target: str, headers: list[tuple[str, str]], key: int, path: str) -> Upstream:
        seen.append(dict(headers)["X-Request-ID"])
        replica = router.candidates(key)[0]
        return Upstream(200, [("Content-Type", "text/plain")], b"ok", replica)

    monkeypatch.setattr(Balancer.of(app).forwarder, "forward", forward)
    return seen


def test_request_id_is_kept_forwarded_and_returned(app: Flask, client: FlaskClient,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen = forwarded_ids(app, monkeypatch)
    reply = client.get("/home", headers={"X-Request-ID": "abc-123.x:y_z"})
    assert reply.status_code == 200
    assert reply.headers["X-Request-ID"] == "abc-123.x:y_z"
    assert seen == ["abc-123.x:y_z"]


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 129, "semi;colon"])
def test_missing_or_odd_request_id_gets_a_new_one(app: Flask, client: FlaskClient,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   given: str | None) -> None:
    seen = forwarded_ids(app, monkeypatch)
    reply = client.get("/home", headers={} if given is None else {"X-Request-ID": given})
    rid = reply.headers["X-Request-ID"]
    assert HEX32.match(rid)
    assert seen == [rid]


def test_every_reply_has_a_request_id(client: FlaskClient) -> None:
    for reply in (client.get("/rep"), client.post("/add", data="{"), client.get("/_lb/nope"),
                  client.get("/_lb/healthz")):
        assert HEX32.match(reply.headers["X-Request-ID"])


def test_access_log_line_carries_the_request_id(client: FlaskClient,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lb.access"):
        client.get("/rep", headers={"X-Request-ID": "rid-7"})
    [record] = [r for r in caplog.records if r.name == "lb.access"]
    assert record.getMessage().startswith("GET /rep 200 - ")
    assert record.getMessage().endswith(" rid=rid-7")
    fields = vars(record)
    assert (fields["request_id"], fields["status"], fields["path"]) == ("rid-7", 200, "/rep")


# -- logs -----------------------------------------------------------------------------------------
def test_json_log_line_has_the_extras() -> None:
    logger = logging.getLogger("lb.access")
    record = logger.makeRecord("lb.access", logging.INFO, __file__, 1, "GET %s %d", ("/home", 200),
                               None, extra={"request_id": "r1", "replica": "Server1",
                                            "status": 200})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "GET /home 200"
    assert (data["level"], data["logger"], data["request_id"], data["replica"], data["status"]) \
        == ("info", "lb.access", "r1", "Server1", 200)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["ts"])


def test_json_log_line_carries_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (),
                                                   __import__("sys").exc_info())
    data = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in data["exc"]


def test_log_format_setting() -> None:
    assert Settings.from_env({}).log_format == "text"
    assert "()" in logging_config(Settings.from_env({"LB_LOG_FORMAT": "json"}))["formatters"]["lb"]
    assert "format" in logging_config(Settings.from_env({}))["formatters"]["lb"]
    with pytest.raises(SettingsError, match="log_format"):
        Settings.from_env({"LB_LOG_FORMAT": "xml"})


# -- metrics --------------------------------------------------------------------------------------
def test_unreachable_replicas_are_counted_as_retries_and_exhaustion(
        app: Flask, client: FlaskClient) -> None:
    make_ready(app, f"http://127.0.0.1:{closed_port()}")
    assert client.get("/home").status_code == 502
    values = metric_values(client)
    tried = sum(v for (name, _), v in values.items() if name == "lb_upstream_unreachable_total")
    assert tried == 3  # 1 + LB_RETRIES (2) distinct replicas
    assert values[("lb_retries_total", ())] == 2
    assert values[("lb_exhausted_total", ())] == 1
    assert values[("lb_responses_total", (("code", "502"), ("endpoint", "route")))] == 1
    assert values[("lb_replicas", (("state", "ready"),))] == 3
    assert values[("lb_replicas_desired", ())] == 3
    assert values[("lb_hash_map_info", (("preset", "seed"), ("probing", "linear"),
                                        ("slots", "512"), ("strategy", "ring"),
                                        ("virtual", "9")))] == 1
    shares = [v for (name, _), v in values.items() if name == "lb_replica_share"]
    assert len(shares) == 3 and sum(shares) == pytest.approx(1.0)


def test_prepare_multiprocess_dir_removes_only_metric_files(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_123.db").write_bytes(b"x")
    (folder / "notes.txt").write_text("keep me")
    assert prepare_multiprocess_dir(str(tmp_path / "registry.json")) == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


# -- the status document and page -----------------------------------------------------------------
def test_status_json_describes_every_replica(app: Flask, client: FlaskClient) -> None:
    make_ready(app, "http://127.0.0.1:9")
    reply = client.get("/_lb/status.json")
    assert reply.status_code == 200 and js(reply)["status"] == "successful"
    s: dict[str, Any] = js(reply)["message"]
    assert s["rep"] == {"N": 3, "replicas": ["Server1", "Server2", "Server3"]}
    assert [r["server_id"] for r in s["replicas"]] == [1, 2, 3]
    assert sum(r["slots_owned"] for r in s["replicas"]) == s["ring"]["slots"] == 512
    assert sum(r["share"] for r in s["replicas"]) == pytest.approx(1.0)
    assert all(len(r["virtual_slots"]) == 9 for r in s["replicas"])
    covered = sum(last + 1 - first for first, last, _ in s["ring"]["arcs"])
    assert covered == 512
    assert s["hash_map"] == {
        "preset": "seed", "slots": 512, "virtual": 9, "probing": "linear", "strategy": "ring",
        "hash_key": "random", "description": PRESETS["seed"].description,
        "formulas": {"H": "i + 2 * i ** 2 + 17", "Phi": "i + j + 2 * j ** 2 + 25"}}
    assert s["ring"]["layout"] == "ring"


def test_status_page_is_server_rendered(app: Flask, client: FlaskClient) -> None:
    reply = client.get("/_lb/status")
    assert reply.status_code == 200 and reply.mimetype == "text/html"
    html = reply.get_data(as_text=True)
    for name in ("Server1", "Server2", "Server3"):
        assert f'data-hostname="{name}"' in html
    assert 'data-status-url="/_lb/status.json"' in html
    script = client.get("/_lb/static/status.js")
    assert script.status_code == 200 and b"fetch(url" in script.data


@pytest.mark.parametrize(("strategy", "expected", "layout"), [
    ("maglev", lambda: Maglev([1, 2, 3]), "table"),
    ("ring160", lambda: well_mixed_ring([1, 2, 3]), "ring"),
])
def test_shares_are_those_of_the_strategy_that_routes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, expected: Any,
        layout: str) -> None:
    """The status page, /_lb/status.json, lb_replica_share and lb-analyze balance report the
    routing strategy's own shares and slots (not the spec ring's 96.5 % for Server1)."""
    monkeypatch.delenv(ENV_DIR, raising=False)
    app = create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-ops",
                      "strategy": strategy})
    client = app.test_client()
    make_ready(app, "http://127.0.0.1:9")
    lookup = expected()
    want = lookup.shares()
    s = js(client.get("/_lb/status.json"))["message"]
    assert {r["server_id"]: r["share"] for r in s["replicas"]} == pytest.approx(want)
    assert max(want.values()) < 0.4  # balanced: nothing like the spec ring's 0.965
    metrics = {dict(labels)["server_id"]: v for (name, labels), v in metric_values(client).items()
               if name == "lb_replica_share"}
    assert {int(k): v for k, v in metrics.items()} == pytest.approx(want)
    assert s["ring"]["slots"] == len(lookup.owners()) > 512
    assert s["ring"]["layout"] == layout
    owned = {r["server_id"]: r["slots_owned"] for r in s["replicas"]}
    assert owned == {sid: sum(o == sid for o in lookup.owners()) for sid in (1, 2, 3)}
    if layout == "table":
        assert s["ring"]["arcs"] == [] and s["ring"]["virtual_servers"] == []
    else:
        assert sum(last + 1 - first for first, last, _ in s["ring"]["arcs"]) == 65536
        # 160 each, less the few that hash to a slot a higher hash holds (lb.strategies)
        assert len(s["ring"]["virtual_servers"]) == len(lookup.virtual_servers()) > 3 * 150
    page = client.get("/_lb/status").get_data(as_text=True)
    assert f"{want[1] * 100:.1f}%" in page
    variant = next(v for v in balance.variants() if v.name == strategy)
    row = balance.measure(variant, [123456], [3])[0]
    assert row.share_max_mean == pytest.approx(max(want.values()) * 3)


def test_arcs_are_runs_of_one_owner() -> None:
    assert arcs([1, 1, 2, 2, 2, 1]) == [[0, 1, 1], [2, 4, 2], [5, 5, 1]]
    assert arcs([None, None]) == []


def test_rates_come_from_samples_at_least_a_second_apart() -> None:
    window = RateWindow(window=60)
    assert window.rates(100.0, {"a": Counts(10, 1)}) == (None, {})
    assert window.rates(100.5, {"a": Counts(12, 1)}) == (None, {})  # too close to the first
    span, rates = window.rates(102.0, {"a": Counts(30, 3), "b": Counts(4, 0)})
    assert span == 2.0
    assert rates == {"a": Counts(10.0, 1.0), "b": Counts(2.0, 0.0)}
    span, _ = window.rates(200.0, {"a": Counts(30, 3)})  # the old samples aged out
    assert span is None


def test_build_status_counts_down_replicas_out_of_the_ring(app: Flask) -> None:
    registry = file_registry(app)
    make_ready(app, "http://127.0.0.1:9")
    with registry.update() as state:
        state.replicas[0].state = "down"
    state = registry.read()
    s = build_status(state, {"Server2": Counts(5, 1)}, {}, None, Balancer.of(app).settings,
                     now=2.0)
    down, up2, up3 = s["replicas"]
    assert (down["routable"], down["slots_owned"], down["share"]) == (False, 0, 0.0)
    assert up2["slots_owned"] + up3["slots_owned"] == 512
    assert (up2["requests"], up2["errors"], up2["request_rate"]) == (5, 1, None)
    assert up2["heartbeat_age"] == 1.0
    assert {sid for _, _, sid in s["ring"]["arcs"]} == {2, 3}


def test_status_shows_each_replicas_failure_domain_when_known(app: Flask,
                                                             client: FlaskClient) -> None:
    """Additive: a ``domain`` on every replica, null where none is known (local processes);
    the page and ``lbctl status`` show it only where it is known."""
    registry = file_registry(app)
    make_ready(app, "http://127.0.0.1:9")
    s = js(client.get("/_lb/status.json"))["message"]
    assert [r["domain"] for r in s["replicas"]] == [None, None, None]
    assert "DOMAIN" not in show_status(s) and "failure domain" not in client.get(
        "/_lb/status").get_data(as_text=True)
    with registry.update() as state:
        state.replicas[0].domain = state.replicas[1].domain = "worker1"
    s = js(client.get("/_lb/status.json"))["message"]
    assert [r["domain"] for r in s["replicas"]] == ["worker1", "worker1", None]
    shown = show_status(s).splitlines()
    assert shown[3].split()[-1] == "DOMAIN"
    assert [line.split()[-1] for line in shown[4:]] == ["worker1", "worker1", "-"]
    html = client.get("/_lb/status").get_data(as_text=True)
    assert html.count("on worker1</span>") == 2


def test_batched_counts_give_the_same_figures_as_direct_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The event-driven worker batches its counts (LoopCounts.flush writes a histogram's
    buckets itself): the exposition must be what one observe() per request gives."""
    from lb.ops.metrics import BalancerMetrics
    from lb.registry import Replica

    monkeypatch.delenv(ENV_DIR, raising=False)
    direct, batched = BalancerMetrics(), BalancerMetrics()
    counts = batched.batched()
    replicas = [Replica("S1", 1, []), Replica("S2", 2, [])]
    events = [(replicas[i % 2], 200 if i % 7 else 503, 0.0007 * i, i % 3) for i in range(200)]
    for metrics in (direct, counts):
        for replica, status, seconds, attempt in events + [(replicas[0], 200, 20.0, 0)]:
            metrics.forwarded(replica, status, seconds, attempt)
            metrics.response("route", status)
    assert list(batched.families()) != list(direct.families())  # nothing written yet
    counts.flush()

    def samples(metrics: BalancerMetrics) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        return sorted((s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
                      for f in metrics.families() for s in f.samples
                      if not s.name.endswith("_created"))

    assert samples(batched) == samples(direct)
    assert any(name == "lb_upstream_latency_seconds_bucket" for name, _, _ in samples(direct))


def test_no_reply_names_a_file(app: Flask, client: FlaskClient) -> None:
    """The registry's and the backend's errors reach clients as what is wrong, never where: a
    replica that cannot start (its log file cannot be created), a registry file that became
    unreadable, a registry folder that cannot be written. None of them is a 500."""
    make_ready(app, f"http://127.0.0.1:{closed_port()}")
    folder = Path(file_registry(app).path).parent
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    replies = []
    with immutable(logs):
        replies.append(client.post("/add", json={"n": 1, "hostnames": ["L1"]}))
        assert js(replies[-1])["message"] == (
            "<Error> Could not start new replicas: cannot start replica L1: Operation not "
            "permitted; nothing was added")
    assert client.get("/rep").status_code == 200  # a good state read: fail static from here on
    with immutable(folder):
        replies += [client.post("/add", json={"n": 1}), client.delete("/rm", json={"n": 1})]
        Path(file_registry(app).path).write_text("{garbage")
        replies += [client.get("/rep"), client.post("/add", json={"n": 1}),
                    client.delete("/rm", json={"n": 1}), client.get("/_lb/status.json"),
                    client.get("/_lb/status"), client.get("/_lb/readyz")]
    for reply in replies:
        assert reply.status_code in (200, 503), reply.data
        assert str(folder) not in reply.get_data(as_text=True)
        assert "registry.json" not in reply.get_data(as_text=True)
        assert "/tmp" not in reply.get_data(as_text=True)
    assert [r.status_code for r in replies] == [503] * 8 + [200]


# -- weights and slow start in the status, the page and the metrics ------------------------------
def test_status_and_metrics_show_weights_and_the_shares_in_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights 2:1:0 on Maglev: the status, lb_replica_weight and lb_replica_share give the
    router's own shares (the drained replica none); nothing ramps."""
    monkeypatch.delenv(ENV_DIR, raising=False)
    app = create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-ops",
                      "strategy": "maglev"})
    client = app.test_client()
    make_ready(app, "http://127.0.0.1:9")
    reply = client.post("/weight", json={"weights": {"Server1": 2, "Server3": 0}})
    assert reply.status_code == 200, reply.data
    want = Maglev([1, 2], weights={1: 2, 2: 1}).shares()
    assert Balancer.of(app).router.table().ring.shares() == want  # what routes
    s = js(client.get("/_lb/status.json"))["message"]
    rows = {r["hostname"]: r for r in s["replicas"]}
    assert {h: r["weight"] for h, r in rows.items()} == {"Server1": 2, "Server2": 1, "Server3": 0}
    assert rows["Server1"]["share"] == pytest.approx(want[1]) == pytest.approx(2 / 3, abs=0.01)
    assert rows["Server3"]["share"] == rows["Server3"]["expected_share"] == 0.0
    assert all(r["ramp"] is None and r["share"] == r["expected_share"] for r in rows.values())
    values = metric_values(client)
    weights = {dict(labels)["replica"]: v for (name, labels), v in values.items()
               if name == "lb_replica_weight"}
    assert weights == {"Server1": 2, "Server2": 1, "Server3": 0}
    shares = {dict(labels)["replica"]: v for (name, labels), v in values.items()
              if name == "lb_replica_share"}
    assert shares == pytest.approx({"Server1": want[1], "Server2": want[2], "Server3": 0.0})
    assert not any(name == "lb_replica_ramp" for name, _ in values)
    page = client.get("/_lb/status").get_data(as_text=True)
    assert ">drained</span>" in page and "ramp " not in page
    assert show_status(s).splitlines()[3].split()[3] == "WEIGHT"


def test_a_ramping_replica_shows_its_ramp_and_the_share_it_gets_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LB_SLOW_START=100 and Server3 ready 40 s ago: its ramp is 0.4, its share 0.4 x its full
    share (the rest with the others), the same in the status, the page, lbctl and the metrics,
    and the same as the router's lookup."""
    monkeypatch.delenv(ENV_DIR, raising=False)
    app = create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-ops",
                      "strategy": "maglev", "slow_start": 100})
    client = app.test_client()
    make_ready(app, "http://127.0.0.1:9")
    with file_registry(app).update() as state:
        state.replicas[2].ready_since = time.time() - 40
    ring = Balancer.of(app).router.table().ring
    assert isinstance(ring, Ramped)
    full = Maglev([1, 2, 3]).shares()
    s = js(client.get("/_lb/status.json"))["message"]
    rows = {r["hostname"]: r for r in s["replicas"]}
    ramp = rows["Server3"]["ramp"]
    assert ramp == pytest.approx(0.4, abs=0.02)  # a generous 2 s for a loaded machine
    assert (rows["Server1"]["ramp"], rows["Server2"]["ramp"]) == (None, None)
    assert {r["server_id"]: r["expected_share"] for r in rows.values()} == pytest.approx(full)
    assert rows["Server3"]["share"] == pytest.approx(ramp * full[3], abs=0.002)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert rows["Server1"]["share"] > full[1]  # it keeps part of Server3's keys meanwhile
    values = metric_values(client)
    ramps = {dict(labels)["replica"]: v for (name, labels), v in values.items()
             if name == "lb_replica_ramp"}
    assert list(ramps) == ["Server3"] and ramps["Server3"] == pytest.approx(ramp, abs=0.02)
    shares = {dict(labels)["replica"]: v for (name, labels), v in values.items()
              if name == "lb_replica_share"}
    assert shares["Server3"] == pytest.approx(rows["Server3"]["share"], abs=0.005)
    page = client.get("/_lb/status").get_data(as_text=True)
    assert re.search(r">ramp (39|40|41|42)%</span>", page), page
    assert "once slow start's ramps end" in page
    assert re.search(r"\b1 ramp (39|40|41|42)%", show_status(s))
    # A registry change rebuilds the router's lookup: past its ramp, Server3 ramps no more.
    with file_registry(app).update() as state:
        state.replicas[2].ready_since = time.time() - 100
    rows = {r["hostname"]: r for r in js(client.get("/_lb/status.json"))["message"]["replicas"]}
    assert not isinstance(Balancer.of(app).router.table().ring, Ramped)
    assert all(r["ramp"] is None and r["share"] == r["expected_share"] for r in rows.values())


def test_key_space_follows_the_ramp_of_the_lookup_in_use() -> None:
    """The router keeps a ``Ramped`` lookup until the registry changes: its ramps are read at
    each call, and one that has ended is no ramp."""
    now = [50.0]
    lookup = Ramped({1: Maglev([1, 2, 3]), 0: Maglev([1, 2])}, {3: 0.0}, 100,
                    clock=lambda: now[0])
    space = key_space(lookup)
    assert space.ramps == {3: 0.5} and space.full == Maglev([1, 2, 3]).shares()
    assert space.shares[3] == pytest.approx(space.full[3] / 2, abs=1e-4)
    now[0] = 150.0
    space = key_space(lookup)
    assert space.ramps == {} and space.shares == pytest.approx(space.full)
    plain = key_space(Maglev([1, 2]))
    assert plain.shares == plain.full and plain.ramps == {}


def test_routing_lookup_is_the_routers_own_or_built_the_same_way(app: Flask) -> None:
    """The status reads the router's current lookup; for a state of another version (the
    registry changed in between), the one the router builds for it."""
    from lb.ops.blueprint import routing_lookup

    router = Balancer.of(app).router
    make_ready(app, "http://127.0.0.1:9")
    before = file_registry(app).read()
    assert routing_lookup(router, before) is router.table().ring
    with file_registry(app).update() as state:
        state.replicas[0].weight = 0
    assert router.table().version != before.version
    assert routing_lookup(router, before).shares() == pytest.approx(
        before.lookup("ring", before.routable()).shares())
