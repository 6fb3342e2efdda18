"""What the balancer says about an etcd registry: the status document, the status page and the
metrics name the store, the revision applied, the leading supervisor and the age of the last
change (an in-process app on a real etcd cluster; no gunicorn, no replica processes)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.app import create_app
from lb.balancer import Balancer
from lb.etcd import EtcdRegistry, EtcdView, Leadership
from lb.ha import EtcdCluster
from tests.helpers_etcd import etcd_cluster, etcd_prefix  # noqa: F401 - fixtures


def _status(client: Any) -> dict[str, Any]:
    reply = client.get("/_lb/status.json")
    assert reply.status_code == 200, reply.text
    status: dict[str, Any] = reply.get_json()["message"]
    return status


@pytest.mark.system
def test_status_and_metrics_show_the_store_revision_and_leader(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:  # noqa: F811
    address = etcd_cluster.address(etcd_prefix)
    app = create_app({"registry": address, "deployment": "t-etcd-ops"})
    client = app.test_client()
    view, registry = Balancer.of(app).router.view, Balancer.of(app).registry
    assert isinstance(view, EtcdView) and isinstance(registry, EtcdRegistry)

    first = _status(client)["registry"]
    assert first["store"] == "etcd" and first["leader"] is None  # no supervisor runs
    assert first["revision"] == registry.get().mod_revision

    leadership = Leadership(registry.etcd, registry.leader_key, 3, "host-a:4242")
    assert leadership.campaign()
    try:
        with registry.update() as state:  # a change, as the supervisor makes them
            state.replicas[0].failures = 1
        deadline = time.monotonic() + 5
        while view.revision != registry.get().mod_revision:  # the watch applies it
            assert time.monotonic() < deadline, "the watch never applied the change"
            time.sleep(0.02)
        now = _status(client)["registry"]
        assert now["leader"] == "host-a:4242"
        assert now["revision"] == registry.get().mod_revision > first["revision"]
        assert 0 <= now["change_age"] < 5

        page = client.get("/_lb/status").text
        assert f"etcd · revision {now['revision']} · leader host-a:4242" in page

        metrics = {s.name: s for f in text_string_to_metric_families(
            client.get("/_lb/metrics").text) for s in f.samples}
        assert metrics["lb_registry_info"].labels == {"store": "etcd"}
        assert metrics["lb_registry_revision"].value == now["revision"]
        assert metrics["lb_supervisor_leader"].labels == {"leader": "host-a:4242"}
        assert metrics["lb_registry_change_age_seconds"].value >= 0
    finally:
        leadership.step_down()
    assert _status(client)["registry"]["leader"] is None  # stepping down frees the key


def test_the_file_store_says_file_and_no_leader(tmp_path: Any) -> None:
    app = create_app({"registry": str(tmp_path / "registry.json"), "deployment": "t-file"})
    facts = _status(app.test_client())["registry"]
    assert facts["store"] == "file" and facts["leader"] is None
    assert facts["revision"] == 1  # the file's version: created once
