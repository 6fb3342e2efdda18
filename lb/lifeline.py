"""The lifeline: nothing ``lb-run`` starts outlives it, even when it is killed with SIGKILL.

``lb-run`` makes a pipe and keeps its only write end. The read end is inherited down the whole
process tree (supervisor, balancer master and workers, every local replica they start), its
number in ``HASHLB_LIFELINE_FD``. Nobody ever writes to it: a read blocks until the write end
closes, which the kernel does when ``lb-run`` exits however it exits. Each process watching it
then stops itself. A parent-death signal would not do: it fires when the *parent* dies, and a
replica's parent is a balancer worker or the supervisor, which come and go while the stack runs.

Processes that were not started by ``lb-run`` (the compose services, a supervisor run by hand)
find no lifeline and run until they are stopped.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ENV = "HASHLB_LIFELINE_FD"


def create() -> tuple[int, int]:
    """A new lifeline: (read end, write end). Neither is inherited unless passed on."""
    return os.pipe()


def child_env(read_end: int) -> dict[str, str]:
    return {ENV: str(read_end)}


def inherited() -> int | None:
    """The lifeline this process was given, or None: the variable must name an open pipe."""
    raw = os.environ.get(ENV, "")
    if not raw.isdigit():
        return None
    fd = int(raw)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
    except OSError:
        return None
    return fd


def watch(fd: int, on_eof: Callable[[], None], what: str) -> threading.Thread:
    """Call ``on_eof`` (once, from a daemon thread) when the lifeline's write end is gone."""

    def wait() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError as exc:  # closed under us: treat as cut, not as a reason to live on
                log.warning("lifeline unreadable (%s)", exc)
                break
        log.warning("lb-run is gone (lifeline cut): stopping %s", what)
        on_eof()

    thread = threading.Thread(target=wait, name="lifeline", daemon=True)
    thread.start()
    return thread
