"""TLS termination on the balancer (lb/tls.py): real certificates made with the openssl CLI,
real stacks over HTTPS on both workers, and lb-run refusing bad files before starting anything.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from lb.ctl import OK, UNREACHABLE, run
from lb.settings import Settings
from lb.tls import binds, opens_plain_http, plain_http_reply, server_context, validity_problem
from tests.conftest import RunningStack, deployment_processes, free_port, unavailable
from tests.helpers_echo import start_echo_replica

TOKEN = "tls-token"
PLAIN_HTTP = "<Error> Bad Request: The plain HTTP request was sent to HTTPS port"


def openssl(*args: str | Path) -> None:
    if shutil.which("openssl") is None:
        unavailable("the openssl command is not installed")
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def self_signed(folder: Path, name: str, days: int = 2) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-days", str(days), "-keyout", key, "-out", cert)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder, "good")
    _other, other_key = self_signed(folder, "other")
    expired = folder / "expired.pem"
    openssl("x509", "-in", cert, "-signkey", key, "-days", "-1", "-out", expired)
    both = folder / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return {"cert": cert, "key": key, "other_key": other_key, "expired": expired, "both": both,
            "folder": folder}


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` in clear and read until the balancer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


# -- the pure parts --------------------------------------------------------------------------------
def test_listeners_follow_the_settings() -> None:
    plain = Settings.from_env({}, port=5000)
    assert binds(plain) == ["127.0.0.1:5000"]
    both = Settings.from_env({}, port=5000, tls_cert="c.pem", tls_port=5443)
    assert binds(both) == ["127.0.0.1:5000", "127.0.0.1:5443"]
    only = Settings.from_env({}, port=5000, tls_cert="c.pem")
    assert binds(only) == ["127.0.0.1:5000"]
    assert server_context(plain) is None


def test_first_bytes_tell_plain_http_from_tls() -> None:
    assert opens_plain_http(b"GET /home HTTP/1.1\r\n")
    assert opens_plain_http(b"POST /add")
    assert not opens_plain_http(b"\x16\x03\x01\x02\x00")  # a ClientHello record
    assert not opens_plain_http(b"")
    head, _, body = plain_http_reply().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"message": PLAIN_HTTP, "status": "failure"}


def test_certificate_dates() -> None:
    day = datetime.timedelta(days=1)
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    assert validity_problem((now - day, now + day), now) is None
    assert "expired on 2029-12-31" in str(validity_problem((now - 2 * day, now - day), now))
    assert "not valid before" in str(validity_problem((now + day, now + 2 * day), now))


def test_context_is_modern(certs: dict[str, Path]) -> None:
    context = server_context(Settings.from_env({}, tls_cert=str(certs["both"])))
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not any("RC4" in c["name"] or "NULL" in c["name"] or "3DES" in c["name"]
                   for c in context.get_ciphers())


# -- lb-run refuses bad files, starting nothing ----------------------------------------------------
BAD_FILES = {
    "missing": (lambda c: {"LB_TLS_CERT": str(c["folder"] / "nope.pem")}, "cannot be read"),
    "unreadable": (lambda c: {"LB_TLS_CERT": str(c["folder"])}, "cannot be read"),
    "missing key": (lambda c: {"LB_TLS_CERT": str(c["cert"]),
                               "LB_TLS_KEY": str(c["folder"] / "nope.pem")}, "cannot be read"),
    "not a certificate": (lambda c: {"LB_TLS_CERT": str(c["key"])}, "no PEM certificate"),
    "expired": (lambda c: {"LB_TLS_CERT": str(c["expired"]), "LB_TLS_KEY": str(c["key"])},
                "the certificate expired on"),
    "key of another": (lambda c: {"LB_TLS_CERT": str(c["cert"]),
                                  "LB_TLS_KEY": str(c["other_key"])},
                       "does not match the certificate"),
    "no key": (lambda c: {"LB_TLS_CERT": str(c["cert"])}, "no usable private key"),
}


@pytest.mark.system
@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_certificate_stops_lb_run_at_once(case: str, certs: dict[str, Path],
                                              tmp_path: Path) -> None:
    make_env, says = BAD_FILES[case]
    deployment = f"tls{os.getpid()}{abs(hash(case)) % 10**6}"
    env = {**os.environ, "LB_PORT": str(free_port()), "LB_DEPLOYMENT": deployment,
           "LB_REGISTRY": str(tmp_path / "registry.json"), **make_env(certs)}
    done = subprocess.run([sys.executable, "-m", "lb"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lb-run: LB_TLS_"), done.stderr
    assert says in lines[0]
    assert not (tmp_path / "registry.json").exists()  # nothing was started or written
    assert deployment_processes(deployment) == []


# -- real stacks over HTTPS ------------------------------------------------------------------------
@pytest.mark.system
def test_http_and_https_on_two_ports(make_stack: Callable[..., RunningStack],
                                     certs: dict[str, Path]) -> None:
    tls_port = free_port()
    stack = make_stack(tls_cert=str(certs["cert"]), tls_key=str(certs["key"]),
                       tls_port=tls_port, admin_token=TOKEN)
    https = f"https://127.0.0.1:{tls_port}"
    ca = str(certs["cert"])
    assert stack.url.startswith("http://")  # plain HTTP stays on LB_PORT
    assert stack.get("/home").json()["message"].startswith("Hello from Server: ")
    with requests.Session() as session:
        session.verify = ca
        session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, wins over verify
        for _ in range(5):  # routed GETs, a new connection and kept-alive ones
            reply = session.get(f"{https}/home", timeout=30)
            assert reply.status_code == 200
            assert reply.json()["message"].startswith("Hello from Server: ")
        assert session.get(f"{https}/rep", timeout=30).json()["message"]["N"] == 3
        refused = session.post(f"{https}/add", json={"n": 1}, timeout=60)
        assert refused.status_code == 401
        added = session.post(f"{https}/add", json={"n": 1}, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert added.status_code == 200, added.text
        assert added.json()["message"]["N"] == 4
    with pytest.raises(requests.exceptions.SSLError):  # not trusted without the CA file
        requests.get(f"{https}/home", timeout=30)
    # Plain HTTP on the HTTPS port: a 400 in the contract's envelope, then the close.
    reply = raw_exchange(tls_port, b"GET /home HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), reply
    assert json.loads(body) == {"message": PLAIN_HTTP, "status": "failure"}
    # lbctl over HTTPS, trusting the certificate with --cacert.
    out, err = io.StringIO(), io.StringIO()
    assert run(["--url", https, "--cacert", ca, "--json", "rep"], out, err) == OK, err.getvalue()
    assert json.loads(out.getvalue())["message"]["N"] == 4
    assert run(["--url", https, "rep"], io.StringIO(), err) == UNREACHABLE  # not trusted
    assert "certificate" in err.getvalue().lower()


@pytest.mark.system
def test_replicas_are_told_which_scheme_the_client_spoke(
        make_stack: Callable[..., RunningStack], certs: dict[str, Path]) -> None:
    """X-Forwarded-Proto: https for a request that came over TLS, http for one that did not."""
    tls_port = free_port()
    stack = make_stack(n=1, tls_cert=str(certs["cert"]), tls_key=str(certs["key"]),
                       tls_port=tls_port)
    start_echo_replica(stack.registry, stack.settings.deployment, "tls-echo")
    removed = stack.delete("/rm", json={"n": 1, "hostnames": ["Server1"]})
    assert removed.status_code == 200, removed.text  # the echo replica answers every key now

    def proto(base: str, verify: str | bool = True) -> str | None:
        with requests.Session() as session:
            session.trust_env = False
            reply = session.get(f"{base}/echo", timeout=30, verify=verify)
        assert reply.status_code == 200, reply.text
        return dict(reply.json()["headers"]).get("X-Forwarded-Proto")

    assert proto(f"https://127.0.0.1:{tls_port}", str(certs["cert"])) == "https"
    assert proto(stack.url) == "http"


@pytest.mark.system
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_https_only(make_stack: Callable[..., RunningStack], certs: dict[str, Path]) -> None:
    stack = make_stack(tls_cert=str(certs["both"]))  # key and certificate in one file
    assert stack.url.startswith("https://")
    assert stack.get("/home").json()["message"].startswith("Hello from Server: ")
    assert stack.get("/rep").json()["message"]["N"] == 3
    reply = raw_exchange(stack.settings.port, b"GET /rep HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and PLAIN_HTTP.encode() in reply
    assert "plain HTTP request from 127.0.0.1 on the HTTPS port" in stack.log()
    # A TLS 1.1 client is refused: TLS 1.2 at least.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        old.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", stack.settings.port), timeout=10) as raw, \
                old.wrap_socket(raw) as tls:
            tls.sendall(b"GET /rep HTTP/1.0\r\n\r\n")
    assert stack.get("/home").status_code == 200  # and it still serves
