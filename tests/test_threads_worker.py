"""The threads worker's quick stop (lb.threads.worker), in process: its signal handler must end the
worker wherever the signal lands in the main thread. End to end, the stop tests in
tests/test_stack.py run it with real gunicorn."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from lb.threads.worker import EnvelopeThreadWorker


@pytest.fixture
def worker() -> Iterator[EnvelopeThreadWorker]:
    """A threads worker as gunicorn builds it, with its thread pool (init_process would also
    serve, which these tests do not need)."""
    cfg = Config()
    made = EnvelopeThreadWorker(1, os.getppid(), [], None, 30, cfg, Logger(cfg))
    made.tpool = made.get_thread_pool()
    yield made
    made.tpool.shutdown(wait=True)
    made.tmp.close()


def quit_in_thread(worker: EnvelopeThreadWorker, lock: threading.Lock) -> BaseException | None:
    """``handle_quit`` called, as a signal handler is, by a thread that holds ``lock``: what it
    raised; None if it returned, or was still blocked after 5 s (then the lock is let go, so
    the thread ends)."""
    outcome: list[BaseException | None] = []

    def interrupted() -> None:
        with lock:
            try:
                worker.handle_quit(signal.SIGINT, None)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - SystemExit is what a quit raises
                outcome.append(exc)

    thread = threading.Thread(target=interrupted, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        lock.release()  # a Lock may be released by any thread: unblock it
        thread.join(5)
        return None
    return outcome[0]


def test_quit_landing_while_the_pool_takes_work_exits(worker: EnvelopeThreadWorker) -> None:
    """Ctrl-C while the main thread is in the pool's submit (it holds the pool's lock) or in a
    first quit handler (the arbiter's SIGQUIT follows the terminal's SIGINT): the worker exits
    at once. gthread's own handler shut the pool down, taking that lock again, and the worker
    hung until gunicorn's SIGKILL 15 s later."""
    raised = quit_in_thread(worker, worker.tpool._shutdown_lock)
    assert isinstance(raised, SystemExit), "handle_quit did not exit (deadlocked on the lock?)"
    assert raised.code == 0
    assert worker.quitting and not worker.alive


def test_a_second_quit_during_the_first_leaves_the_exit_to_it(
        worker: EnvelopeThreadWorker) -> None:
    """The second signal's handler returns; the first one, interrupted, goes on and exits."""
    seen: list[object] = []

    def second_signal(_worker: object) -> None:  # lands inside the first handler
        seen.append(worker.handle_quit(signal.SIGQUIT, None))

    worker.cfg.set("worker_int", second_signal)
    with pytest.raises(SystemExit):
        worker.handle_quit(signal.SIGINT, None)
    assert seen == [None]
