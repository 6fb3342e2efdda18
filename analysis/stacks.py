"""What the analysis needs beyond HTTP: killing a replica, and starting a stack of its own.

Killing is pluggable: ``RegistryKiller`` reads the local backend's registry and SIGKILLs the
replica's process group (its gunicorn master and workers); ``CommandKiller`` runs a command
template such as ``docker kill {hostname}`` for other backends.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Protocol, Self

import psutil

from analysis.client import Admin, AnalysisError
from lb.ha import free_port_run

ENV_TOKEN = "HASHLB_INSTANCE"  # what the local backend puts in each replica's environment


class Killer(Protocol):
    def kill(self, hostname: str, server_id: int | None) -> str:
        """Kill the replica at once (no graceful stop); returns what was done, for the log."""


def registry_entry(path: str, hostname: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:
        raise AnalysisError(f"cannot read the registry {path}: {exc}") from exc
    for entry in state.get("replicas", []):
        if entry.get("hostname") == hostname:
            return entry  # type: ignore[no-any-return]
    raise AnalysisError(f"no replica {hostname!r} in the registry {path}")


class RegistryKiller:
    """The local backend: the registry's ``handle`` is ``"<pid>/<token>"``; the replica runs in
    a session of its own, so its process group is its master and workers."""

    def __init__(self, registry_path: str) -> None:
        self.registry_path = registry_path

    def kill(self, hostname: str, server_id: int | None) -> str:
        handle = registry_entry(self.registry_path, hostname).get("handle") or ""
        pid_text, _, token = handle.partition("/")
        if not pid_text.isdigit():
            raise AnalysisError(f"replica {hostname} has no local process handle ({handle!r})")
        pid = int(pid_text)
        try:  # a reused pid must not be mistaken for the replica
            if psutil.Process(pid).environ().get(ENV_TOKEN) != token:
                raise AnalysisError(f"pid {pid} is no longer replica {hostname}")
        except psutil.NoSuchProcess:
            return f"replica {hostname} (pid {pid}) was already gone"
        except psutil.AccessDenied as exc:
            raise AnalysisError(f"cannot inspect pid {pid}: {exc}") from exc
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return f"replica {hostname} (pid {pid}) was already gone"
        return f"SIGKILL to process group {pid} (replica {hostname})"


class CommandKiller:
    """Any backend: a command template with ``{hostname}`` and ``{server_id}``."""

    def __init__(self, template: str) -> None:
        self.template = template

    def kill(self, hostname: str, server_id: int | None) -> str:
        argv = [part.format(hostname=hostname, server_id=server_id)
                for part in shlex.split(self.template)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise AnalysisError(f"{' '.join(argv)} failed: {done.stderr.strip()[:200]}")
        return " ".join(argv)


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, where no replica's bind(0) can
    take it before ``lb-run`` binds it."""
    return free_port_run(1)


class LocalStack:
    """``lb-run`` (balancer, supervisor, N local replicas) on a free loopback port, with
    ``LB_*`` settings of our choosing; a context manager that stops everything it started."""

    def __init__(self, label: str, settings: dict[str, str], folder: str | None = None) -> None:
        self.label = label
        self.folder = folder or tempfile.mkdtemp(prefix=f"lb-analyze-{label}-")
        os.makedirs(self.folder, exist_ok=True)
        self.port = free_port()
        self.deployment = f"analysis-{label}-{uuid.uuid4().hex[:6]}"
        self.registry = os.path.join(self.folder, "registry.json")
        self.env = {**os.environ, **{f"LB_{k.upper()}": str(v) for k, v in settings.items()},
                    "LB_PORT": str(self.port), "LB_DEPLOYMENT": self.deployment,
                    "LB_REGISTRY": self.registry, "LB_HOST": "127.0.0.1"}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.folder, "lb-run.log")

    def __enter__(self) -> Self:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lb"], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        admin = Admin(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AnalysisError(f"lb-run for {self.label} exited; see {self.log_path}")
            try:
                admin.rep()
                with open(self.registry, encoding="utf-8") as fh:
                    entries = json.load(fh)["replicas"]
                if entries and all(e["state"] == "ready" for e in entries):
                    return
            except (AnalysisError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise AnalysisError(f"stack {self.label} not ready in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # lb-run stops the balancer and its replicas
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
