"""Summaries of load runs, tables for the terminal and for Markdown, and files in the results
folder."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from analysis.client import Result


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarize(results: list[Result], n: int | None = None) -> dict[str, Any]:
    """Counts per server id, errors, rate and latency of one load run."""
    ok = [r for r in results if r.ok]
    counts: Counter[int] = Counter(r.server_id for r in ok if r.server_id is not None)
    names: dict[int, set[str]] = {}
    for r in ok:
        if r.server_id is not None and r.served_by:
            names.setdefault(r.server_id, set()).add(r.served_by)
    span = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    n = n or len(counts)
    loads = [counts.get(i, 0) for i in sorted(counts)] + [0] * max(0, n - len(counts))
    mean = len(ok) / n if n else float("nan")
    latencies = [r.latency for r in ok]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error or str(r.status) for r in results if not r.ok)),
        "seconds": round(span, 3),
        "rps": round(len(results) / span, 1) if span else None,
        "latency_ms_p50": round(1000 * percentile(latencies, 50), 2),
        "latency_ms_p99": round(1000 * percentile(latencies, 99), 2),
        "replicas": n,
        "per_server": {str(i): counts[i] for i in sorted(counts)},
        "hostnames": {str(i): sorted(v) for i, v in sorted(names.items())},
        "mean": round(mean, 1),
        "min": min(loads) if loads else 0,
        "max": max(loads) if loads else 0,
        "std": round(statistics.pstdev(loads), 1) if loads else 0.0,
        "max_over_mean": round(max(loads) / mean, 3) if loads and mean else None,
    }


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths))
            for r in body]
    return "\n".join(line.rstrip() for line in out)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("%", "").replace("-", "", 1).isdigit()


def write_json(folder: str, name: str, data: Any) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
        fh.write("\n")
    return path


def write_csv(folder: str, name: str, headers: Sequence[str],
              rows: Iterable[Sequence[Any]]) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(headers)
        writer.writerows(rows)
    return path


def write_text(folder: str, name: str, text: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    return path
