"""``lb-run``: the one command that runs everything, and stops everything on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from lb.settings import Settings
from tests.conftest import RunningStack, deployment_processes, free_port

pytestmark = pytest.mark.system


def test_help_lists_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "lb", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for name in ("LB_PORT", "LB_N", "LB_SLOTS", "LB_HASH", "LB_BACKEND", "LB_REGISTRY"):
        assert name in out


def test_bad_setting_is_a_clear_error_not_a_traceback() -> None:
    run = subprocess.run([sys.executable, "-m", "lb"], capture_output=True, text=True, check=False,
                         timeout=60, env={**os.environ, "LB_HASH": "md5"})
    assert run.returncode != 0
    assert "hash must be one of seed, cs60002, xxhash" in run.stderr
    assert "Traceback" not in run.stderr


def test_ctrl_c_stops_balancer_supervisor_and_every_replica(tmp_path: Path) -> None:
    deployment = f"cc{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env({}, port=free_port(), deployment=deployment,
                                 registry=str(tmp_path / "registry.json"))
    proc = subprocess.Popen([sys.executable, "-m", "lb"], env={**os.environ, **settings.to_env()},
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{settings.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if len(requests.get(url + "/rep", timeout=2).json()["message"]["replicas"]) == 3 \
                        and requests.get(url + "/home", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "lb-run did not come up"
            time.sleep(0.2)
        assert requests.post(url + "/add", json={"n": 1}, timeout=60).status_code == 200
        assert len(deployment_processes(deployment)) >= 8  # 4 replicas: master + worker each
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=60) == 0
        assert deployment_processes(deployment) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/rep", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_add_that_times_out_is_rolled_back(make_stack: object) -> None:
    stack: RunningStack = make_stack(start_timeout=0.01)  # type: ignore[operator]
    before = stack.state()
    reply = stack.post("/add", json={"n": 2, "hostnames": ["Late"]})
    assert reply.status_code == 503
    body = reply.json()
    assert body["status"] == "failure"
    assert body["message"].startswith("<Error> New replicas did not answer their heartbeat")
    assert body["message"].endswith("nothing was added")
    after = stack.state()
    assert after.rep() == before.rep()
    time.sleep(1.5)  # the supervisor must not adopt or keep anything of the failed call
    running = {p.info["environ"].get("HASHLB_HOSTNAME")
               for p in deployment_processes(stack.settings.deployment)}
    assert running == {"Server1", "Server2", "Server3"}
