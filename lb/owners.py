"""Who holds a registry entry: owner tags that another process can check.

An ``/add`` or ``/rm`` in flight holds its registry entries until a deadline. If its process
dies, the supervisor should not wait for the deadline; but a pid means something only in the
pid namespace of one boot of one kernel, and may be reused. An owner tag records where the
process runs (boot id and pid namespace, hashed), its pid and its start time, so another process
can tell "dead" from "alive" exactly when it shares that namespace, and says "cannot tell"
otherwise (then the deadline decides). ``lb-run`` tags its processes the same way.
"""

from __future__ import annotations

import hashlib
import os
import uuid


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _process_space() -> str:
    """This boot and pid namespace, hashed; empty where it cannot be known (not Linux)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    if not boot:
        return ""
    return hashlib.blake2s(f"{boot} {namespace}".encode(), digest_size=6).hexdigest()


_SPACE: str | None = None


def process_space() -> str:
    global _SPACE
    if _SPACE is None:
        _SPACE = _process_space()
    return _SPACE


def _start_ticks(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of ``pid``; None if no process has
    that pid. Raises OSError if that cannot be known (``/proc`` hides it, or there is none)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parens
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError) as exc:
        raise OSError(f"unexpected /proc/{pid}/stat") from exc


def owner_tag(kind: str) -> str:
    """``<kind>:<pid>:<nonce>:<process space>:<start ticks>``, e.g. for ``kind`` "add"."""
    pid = os.getpid()
    try:
        started = _start_ticks(pid)
    except OSError:
        started = None
    space, ticks = (process_space(), str(started[0])) if started else ("", "")
    return f"{kind}:{pid}:{uuid.uuid4().hex[:8]}:{space}:{ticks}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process that made ``owner`` (an ``owner_tag``) still runs; None when this
    process cannot tell (another host or pid namespace, or a tag without the process's
    identity): then only the hold's deadline counts."""
    parts = owner.split(":")
    if len(parts) != 5 or not parts[3] or parts[3] != process_space():
        return None
    _kind, pid, _nonce, _space, ticks = parts
    if not pid.isdigit() or not ticks.isdigit():
        return None
    try:
        found = _start_ticks(int(pid))
    except OSError:
        return None
    return found is not None and found[0] == int(ticks) and found[1] not in "ZX"
