"""The PNG charts (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes


def log_axis(ax: Axes) -> None:
    """A log y axis labelled with plain numbers (1, 1.5, 2, 5) rather than powers of ten."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([1, 1.1, 1.25, 1.5, 2, 3, 5, 8])


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Axes, summary: dict[str, Any], title: str) -> None:
    ids = list(summary["per_server"])
    counts = [summary["per_server"][i] for i in ids]
    total = sum(counts) or 1
    bars = ax.bar([f"Server {i}" for i in ids], counts, color="tab:blue")
    for bar, c in zip(bars, counts):
        ax.annotate(f"{c}\n{100 * c / total:.1f}%", (bar.get_x() + bar.get_width() / 2, c),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(total / max(1, summary["replicas"]), color="grey", ls="--", lw=0.8,
               label="even share")
    ax.set_ylabel("requests")
    ax.set_ylim(0, max(counts + [1]) * 1.18)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")


def a1_chart(summary: dict[str, Any], path: str, label: str = "") -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _bars(ax, summary, f"A-1: {summary['ok']:,} requests over N={summary['replicas']}"
                       + (f" ({label})" if label else ""))
    return _save(fig, path)


def _spread(ax: Axes, rows: list[dict[str, Any]], label: str = "", color: str | None = None,
            bands: bool = True) -> None:
    ns = [r["replicas"] for r in rows]
    means = [r["mean"] for r in rows]
    line = ax.plot(ns, means, marker="o", label=f"mean {label}".strip(), color=color)[0]
    c = line.get_color()
    if bands:
        ax.fill_between(ns, [r["min"] for r in rows], [r["max"] for r in rows], color=c,
                        alpha=0.15, label=f"min..max {label}".strip())
    lower = [min(r["std"], r["mean"]) for r in rows]  # a load is never below 0
    ax.errorbar(ns, means, yerr=[lower, [r["std"] for r in rows]], fmt="none", ecolor=c,
                capsize=4,
                label=f"+-1 std {label}".strip())
    for r in rows:
        loads = list(r["per_server"].values()) + [0] * (r["replicas"] - len(r["per_server"]))
        ax.scatter([r["replicas"]] * len(loads), loads, s=10, color=c, alpha=0.6)


def a2_chart(rows: list[dict[str, Any]], path: str, label: str = "") -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _spread(ax, rows)
    ax.set_xlabel("replicas N")
    ax.set_ylabel("requests per replica")
    ax.set_xticks([r["replicas"] for r in rows])
    ax.set_title(f"A-2: {rows[0]['requests']:,} requests per N, load per replica"
                 + (f" ({label})" if label else ""), fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def a3_chart(timeline: dict[str, Any], path: str) -> str:
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.4]})
    t = timeline["t"]
    ax.plot(t, timeline["ok_rps"], label="successful requests/s", color="tab:green")
    ax.plot(t, timeline["victim_rps"], label=f"served by server id {timeline['victim_id']}",
            color="tab:purple")
    ax.plot(t, timeline["error_rps"], label="errors/s", color="tab:red")
    ax2.plot(t, [1000 * x for x in timeline["p99_ms"]], color="tab:orange",
             label="p99 latency (ms)")
    for axis in (ax, ax2):
        for key, style, name in (("kill", "k-", "replica killed"),
                                 ("detected", "b--", "replaced in /rep"),
                                 ("serving", "g--", "replacement serves")):
            if timeline.get(key) is not None:
                axis.axvline(timeline[key], color=style[0], ls=style[1:], lw=1,
                             label=name if axis is ax else None)
    ax.set_ylabel("requests per second")
    ax.set_title(f"A-3: replica {timeline['victim']} killed under load; recovery "
                 + (f"{timeline['recovery_s']:.2f} s" if timeline.get("recovery_s") is not None
                    else "not seen"), fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    ax2.set_ylabel("p99 ms")
    ax2.set_xlabel("seconds since the start of the run")
    ax2.legend(fontsize=7)
    return _save(fig, path)


def a4_chart(variants: dict[str, dict[str, Any]], path: str) -> str:
    """Side by side: A-1's split over N=3 per variant, and A-2's max/mean per N."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(variants)
    width = 0.8 / max(1, max(len(v["a1"]["per_server"]) for v in variants.values()))
    for k, name in enumerate(names):
        per = variants[name]["a1"]["per_server"]
        total = sum(per.values()) or 1
        for j, sid in enumerate(sorted(per, key=int)):
            share = 100 * per[sid] / total
            x = k + (j - (len(per) - 1) / 2) * width
            ax1.bar(x, share, width * 0.95, color=f"C{j}",
                    label=f"Server {sid}" if k == 0 else None)
            ax1.annotate(f"{share:.0f}", (x, share), ha="center", va="bottom", fontsize=7)
    ax1.axhline(100 / 3, color="grey", ls="--", lw=0.8, label="even share")
    ax1.set_xticks(range(len(names)))
    ax1.set_xticklabels(names)
    ax1.set_ylabel("% of requests (A-1, N=3)")
    ax1.set_title("A-1 per variant: share of each replica", fontsize=10)
    ax1.legend(fontsize=7)
    for name in names:
        rows = variants[name]["a2"]
        ax2.plot([r["replicas"] for r in rows], [r["max_over_mean"] for r in rows], marker="o",
                 label=name)
    ax2.axhline(1.0, color="grey", lw=0.8)
    log_axis(ax2)
    ax2.set_xlabel("replicas N")
    ax2.set_ylabel("busiest replica / mean (log scale)")
    ax2.set_title("A-2 per variant: max/mean load for N = 2..6", fontsize=10)
    ax2.legend(fontsize=7)
    return _save(fig, path)
