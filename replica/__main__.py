"""``lb-replica``: serve one replica with gunicorn (``SERVER_ID`` in the environment)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    bind = os.environ.get("REPLICA_BIND", "0.0.0.0:5000")
    threads = os.environ.get("REPLICA_THREADS", "4")
    os.execv(sys.executable, [
        sys.executable, "-m", "gunicorn", "-c", "python:replica.gunicorn_conf",
        "--bind", bind, "--workers", "1",
        "--worker-class", "gthread", "--threads", threads, "--graceful-timeout", "5",
        "--access-logfile", "-", *sys.argv[1:], "replica.app:create_app()",
    ])


if __name__ == "__main__":
    main()
