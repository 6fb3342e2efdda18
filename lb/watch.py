"""The registry file's changes as they happen, from inotify on its folder (Linux).

A watched ``RegistryView`` does not look at the file on every request (a ``stat`` costs about
ten microseconds on a cold cache, more than finding the key's replica): it trusts its last look
until the watch reports a change. The event-driven worker reads the events on its
loop (``RegistryWatch.attach``): an event for the file's name (replaced, written, removed,
its mode changed) or a queue overflow makes the view look on its next call; a watch that ends
(the folder removed or moved, its file system unmounted) puts the view back to a look per call.

Nothing is lost to timing: the file is replaced before a writer returns (an ``/add``, an
``/rm``), so its event is queued before any request that writer's reply could have caused,
and the loop runs its callbacks in the order the events came. Where inotify cannot be had
(not Linux, no watches left) nothing is watched and the view looks at the file every time.
"""

from __future__ import annotations

import asyncio
import logging
import os

from lb.registry import RegistryView

log = logging.getLogger(__name__)

try:
    from inotify_simple import INotify, flags
except (ImportError, OSError):  # pragma: no cover - not Linux
    INotify = None
else:
    # What can change the file: replaced into place (or moved away), created, written,
    # removed, its mode or owner changed; and the folder's own end.
    MASK = (flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE | flags.CLOSE_WRITE | flags.MODIFY
            | flags.DELETE | flags.ATTRIB | flags.DELETE_SELF | flags.MOVE_SELF)
    GONE = flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT


class RegistryWatch:
    """inotify on the folder of ``view``'s file, read on an event loop."""

    def __init__(self, view: RegistryView) -> None:
        if INotify is None:
            raise OSError("inotify is not available here")
        path = os.path.abspath(view.registry.path)
        self.view = view
        self.name = os.path.basename(path)
        self.inotify = INotify(nonblocking=True)
        try:
            self.inotify.add_watch(os.path.dirname(path), MASK)
        except OSError:
            self.inotify.close()
            raise
        self.loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def attach(cls, view: RegistryView, loop: asyncio.AbstractEventLoop) -> RegistryWatch | None:
        """Watch ``view``'s file from ``loop``; None (the view looking every time, as before)
        when it cannot be watched."""
        try:
            watch = cls(view)
        except OSError as exc:
            log.warning("registry %s is not watched (%s): routing looks at the file on every "
                        "request", view.registry.path, exc)
            return None
        loop.add_reader(watch.inotify.fileno(), watch.read)
        watch.loop = loop
        view.watch(True)  # the watch exists: the view may trust its next look
        return watch

    def read(self) -> None:
        """The events that came (the loop calls this when there are some)."""
        try:
            events = self.inotify.read(timeout=0)
        except OSError as exc:
            self._lost(f"reading its events failed: {exc}")
            return
        for event in events:
            if event.mask & GONE:
                self._lost("its folder is gone")
                return
            if event.mask & flags.Q_OVERFLOW or event.name == self.name:
                self.view.changed()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.inotify.fileno())
            self.loop = None
        if not self.inotify.closed:
            self.inotify.close()

    def _lost(self, why: str) -> None:
        log.warning("registry %s is no longer watched (%s): routing looks at the file on "
                    "every request", self.view.registry.path, why)
        self.view.watch(False)
        self.close()
