"""The balancer's gunicorn worker: gthread, with the contract's JSON envelope on the errors that
gunicorn answers itself.

A request gunicorn cannot parse, or one over its limits (request line, header count or size, a
bad chunk), never reaches Flask: gunicorn's ``Worker.handle_error`` picks the status and logs
it, then writes an HTML page through ``gunicorn.util.write_error``. That function is the one
seam for the page's shape (``handle_error`` is its only caller), so this worker swaps it for one
that writes the same status line as JSON; status codes, logging and the access log stay
gunicorn's.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from lb.errors import envelope


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    body = json.dumps(envelope(f"{reason}: {mesg}" if mesg else reason)).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class EnvelopeThreadWorker(ThreadWorker):
    """``gthread`` whose own error replies are ``{"message": "<Error> ...", "status": "failure"}``."""

    def init_process(self) -> None:
        # In the worker only (after the fork): the arbiter's own copy of gunicorn stays as is.
        util.write_error = write_json_error
        super().init_process()
