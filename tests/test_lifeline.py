"""The lifeline (``lb.lifeline``): cut when its only write end closes, however its holder ends."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from lb import lifeline


def test_watch_calls_back_when_the_write_end_closes() -> None:
    read_end, write_end = lifeline.create()
    cut = threading.Event()
    lifeline.watch(read_end, cut.set, "a test")
    assert not cut.wait(0.3)  # held: nothing happens
    os.close(write_end)
    assert cut.wait(5)
    os.close(read_end)


def test_the_holder_killed_with_sigkill_cuts_it() -> None:
    """The write end in a child that is killed: the kernel closes it, the watcher hears."""
    read_end, write_end = lifeline.create()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              pass_fds=(write_end,))
    os.close(write_end)  # the child's copy is now the only one
    cut = threading.Event()
    lifeline.watch(read_end, cut.set, "a test")
    assert not cut.wait(0.3)
    holder.kill()
    holder.wait()
    assert cut.wait(5)
    os.close(read_end)


@pytest.mark.parametrize("value", ["", "x", "-1", "999999"])
def test_only_an_inherited_pipe_counts(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A stray variable (not a number, a closed fd, a terminal or file) is no lifeline."""
    monkeypatch.setenv(lifeline.ENV, value)
    assert lifeline.inherited() is None


def test_an_inherited_pipe_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = lifeline.create()
    monkeypatch.setenv(lifeline.ENV, str(read_end))
    assert lifeline.inherited() == read_end
    os.close(read_end)
    os.close(write_end)
