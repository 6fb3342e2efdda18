"""Summarise py-spy's raw (collapsed-stack) output: where the balancer's CPU time goes.

``python bench/profile_summary.py profile.raw [--top 25]`` prints the functions with the most
samples on their own (self) and in total (inclusive), as a share of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME_RE = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``module.py:func``."""
    m = FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = path.split("/site-packages/")[-1].split("/")
    return f"{'/'.join(parts[-2:])}:{m.group('func')}"


def summarize(lines: list[str], top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
        groups[_group(stack)] += n
    out = [f"samples: {total}", "", "where the time goes (inclusive, by layer):"]
    out += [f"  {100 * c / total:5.1f}%  {g}" for g, c in groups.most_common()]
    out += ["", f"top {top} by own time:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out += ["", f"top {top} inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(out)


LAYERS = [  # first match wins, checked from the innermost frame outwards
    ("lb/routing.py (candidates", "router: choosing a replica (hash lookup, registry check)"),
    ("urllib3/", "forwarding: urllib3 (HTTP to the replica)"),
    ("requests/", "forwarding: requests (session, prepare, adapters)"),
    ("http/client.py", "forwarding: http.client"),
    ("socket.py", "socket I/O"),
    ("werkzeug/", "Flask/werkzeug: request and response objects"),
    ("flask/", "Flask: dispatch"),
    ("gunicorn/", "gunicorn: HTTP parsing, worker loop"),
    ("lb/", "balancer code (other)"),
]


def _group(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for needle, name in LAYERS:
            if needle in frame:
                return name
    return "other (interpreter, stdlib)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.raw, encoding="utf-8") as fh:
        print(summarize(fh.readlines(), args.top))


if __name__ == "__main__":
    main()
