"""``lbctl`` against a real stack: every admin operation, --json equal to what /rep says,
readable tables, the admin token, exit codes, and a watch that stops on Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lb.ctl import BAD_REPLY, FAILURE, OK, UNREACHABLE, USAGE, run
from tests.conftest import RunningStack, free_port

TOKEN = "ctl-token"
LBCTL = Path(sys.executable).with_name("lbctl")


def ctl(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> \
        subprocess.CompletedProcess[str]:
    """The installed ``lbctl`` script, as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("LB_URL", "LB_ADMIN_TOKEN")}
    full_env.update(env or {})
    return subprocess.run([str(LBCTL), *argv], capture_output=True, text=True, env=full_env,
                          timeout=timeout, check=False)


def inproc(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


# -- without a balancer ---------------------------------------------------------------------------
def test_cannot_connect_is_exit_3() -> None:
    code, out, err = inproc("--url", f"http://127.0.0.1:{free_port()}", "rep")
    assert code == UNREACHABLE == 3
    assert out == "" and "cannot connect" in err and "refused" in err.lower()


@pytest.mark.parametrize("argv", [[], ["bogus"], ["add"], ["add", "0"], ["add", "x"],
                                  ["rm", "-1"], ["watch", "--interval", "0"], ["rep", "--nope"]])
def test_usage_errors_are_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        inproc(*argv)
    assert exc.value.code == USAGE == 2


@pytest.mark.parametrize("pairs", [["Server1"], ["Server1=x"], ["Server1=2.5"], ["=2"],
                                   ["Server1=2", "Server1=3"], ["Server1=2", "Server2:1"]])
def test_bad_weight_arguments_are_one_line_before_any_call(pairs: list[str]) -> None:
    """Nothing listens at the URL: a call would be exit 3."""
    code, out, err = inproc("--url", f"http://127.0.0.1:{free_port()}", "weight", *pairs)
    assert (code, out) == (USAGE, "")
    assert err.startswith("lbctl: weight: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["--help"], ["rep", "--help"], ["add", "--help"],
                                  ["rm", "--help"], ["status", "--help"], ["watch", "--help"],
                                  ["weight", "--help"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        inproc(*argv)
    assert exc.value.code == 0
    assert "usage: lbctl" in capsys.readouterr().out


def test_url_and_token_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lb.ctl import parser

    monkeypatch.setenv("LB_URL", "http://127.0.0.2:1")
    monkeypatch.setenv("LB_ADMIN_TOKEN", "from-env")
    args = parser().parse_args(["rep"])
    assert (args.url, args.token, args.json) == ("http://127.0.0.2:1", "from-env", False)
    args = parser().parse_args(["--json", "rep", "--url", "http://127.0.0.1:2"])
    assert (args.url, args.json) == ("http://127.0.0.1:2", True)


# -- against a real stack -------------------------------------------------------------------------

def rep_now(stack: RunningStack) -> dict[str, Any]:
    reply = stack.get("/rep")
    assert reply.status_code == 200
    body: dict[str, Any] = reply.json()
    return body


@pytest.mark.system
def test_lbctl_drives_every_admin_operation(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(admin_token=TOKEN)
    url = ["--url", stack.url]

    done = ctl("rep", "--json", *url)
    assert done.returncode == OK, done.stderr
    assert json.loads(done.stdout) == rep_now(stack)

    done = ctl("rep", *url)
    assert (done.returncode, done.stdout) == (OK, "N=3\n  Server1\n  Server2\n  Server3\n")

    # The token: refused without it, taken from --token or from LB_ADMIN_TOKEN.
    done = ctl("add", "1", *url)
    assert done.returncode == FAILURE
    assert "HTTP 401" in done.stderr and rep_now(stack)["message"]["N"] == 3
    done = ctl("add", "2", "--name", "S5", "--json", "--token", TOKEN, *url)
    assert done.returncode == OK, done.stderr
    added = json.loads(done.stdout)
    assert added == rep_now(stack)
    assert added["message"]["N"] == 5 and added["message"]["replicas"][3] == "S5"

    done = ctl("rm", "1", "--name", "S5", "--json", *url, env={"LB_ADMIN_TOKEN": TOKEN})
    assert done.returncode == OK, done.stderr
    removed = json.loads(done.stdout)
    assert removed == rep_now(stack) and "S5" not in removed["message"]["replicas"]
    assert removed["message"]["N"] == 4

    done = ctl("rm", "1", *url, env={"LB_ADMIN_TOKEN": TOKEN})
    assert done.returncode == OK, done.stderr
    assert done.stdout.startswith("N=3\n")
    assert done.stdout.split() == ["N=3", *rep_now(stack)["message"]["replicas"]]

    # A failure reply: exit 1, the contract's message on stderr, the envelope with --json.
    done = ctl("add", "1", "--name", "A", "B", "--json", "--token", TOKEN, *url)
    assert done.returncode == FAILURE
    assert json.loads(done.stdout) == {
        "message": "<Error> Length of hostname list is more than newly added instances",
        "status": "failure"}
    assert "HTTP 400" in done.stderr
    done = ctl("rm", "1", "--name", "nobody", "--token", TOKEN, *url)
    assert (done.returncode, done.stdout) == (FAILURE, "")
    assert "Replica 'nobody' does not exist" in done.stderr
    assert rep_now(stack)["message"]["N"] == 3

    # Weights: at /add, changed with NAME=W, listed with no argument (the same POST).
    done = ctl("add", "1", "--name", "W1", "--weight", "3", "--token", TOKEN, *url)
    assert done.returncode == OK, done.stderr
    done = ctl("weight", "--json", *url)  # a read, but a POST all the same: the token
    assert done.returncode == FAILURE and "HTTP 401" in done.stderr
    done = ctl("weight", "--json", "--token", TOKEN, *url)
    assert done.returncode == OK, done.stderr
    listed = json.loads(done.stdout)["message"]
    names = rep_now(stack)["message"]["replicas"]
    assert listed["replicas"] == names and listed["weights"][names[0]] == 1
    assert listed["weights"]["W1"] == 3
    assert sum(listed["shares"].values()) == pytest.approx(1.0, abs=1e-5)  # 6 digits each
    done = ctl("weight", f"{names[0]}=2", f"{names[1]}=0", *url, env={"LB_ADMIN_TOKEN": TOKEN})
    assert done.returncode == OK, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "N=4" and lines[1].split() == ["REPLICA", "WEIGHT", "SHARE"]
    shown = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert shown[names[0]][0] == "2" and shown[names[1]] == ["0", "0.0%"]
    assert shown["W1"][0] == "3"
    done = ctl("status", "--json", *url)
    rows = {r["hostname"]: r for r in json.loads(done.stdout)["message"]["replicas"]}
    assert {h: r["weight"] for h, r in rows.items()} == {
        names[0]: 2, names[1]: 0, names[2]: 1, "W1": 3}
    assert rows[names[1]]["share"] == 0.0 and rows["W1"]["share"] > rows[names[2]]["share"]
    done = ctl("weight", "nobody=1", "--token", TOKEN, *url)
    assert (done.returncode, done.stdout) == (FAILURE, "")
    assert "HTTP 409" in done.stderr and "Replica 'nobody' does not exist" in done.stderr
    done = ctl("weight", f"{names[0]}=257", "--json", "--token", TOKEN, *url)
    assert done.returncode == FAILURE and "HTTP 400" in done.stderr
    assert json.loads(done.stdout)["status"] == "failure"
    done = ctl("weight", f"{names[0]}=x", "--token", TOKEN, *url)
    assert (done.returncode, done.stdout) == (USAGE, "")
    assert done.stderr.count("\n") == 1 and "is not NAME=W" in done.stderr


@pytest.mark.system
def test_lbctl_status_and_watch(stack: RunningStack) -> None:
    url = ["--url", stack.url]
    for _ in range(5):
        stack.get("/home")

    for _ in range(20):  # the event-driven worker writes its counts ten times a second
        done = ctl("status", "--json", *url)
        assert done.returncode == OK, done.stderr
        status = json.loads(done.stdout)
        if status["message"]["totals"]["requests"] == 5:
            break
    assert status["status"] == "successful"
    assert status["message"]["rep"] == rep_now(stack)["message"]
    assert status["message"]["totals"]["requests"] == 5

    done = ctl("status", *url)
    assert done.returncode == OK, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{stack.settings.deployment}: N=3  ready=3  down=0")
    assert "REPLICA" in lines[3] and "SHARE" in lines[3]
    assert [line.split()[0] for line in lines[4:]] == ["Server1", "Server2", "Server3"]

    done = ctl("watch", "--count", "2", "--interval", "0.2", "--json", *url)
    assert done.returncode == OK, done.stderr
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(frames) == 2 and all(f["status"] == "successful" for f in frames)

    # Unbounded: runs until Ctrl-C, then exits 0.
    proc = subprocess.Popen([str(LBCTL), "watch", "--interval", "0.2", *url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(stack.url) and "Ctrl-C" in first
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.system
def test_a_reply_that_is_not_the_balancers_is_exit_4(stack: RunningStack) -> None:
    replica = stack.state().routable()[0]
    assert replica.address
    code, out, err = inproc("--url", replica.address, "rep")  # a replica: /rep is its 404 page
    assert code == BAD_REPLY == 4
    assert "HTTP 404" in err and out == ""


def test_watch_keeps_going_while_the_balancer_is_away() -> None:
    code, out, _ = inproc("--url", f"http://127.0.0.1:{free_port()}", "watch", "--count", "2",
                          "--interval", "0.1")
    assert code == OK
    assert out.count("cannot connect") == 2
