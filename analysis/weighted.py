"""``lb-analyze balance --weights 1,2,3``: what every strategy makes of given weights.

Replica i (server id i) gets the i-th weight; each strategy's lookup is built with those weights
the way the balancer builds it (``Variant.build``: ``build_lookup`` for ``ring160`` and
``maglev``, w x K virtual servers placed by ``HashRing.add`` for the spec map), and each
replica's share of all 900,000 6-digit request ids is set beside its target w / W. A strategy
without room for the weights (``lb.strategies.room``; the spec map's slots running out) says so.
Bounded loads route by load, so their share is over the request sample, each replica capped
at c x its part w / W of the requests so far (``balance.assign``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass

from analysis.balance import Variant, assign, request_ids, variants
from analysis.client import AnalysisError
from lb.hashring import RingFull
from lb.strategies import MAX_WEIGHT, REQUEST_IDS, room, shares_by_weight, slot_weights

N_MIN, N_MAX = 2, 10  # the sweep's replicas when no weights fix N


def parse_weights(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]: one integer 1..MAX_WEIGHT per replica, else ``AnalysisError``."""
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"[+-]?[0-9]+", item) for item in items):
        raise AnalysisError(f"--weights: one integer per replica, separated by commas, like "
                            f"1,2,3; not {text!r}")
    weights = [int(item) for item in items]
    for w in weights:
        if not 1 <= w <= MAX_WEIGHT:
            raise AnalysisError(f"--weights: a weight is an integer from 1 to {MAX_WEIGHT}, "
                                f"not {w}")
    return weights


def settle(args: argparse.Namespace) -> None:
    """``--weights`` parsed and N taken from it (``--n-min``/``--n-max``, when given, must agree),
    else the sweep's default N range; ``AnalysisError`` for a bad combination."""
    if args.weights is not None:
        if args.hash:
            raise AnalysisError("--weights: goes without --hash (it weighs every strategy)")
        weights = parse_weights(args.weights)
        for flag, n in (("--n-min", args.n_min), ("--n-max", args.n_max)):
            if n is not None and n != len(weights):
                raise AnalysisError(f"--weights: {len(weights)} replicas, but {flag} says {n}")
        args.weights = weights
        args.n_min = args.n_max = len(weights)
    args.n_min = N_MIN if args.n_min is None else args.n_min
    args.n_max = N_MAX if args.n_max is None else args.n_max


@dataclass
class Shares:
    """One strategy at the given weights."""

    name: str
    description: str
    weights: dict[int, int]  # server id -> weight
    share: dict[int, float] | None  # server id -> share it gets; None: no room
    over: str  # what the share is of
    no_room: str | None = None

    @property
    def target(self) -> dict[int, float]:
        total = sum(self.weights.values())
        return {i: w / total for i, w in self.weights.items()}

    def error(self, server_id: int) -> float:
        """Relative error of the share: (share - target) / target."""
        assert self.share is not None
        return self.share[server_id] / self.target[server_id] - 1

    @property
    def worst_error(self) -> float | None:
        if self.share is None:
            return None
        return max(abs(self.error(i)) for i in self.weights)


def measure(variant: Variant, weights: list[int], keys: list[int]) -> Shares:
    ids = list(range(1, len(weights) + 1))
    by_id = dict(zip(ids, weights))
    bounded = variant.bounded
    over = (f"{len(keys):,}-id sample, each replica capped at c x w / W of it" if bounded
            else f"all {len(REQUEST_IDS):,} 6-digit ids")
    result = Shares(variant.name, variant.description, by_id, None, over)
    result.no_room = room(variant.strategy, weights)
    if result.no_room is not None:
        return result
    try:
        lookup = variant.build(ids, by_id)
    except RingFull as exc:
        result.no_room = (f"w x K virtual servers for weights adding up to {sum(weights)} "
                          f"do not fit: {exc}")
        return result
    if bounded:
        placed = assign(lookup, ids, keys, bounded, by_id)
        result.share = {i: placed.count(i) / len(keys) for i in ids}
    else:
        result.share = shares_by_weight(lookup, slot_weights(lookup, REQUEST_IDS))
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def render(results: list[Shares], weights: list[int], count: int, seed: int) -> str:
    total = sum(weights)
    lines = [
        "# Shares by weight",
        "",
        (f"Weights {', '.join(map(str, weights))} on server ids 1..{len(weights)} (W = {total}): "
         "a replica of weight w should get w / W of the keys. Share: of all 6-digit request "
         f"ids, every one counted (bounded loads: of {count:,} random ids, seed {seed}, as "
         "they route by load); error: (share - target) / target."),
        "",
        "## Summary",
        "",
        "| strategy | worst relative error | shares (%), ids 1.. |",
        "|---|---|---|",
    ]
    target = " / ".join(f"{100 * w / total:.2f}" for w in weights)
    lines.append(f"| target w / W | - | {target} |")
    for r in results:
        if r.share is None:
            lines.append(f"| {r.name} | no room: {r.no_room} | - |")
            continue
        shares = " / ".join(f"{100 * r.share[i]:.2f}" for i in r.weights)
        lines.append(f"| {r.name} | {100 * (r.worst_error or 0):.2f} % | {shares} |")
    for r in results:
        lines += ["", f"## {r.name}", "", f"{r.description}; share of {r.over}.", ""]
        if r.share is None:
            lines.append(f"No room for these weights: {r.no_room}.")
            continue
        lines += ["| server id | weight | target w / W | share | relative error |",
                  "|---|---|---|---|---|"]
        lines += [f"| {i} | {w} | {_pct(r.target[i])} | {_pct(r.share[i])} | "
                  f"{100 * r.error(i):+.2f} % |" for i, w in r.weights.items()]
    return "\n".join(lines) + "\n"


def chart(results: list[Shares], weights: list[int], path: str) -> None:
    """Grouped bars: each strategy's share per replica, the target as a black line over each
    replica's group."""
    from analysis.charts import plt

    shown = [r for r in results if r.share is not None]
    n = len(weights)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * n + 4), 5))
    width = 0.8 / max(1, len(shown))
    for k, r in enumerate(shown):
        assert r.share is not None
        xs = [i - 0.4 + width * (k + 0.5) for i in range(1, n + 1)]
        ax.bar(xs, [100 * r.share[i] for i in range(1, n + 1)], width, label=r.name)
    total = sum(weights)
    ax.hlines([100 * w / total for w in weights], [i - 0.45 for i in range(1, n + 1)],
              [i + 0.45 for i in range(1, n + 1)], colors="black", lw=2, label="target w / W")
    ax.set_xticks(range(1, n + 1), [f"id {i}\nw={w}" for i, w in enumerate(weights, 1)])
    ax.set_ylabel("% of request ids")
    skipped = [r.name for r in results if r.share is None]
    ax.set_title(f"Shares at weights {','.join(map(str, weights))}"
                 + (f" (no room: {', '.join(skipped)})" if skipped else ""), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(weights: list[int], out: str, count: int = 10_000, seed: int = 1,
        only: list[str] | None = None, plot: bool = True, echo: bool = True) -> list[Shares]:
    """Measure, print, write ``balance-weights.md``, ``.json`` and ``.png``."""
    keys = request_ids(count, seed)
    results = []
    for v in variants():
        if only and v.name not in only:
            continue
        if echo:
            print(f"measuring {v.name} ...", file=sys.stderr, flush=True)
        results.append(measure(v, weights, keys))
    report = render(results, weights, count, seed)
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "balance-weights")
    with open(base + ".md", "w", encoding="utf-8") as fh:
        fh.write(report)
    with open(base + ".json", "w", encoding="utf-8") as fh:
        json.dump({"weights": weights, "requests": count, "seed": seed,
                   "strategies": {r.name: {"description": r.description, "over": r.over,
                                           "no_room": r.no_room, "target": r.target,
                                           "share": r.share, "worst_error": r.worst_error}
                                  for r in results}}, fh, indent=1)
    if plot:
        chart(results, weights, base + ".png")
    if echo:
        print(report)
        print(f"written: {base}.md (+ .json, .png)")
    return results
