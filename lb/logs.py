"""Log set-up shared by every process of the system: one line per event.

``LB_LOG_FORMAT=text`` (the default) writes lines a person reads; ``json`` writes one JSON object
per line for a log shipper. Both carry the same fields: the ``extra`` a call passes (``request_id``,
``replica``, ``status``, ...) become keys of the JSON object, and the text line already says them
in its message. gunicorn's own loggers are configured the same way (``logging_config`` is handed
to it as ``logconfig_dict``), so a balancer's output is all of one format.
"""

from __future__ import annotations

import json
import logging
import logging.config
import random
import re
import time
from typing import Any

from lb.settings import Settings

TEXT_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
# A client's X-Request-ID is kept (and forwarded) only when it looks like an id.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
REQUEST_ID_KEY = "lb.request_id"

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, pid, message, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _utc(created: float) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-11-24T00:20:21.123Z``."""
    millis = int(created % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def logging_config(settings: Settings) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``settings`` (also gunicorn's ``logconfig_dict``)."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"lb": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "lb",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # gunicorn adds handlers of its own to these; ours replace them. Its access log is
            # off: lb.access writes the line per request, with the request id and the replica.
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }


def configure_logging(settings: Settings) -> None:
    logging.config.dictConfig(logging_config(settings))


def new_request_id(given: str | None) -> str:
    """The client's ``given`` X-Request-ID when it is well formed, else a new one."""
    # 128 random bits as 32 hex digits, the shape of a uuid4's hex without its cost: an id
    # needs to be unique, not secret, so no system call (random reseeds in a forked worker).
    if given and REQUEST_ID_RE.match(given):
        return given
    return f"{random.getrandbits(128):032x}"


def request_id(environ: dict[str, Any], given: str | None) -> str:
    """The id of the request behind ``environ`` (``new_request_id``), the same value however
    often it is asked for."""
    rid = environ.get(REQUEST_ID_KEY)
    if rid is None:
        rid = environ[REQUEST_ID_KEY] = new_request_id(given)
    return str(rid)


access_log = logging.getLogger("lb.access")


def access_level(endpoint: str) -> int:
    """The level of a request's access line: the balancer's own endpoints are polled (status
    page, scrapes), so they are quiet unless debugging."""
    return logging.DEBUG if endpoint.startswith("ops.") else logging.INFO


def access_logged(endpoint: str) -> bool:
    """Whether a request to ``endpoint`` gets an access line (a caller can skip building it)."""
    return access_log.isEnabledFor(access_level(endpoint))


def log_access(method: str, path: str, status: int, replica: str | None, ms: float | None,
               rid: str, endpoint: str, client: str | None) -> None:
    """The one line per request, from whichever data path answered it."""
    level = access_level(endpoint)
    if not access_log.isEnabledFor(level):
        return
    access_log.log(
        level, "%s %s %d %s %s rid=%s", method, path, status, replica or "-",
        "-" if ms is None else f"{ms:.1f}ms", rid,
        extra={"request_id": rid, "method": method, "path": path, "status": status,
               "replica": replica, "endpoint": endpoint,
               "duration_ms": None if ms is None else round(ms, 3), "client": client},
    )
