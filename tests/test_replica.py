"""The replica server, in-process and as the real gunicorn process the backend starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from lb.backends.base import ReplicaSpec
from lb.backends.local import LocalBackend
from lb.heartbeat import wait_ready
from lb.settings import Settings
from replica.app import create_app


def test_home_heartbeat_and_404_in_process() -> None:
    client = create_app({"SERVER_ID": "7"}).test_client()
    home = client.get("/home")
    assert home.status_code == 200
    assert home.get_json() == {"message": "Hello from Server: 7", "status": "successful"}
    beat = client.get("/heartbeat")
    assert beat.status_code == 200 and beat.data == b""
    assert client.get("/other").status_code == 404


def test_server_id_must_be_numeric() -> None:
    with pytest.raises(ValueError):
        create_app({"SERVER_ID": "abc"})


@pytest.mark.system
def test_real_replica_process_answers_with_its_server_id(tmp_path: Path) -> None:
    backend = LocalBackend(Settings.from_env({}, deployment=f"rt{tmp_path.name[-8:]}",
                                             registry=str(tmp_path / "r.json")))
    inst = backend.start(ReplicaSpec("Server42", 42))
    try:
        assert wait_ready([inst.address], 20) == {inst.address}
        reply = requests.get(inst.address + "/home", timeout=5)
        assert reply.json() == {"message": "Hello from Server: 42", "status": "successful"}
        assert [i.hostname for i in backend.list()] == ["Server42"]
    finally:
        backend.stop(inst.handle)
    assert backend.list() == []
    backend.stop(inst.handle)  # already gone: still fine
