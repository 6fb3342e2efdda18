"""Replica hostnames: the rule a name must follow, and new names for replicas nobody named.

``/add`` checks the names it is given against the rule and draws the others; the supervisor
draws a new name for a dead replica's replacement.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

# Docker's container-name rule (two characters at least: Docker refuses "a"); 63 keeps every
# name usable as a DNS label (network alias).
HOSTNAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+\Z")
MAX_HOSTNAME = 63


def valid_hostname(name: str) -> bool:
    return len(name) <= MAX_HOSTNAME and HOSTNAME_RE.match(name) is not None


def random_hostname(taken: Iterable[str]) -> str:
    """``replica-`` and six hex digits, none of ``taken``."""
    taken = set(taken)
    while True:
        name = "replica-" + secrets.token_hex(3)
        if name not in taken:
            return name
