"""The balance report: load spread and key movement of every lookup strategy, offline.

For N = 2..10 replicas (server ids 1..N) and a fixed sample of random 6-digit request ids:

- **max/mean**: the busiest replica's request count over the mean count;
- **share max/mean**: the same over the key space itself (slots or table entries), where the
  strategy has one: what the sample measures up to its own noise;
- **moved on add**: the fraction of the sample whose replica changes when replica N joins
  ids 1..N-1; **moved on remove**: the same when one of ids 1..N leaves (mean and worst over
  which one). Both are next to the ideal 1/N (only the joining or leaving replica's fair share).

Rings keep their placement like the registry does (a joining replica probes around the others,
a leaving one frees only its slots); ``ring160`` and ``maglev`` are functions of the set of ids,
as in the router. Bounded loads are simulated in the model of Mirrokni et al.: requests stay, and
a request passes over a replica that already holds ceil(c x mean) of them.

``lb-analyze balance`` prints the tables and writes
``balance.md``, ``balance.json`` and ``balance.png`` into the results folder; with ``--weights
1,2,3``, each strategy's share per replica at those weights instead (``analysis.weighted``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from analysis.client import AnalysisError
from lb.hashring import HashRing, resolve_preset
from lb.strategies import REQUEST_IDS, Lookup, build_lookup, shares_by_weight, slot_weights

Ids = Sequence[int]
Weights = Mapping[int, int]  # server id -> weight (1 for an id it does not name)


class Build(Protocol):
    def __call__(self, ids: Ids, weights: Weights | None = None) -> Lookup: ...


@dataclass(frozen=True)
class Variant:
    """One strategy as the balance report drives it.

    Shares and slot ownership come from the lookups themselves (``shares()``, ``owners()`` of
    the ``Lookup`` interface), as on the status page and in the metrics.
    """

    name: str
    description: str
    build: Build  # the lookup over ids, with weights as the balancer would use them
    grow: Callable[[Lookup, Ids, int], Lookup]  # (lookup over ids, ids, new id) -> lookup
    shrink: Callable[[Lookup, Ids, int], Lookup]  # (lookup over ids, ids, leaving id) -> lookup
    bounded: float = 0.0  # bounded loads route by load too: no key-space figures then
    strategy: str = "ring"  # its LB_STRATEGY: whose room (lb.strategies.room) weights need


def _ring_variant(name: str, preset: str, slots: int = 512, virtual: int = 9,
                  bounded: float = 0.0, note: str = "", probing: str = "linear") -> Variant:
    params = {"slots": slots, "virtual_per_server": virtual, "preset": preset,
              "probing": probing}

    def build(ids: Ids, weights: Weights | None = None) -> Lookup:
        ring = HashRing(**params)  # type: ignore[arg-type]
        for i in ids:
            # w x K virtual servers, as the admin places a replica of weight w on LB_STRATEGY=ring
            # (RingFull when the slots run out)
            ring.add(i, count=ring.virtual_per_server * (weights or {}).get(i, 1))
        return ring

    def copy(lookup: Lookup) -> HashRing:
        assert isinstance(lookup, HashRing)
        return HashRing.from_placement(lookup.placement(), **params)

    def grow(lookup: Lookup, ids: Ids, new: int) -> Lookup:
        ring = copy(lookup)
        ring.add(new)
        return ring

    def shrink(lookup: Lookup, ids: Ids, leaving: int) -> Lookup:
        ring = copy(lookup)
        ring.remove(leaving)
        return ring

    desc = (f"ring, hash {preset}, M={slots}, K={virtual}"
            + (f", {probing} probing" if probing != "linear" else "")
            + (f"; {note}" if note else ""))
    return Variant(name, desc, build, grow, shrink, bounded)


def _set_variant(name: str, description: str, strategy: str, bounded: float = 0.0) -> Variant:
    """A strategy whose lookup is a function of the set of ids (and weights), built by
    ``build_lookup`` as the router builds it."""
    def make(ids: Ids, weights: Weights | None = None) -> Lookup:
        return build_lookup(strategy, _no_spec_map, ids, weights)

    return Variant(
        name, description, make,
        grow=lambda lk, ids, new: make([*ids, new]),
        shrink=lambda lk, ids, leaving: make([i for i in ids if i != leaving]),
        bounded=bounded, strategy=strategy,
    )


def _no_spec_map() -> HashRing:
    raise AssertionError("only LB_STRATEGY=ring reads the spec map")


def variants() -> list[Variant]:
    return [
        _ring_variant("ring seed", "seed", note="the specification's default"),
        _ring_variant("ring cs60002", "cs60002", note="the course handout's formulas"),
        _ring_variant("ring xxhash", "xxhash", note="well-mixed hashes, spec's M and K"),
        _set_variant("ring160", "ring, xxhash, M=65536, K=160 (LB_STRATEGY=ring160)",
                     "ring160"),
        _set_variant("maglev", "Maglev, table 65537 (LB_STRATEGY=maglev)", "maglev"),
        _ring_variant("ring seed + bounded 1.25", "seed", bounded=1.25,
                      note="bounded loads c=1.25 (LB_BOUNDED_LOAD=1.25)"),
        _set_variant("maglev + bounded 1.05",
                     "Maglev with bounded loads c=1.05 (LB_STRATEGY=maglev LB_BOUNDED_LOAD=1.05)",
                     "maglev", bounded=1.05),
    ]


def request_ids(count: int, seed: int) -> list[int]:
    """``count`` random 6-digit request ids, as the balancer draws them."""
    rng = random.Random(seed)
    return [rng.randint(100000, 999999) for _ in range(count)]


def assign(lookup: Lookup, ids: Ids, keys: Iterable[int], bounded: float = 0.0,
           weights: Weights | None = None) -> list[int]:
    """The replica of each key, in order; with ``bounded`` = c, no replica takes more than
    ceil(c x (requests so far) / N), or with ``weights`` ceil(c x (requests so far) x w / W)
    (its part of them, as ``lb.bounded`` caps a weighted replica): a request walks on past
    full replicas."""
    if not bounded:
        return [lookup.lookup(k) or 0 for k in keys]
    load = dict.fromkeys(ids, 0)
    out: list[int] = []
    n = len(ids)
    total = sum(weights.get(i, 1) for i in ids) if weights else n
    for m, key in enumerate(keys):
        cap = math.ceil(bounded * (m + 1) / n)
        chosen = None
        for server_id in lookup.walk(key):
            chosen = chosen or server_id  # everyone full cannot happen, but never drop a key
            if weights:
                cap = math.ceil(bounded * (m + 1) * weights.get(server_id, 1) / total)
            if load[server_id] < cap:
                chosen = server_id
                break
        assert chosen is not None
        load[chosen] += 1
        out.append(chosen)
    return out


def moved(before: Sequence[int | None], after: Sequence[int | None]) -> float:
    return sum(a != b for a, b in zip(before, after)) / len(before)


@dataclass
class Row:
    n: int
    max_mean: float
    share_max_mean: float | None
    moved_add: float
    moved_remove: list[float]  # one figure per leaving replica, ids 1..N
    needless_add: float  # moved, but not to the joining replica
    needless_remove: float  # worst over which one leaves: moved, but not from it
    max_mean_samples: list[float] = field(default_factory=list)  # one per repeated sample
    exact_add: float | None = None  # moved share of the key space itself (slots, entries)
    exact_remove: list[float] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def ideal(self) -> float:
        return 1 / self.n

    @property
    def moved_remove_mean(self) -> float:
        return statistics.fmean(self.moved_remove)

    @property
    def moved_remove_max(self) -> float:
        return max(self.moved_remove)

    @property
    def max_mean_median(self) -> float:
        return statistics.median(self.max_mean_samples or [self.max_mean])


def _max_mean(placed: Sequence[int], n: int) -> float:
    return max(Counter(placed).values()) / (len(placed) / n)


def measure(variant: Variant, keys: Sequence[int], n_values: Iterable[int],
            repeats: Sequence[Sequence[int]] = ()) -> list[Row]:
    """One row per N; ``repeats`` are further key samples for the max/mean's median."""
    rows = []
    for n in n_values:
        ids = list(range(1, n + 1))
        base = variant.build(ids)
        placed = assign(base, ids, keys, variant.bounded)
        counts = Counter(placed)
        share = None
        exact = not variant.bounded  # the key space decides alone: figures over all of it
        if exact:
            share = max(base.shares().values()) * n
        add, needless_add, exact_add = 1.0, 0.0, None
        if n > 1:
            smaller = variant.build(ids[:-1])
            grown = variant.grow(smaller, ids[:-1], n)
            before = assign(smaller, ids[:-1], keys, variant.bounded)
            after = assign(grown, ids, keys, variant.bounded)
            add = moved(before, after)
            needless_add = sum(a != b and b != n for a, b in zip(before, after)) / len(keys)
            if exact:
                exact_add = moved(smaller.owners(), grown.owners())
        removes, needless, exact_removes = [], [], []
        for i in ids:
            rest = [x for x in ids if x != i]
            shrunk = variant.shrink(base, ids, i)
            after = assign(shrunk, rest, keys, variant.bounded)
            removes.append(moved(placed, after))
            needless.append(sum(a != b and a != i for a, b in zip(placed, after)) / len(keys))
            if exact:
                exact_removes.append(moved(base.owners(), shrunk.owners()))
        samples = [_max_mean(assign(base, ids, more, variant.bounded), n) for more in repeats]
        rows.append(Row(n, _max_mean(placed, n), share, add, removes, needless_add,
                        max(needless), samples, exact_add, exact_removes,
                        {i: counts.get(i, 0) for i in ids}))
    return rows


def noise_floor(count: int, n_values: Iterable[int], draws: int = 2000,
                seed: int = 7) -> dict[int, tuple[float, float]]:
    """max/mean of a perfectly uniform random assignment of ``count`` requests: (median, p95).

    No hash can beat this on a sample of ``count`` requests; it is the sample's own noise.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for n in n_values:
        maxima = rng.multinomial(count, [1 / n] * n, size=draws).max(axis=1) / (count / n)
        out[n] = (float(np.median(maxima)), float(np.percentile(maxima, 95)))
    return out


# -- the report ------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def verdict(rows: list[Row]) -> dict[str, object]:
    """The figures the targets are about, worst over N."""
    shares = [r.share_max_mean for r in rows if r.share_max_mean is not None]
    ratios = [r.moved_add / r.ideal for r in rows if r.n > 1]
    ratios += [m / r.ideal for r in rows for m in r.moved_remove]
    exact = [r.exact_add / r.ideal for r in rows if r.n > 1 and r.exact_add is not None]
    exact += [m / r.ideal for r in rows for m in r.exact_remove]
    return {
        "exact_moved_ratio_min": min(exact) if exact else None,
        "exact_moved_ratio_max": max(exact) if exact else None,
        "exact_movement_ok": bool(exact) and all(0.9 <= x <= 1.1 for x in exact),
        "share_ok": bool(shares) and max(shares) <= 1.05,
        "max_mean": max(r.max_mean for r in rows),
        "max_mean_median": max(r.max_mean_median for r in rows),
        "share_max_mean": max(shares) if shares else None,
        "moved_ratio_min": min(ratios),
        "moved_ratio_max": max(ratios),
        "needless": max(max(r.needless_add, r.needless_remove) for r in rows),
        "balance_ok": max(r.max_mean for r in rows) <= 1.05,
        "movement_ok": all(0.9 <= x <= 1.1 for x in ratios),
    }


def summary_table(results: dict[str, list[Row]]) -> str:
    lines = [
        ("| strategy | max/mean (sample) | max/mean (median of samples) | share max/mean | "
        "moved / ideal (sample) | moved / ideal (key space) | needless moves (sample) | "
        "max/mean <= 1.05: sample / key space | within 10% of ideal: sample / key space |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def yn(ok: object) -> str:
        return "yes" if ok else "no"

    for name, rows in results.items():
        v = verdict(rows)
        exact = ("-" if v["exact_moved_ratio_min"] is None else
                 f"{v['exact_moved_ratio_min']:.2f} .. {v['exact_moved_ratio_max']:.2f}")
        has_space = v["share_max_mean"] is not None
        lines.append(
            f"| {name} | {v['max_mean']:.3f} | {v['max_mean_median']:.3f} | "
            f"{_f(v['share_max_mean'], 4)} | "  # type: ignore[arg-type]
            f"{v['moved_ratio_min']:.2f} .. {v['moved_ratio_max']:.2f} | {exact} | "
            f"{100 * v['needless']:.1f}% | "  # type: ignore[operator]
            f"{yn(v['balance_ok'])} / {yn(v['share_ok']) if has_space else '-'} | "
            f"{yn(v['movement_ok'])} / {yn(v['exact_movement_ok']) if has_space else '-'} |")
    return "\n".join(lines)


def detail_table(rows: list[Row], floor: dict[int, tuple[float, float]]) -> str:
    lines = [
        ("| N | max/mean | median of samples | uniform floor (median / p95) | share max/mean | "
        "moved on add (/ideal) | moved on remove, mean / worst (/ideal) | ideal 1/N | "
        "needless (add / remove) | key space moved / ideal (add; worst remove) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med, p95 = floor.get(r.n, (float("nan"), float("nan")))
        lines.append(
            f"| {r.n} | {r.max_mean:.3f} | {r.max_mean_median:.3f} | {med:.3f} / {p95:.3f} | "
            f"{_f(r.share_max_mean, 4)} | {r.moved_add:.3f} ({r.moved_add / r.ideal:.2f}) | "
            f"{r.moved_remove_mean:.3f} / {r.moved_remove_max:.3f} "
            f"({r.moved_remove_max / r.ideal:.2f}) | {r.ideal:.3f} | "
            f"{100 * r.needless_add:.1f}% / {100 * r.needless_remove:.1f}% | "
            + ("-" if not r.exact_remove else
               f"{(r.exact_add if r.exact_add is not None else 1.0) / r.ideal:.3f}; "
               f"{max(r.exact_remove) / r.ideal:.3f}") + " |")
    return "\n".join(lines)


def render(results: dict[str, list[Row]], descriptions: dict[str, str],
           floor: dict[int, tuple[float, float]], count: int, seed: int, repeats: int) -> str:
    ns = [r.n for rows in results.values() for r in rows]
    parts = [
        "# Balance of the lookup strategies",
        "",
        (f"{count:,} random 6-digit request ids (seed {seed}); server ids 1..N, N = "
        f"{min(ns)}..{max(ns)}."),
        "",
        ("- **max/mean**: requests of the busiest replica over the mean; the *median of "
        f"samples* repeats it over {repeats} further samples of {count:,} ids."),
        ("- **share max/mean**: the same over the whole key space (slots or table entries): the "
        "strategy's own balance, without the sample's noise."),
        ("- **uniform floor**: max/mean of a perfectly uniform random assignment of "
        f"{count:,} requests (2,000 draws): the noise of the sample itself, which no hash "
        "function can get under."),
        ("- **moved**: fraction of the ids whose replica changes when replica N joins ids "
        "1..N-1 (add) or one of ids 1..N leaves (remove; every one in turn). The ideal is 1/N. "
        "**needless**: moves not to the joining (or not from the leaving) replica. "
        "*key space*: the same over all slots or table entries instead of the sample."),
        "",
        "## Summary (worst over N)",
        "",
        summary_table(results),
    ]
    for name, rows in results.items():
        parts += ["", f"## {name}", "", descriptions[name], "", detail_table(rows, floor)]
    return "\n".join(parts) + "\n"


def chart(results: dict[str, list[Row]], floor: dict[int, tuple[float, float]],
          path: str) -> None:
    from analysis.charts import log_axis, plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ns = sorted(floor)
    for name, rows in results.items():
        xs = [r.n for r in rows]
        ax1.plot(xs, [r.max_mean for r in rows], marker="o", label=name)
        ax2.plot(xs, [r.moved_remove_max / r.ideal for r in rows], marker="o", label=name)
    ax1.plot(ns, [floor[n][1] for n in ns], "k:", label="uniform sample p95 (noise floor)")
    ax1.axhline(1.05, color="grey", lw=0.8, ls="--")
    log_axis(ax1)
    ax1.set_xlabel("replicas N")
    ax1.set_ylabel("max / mean requests (log scale)")
    ax1.set_title("Busiest replica, 10,000 random request ids")
    ax2.axhspan(0.9, 1.1, color="green", alpha=0.12, label="within 10% of ideal")
    ax2.set_xlabel("replicas N")
    ax2.set_ylabel("moved fraction / (1/N)")
    ax2.set_title("Keys moved when one replica leaves (worst one)")
    log_axis(ax2)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row_json(r: Row) -> dict[str, object]:
    return {**asdict(r), "ideal": r.ideal, "max_mean_median": r.max_mean_median}


def run(out: str, count: int = 10_000, seed: int = 1, n_min: int = 2, n_max: int = 10,
        only: list[str] | None = None, repeats: int = 20, plot: bool = True,
        echo: bool = True) -> dict[str, list[Row]]:
    """Measure, print, write ``balance.md``, ``balance.json``, ``balance.png``."""
    keys = request_ids(count, seed)
    more = [request_ids(count, seed + 1000 + r) for r in range(repeats)]
    chosen = [v for v in variants() if not only or v.name in only]
    n_values = range(n_min, n_max + 1)
    results = {}
    for v in chosen:
        if echo:
            print(f"measuring {v.name} ...", file=sys.stderr, flush=True)
        results[v.name] = measure(v, keys, n_values, more)
    floor = noise_floor(count, n_values)
    report = render(results, {v.name: v.description for v in chosen}, floor, count, seed,
                    repeats)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "balance.md"), "w", encoding="utf-8") as fh:
        fh.write(report)
    with open(os.path.join(out, "balance.json"), "w", encoding="utf-8") as fh:
        json.dump({"requests": count, "seed": seed, "repeats": repeats,
                   "noise_floor": {n: {"median": a, "p95": b} for n, (a, b) in floor.items()},
                   "strategies": {v.name: {"description": v.description,
                                           "verdict": verdict(results[v.name]),
                                           "rows": [_row_json(r) for r in results[v.name]]}
                                  for v in chosen}}, fh, indent=1)
    if plot:
        chart(results, floor, os.path.join(out, "balance.png"))
    if echo:
        print(report)
        print(f"written: {os.path.join(out, 'balance.md')} (+ balance.json, balance.png)")
    return results


# -- one hash, judged before it goes live (``--hash``) -------------------------------------------
@dataclass
class HashReport:
    """``lb-analyze balance --hash SPEC``: the ring with those hash functions, N = 2..10."""

    spec: str  # canonical: what the registry would store
    description: str
    slots: int
    virtual: int
    probing: str
    rows: list[Row]
    reach: Counter[int]  # slot -> how many of all 6-digit request ids H sends there
    placement: dict[int, tuple[int, ...]]  # server id -> its virtual servers' slots
    expected: dict[int, dict[int, float]]  # N -> server id -> share of all 6-digit ids

    @property
    def verdict(self) -> dict[str, object]:
        return verdict(self.rows)

    def summary_cells(self) -> list[str]:
        """The README's analysis table columns: max/mean (sample), its median over the
        samples, key-space max/mean, moved / ideal over the sample and over the key space."""
        v = self.verdict
        return [f"{v['max_mean']:.2f}", f"{v['max_mean_median']:.2f}",
                f"{v['share_max_mean']:.2f}",
                f"{v['moved_ratio_min']:.2f} .. {v['moved_ratio_max']:.2f}",
                f"{v['exact_moved_ratio_min']:.2f} .. {v['exact_moved_ratio_max']:.2f}"]


def hash_report(spec: str, slots: int = 512, virtual: int = 9, probing: str = "linear",
                count: int = 10_000, seed: int = 1, n_min: int = 2, n_max: int = 10,
                repeats: int = 20) -> HashReport:
    """Measure the ring with hash ``spec`` (a preset, formulas or a plug-in) like the balance
    report measures every strategy, plus what only the hash decides: the slots H reaches, where
    Phi puts the virtual servers, and the share of every 6-digit request id per replica.
    Raises ``ValueError`` (a ``FormulaError``, a ``HashSpecError``) for an unusable spec."""
    preset = resolve_preset(spec, virtual)
    variant = _ring_variant(f"ring {preset.name}", preset.name, slots, virtual,
                            probing=probing)
    keys = request_ids(count, seed)
    more = [request_ids(count, seed + 1000 + r) for r in range(repeats)]
    rows = measure(variant, keys, range(n_min, n_max + 1), more)
    # Where a key lands depends on H and M alone: count every 6-digit id once, then weigh.
    widest = variant.build(list(range(1, n_max + 1)))
    assert isinstance(widest, HashRing)
    reach = slot_weights(widest, REQUEST_IDS)
    expected = {n: shares_by_weight(variant.build(list(range(1, n + 1))), reach)
                for n in range(n_min, n_max + 1)}
    return HashReport(preset.name, preset.description, slots, virtual, probing, rows, reach,
                      widest.placement(), expected)


def render_hash_report(report: HashReport, count: int, repeats: int) -> str:
    total = sum(report.reach.values())
    busiest = max(report.reach.values()) / total
    lines = [
        f"# Balance of LB_HASH={report.spec}",
        "",
        (f"{report.description}; M={report.slots}, K={report.virtual}, {report.probing} "
         "probing; LB_STRATEGY=ring (the other strategies do not use LB_HASH)."),
        "",
        (f"H reaches {len(report.reach)} of {report.slots} slots over all {total:,} 6-digit "
         f"request ids; the busiest slot gets {100 * busiest:.2f} % of them "
         f"(even: {100 / report.slots:.2f} %)."),
        "",
        "## Where the virtual servers land",
        "",
        ("Placed in ascending server id order, so id k's slots are the same for every N >= k "
         "(with the registry's placement, joining replicas never move the others)."),
        "",
        "| server id | slots of its virtual servers |",
        "|---|---|",
    ]
    lines += [f"| {sid} | {', '.join(map(str, sorted(slots)))} |"
              for sid, slots in sorted(report.placement.items())]
    occupied = sorted(s for slots in report.placement.values() for s in slots)
    lines += ["", (f"All {len(occupied)} lie in slots {occupied[0]}..{occupied[-1]} of "
                   f"0..{report.slots - 1}."), "",
              f"## Load and movement, N = {report.rows[0].n}..{report.rows[-1].n}", "",
              (f"max/mean over {count:,} random 6-digit ids (seed as `balance`), its median "
               f"over {repeats} further samples, over the key space (slots), and over all "
               "6-digit ids (exact: every id counted); moved: fraction of the sample whose "
               "replica changes when replica N joins, or when one of 1..N leaves (mean / "
               "worst), next to the ideal 1/N."), "",
              ("| N | max/mean (sample) | median of samples | key space | all 6-digit ids | "
               "expected shares, all 6-digit ids (%) | moved on add (/ideal) | "
               "moved on remove, mean / worst (/ideal) | ideal 1/N |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        shares = report.expected[r.n]
        figures = " / ".join(f"{100 * shares[i]:.1f}" for i in range(1, r.n + 1))
        lines.append(
            f"| {r.n} | {r.max_mean:.3f} | {r.max_mean_median:.3f} | "
            f"{_f(r.share_max_mean)} | {max(shares.values()) * r.n:.3f} | {figures} | "
            f"{r.moved_add:.3f} ({r.moved_add / r.ideal:.2f}) | "
            f"{r.moved_remove_mean:.3f} / {r.moved_remove_max:.3f} "
            f"({r.moved_remove_max / r.ideal:.2f}) | {r.ideal:.3f} |")
    lines += ["", "## Summary (worst over N), the columns of the README's analysis table", "",
              ("| max/mean (sample) | max/mean (median of samples) | key-space max/mean | "
               "moved / ideal (sample) | moved / ideal (key space) |"),
              "|---|---|---|---|---|",
              "| " + " | ".join(report.summary_cells()) + " |"]
    return "\n".join(lines) + "\n"


def hash_chart(report: HashReport, path: str) -> None:
    """The same as PNG: max/mean and movement per N, and where H sends the ids among the
    virtual servers."""
    from analysis.charts import log_axis, plt

    fig = plt.figure(figsize=(13, 8))
    ax1, ax2 = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2)
    ax3 = fig.add_subplot(2, 1, 2)
    ns = [r.n for r in report.rows]
    ax1.plot(ns, [r.max_mean for r in report.rows], marker="o", label="sample")
    ax1.plot(ns, [r.share_max_mean or 0 for r in report.rows], marker="s", label="key space")
    ax1.plot(ns, [max(report.expected[n].values()) * n for n in ns], marker="^",
             label="all 6-digit ids")
    ax1.axhline(1.05, color="grey", lw=0.8, ls="--")
    log_axis(ax1)
    ax1.set_xlabel("replicas N")
    ax1.set_ylabel("max / mean (log scale)")
    ax1.set_title("Busiest replica")
    ax1.legend(fontsize=7)
    ax2.axhspan(0.9, 1.1, color="green", alpha=0.12, label="within 10% of ideal")
    ax2.plot(ns, [r.moved_add / r.ideal for r in report.rows], marker="o", label="add")
    ax2.plot(ns, [r.moved_remove_max / r.ideal for r in report.rows], marker="s",
             label="remove (worst)")
    log_axis(ax2)
    ax2.set_yticks([0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10])
    ax2.set_xlabel("replicas N")
    ax2.set_ylabel("moved fraction / (1/N)")
    ax2.set_title("Keys moved")
    ax2.legend(fontsize=7)
    total = sum(report.reach.values())
    ax3.bar(list(report.reach), [100 * c / total for c in report.reach.values()], width=1.0,
            color="lightgrey", label="% of 6-digit ids hashed to the slot")
    top = max(100 * c / total for c in report.reach.values())
    for k, (sid, slots) in enumerate(sorted(report.placement.items())):
        ax3.vlines(slots, 0, top, colors=f"C{k % 10}", lw=1.0, label=f"id {sid}")
    ax3.set_xlim(0, report.slots)
    ax3.set_xlabel(f"slot (0..{report.slots - 1})")
    ax3.set_ylabel("% of ids")
    ax3.set_title(f"H reaches {len(report.reach)} of {report.slots} slots; virtual servers "
                  "of each server id", fontsize=9)
    ax3.legend(fontsize=6, loc="upper right", ncol=6)
    fig.suptitle(f"LB_HASH={report.spec}"[:120], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_name(spec: str) -> str:
    """A file name for ``spec``'s chart: the preset's name, else a digest of the spec."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", spec):
        return f"balance-{spec}.png"
    return f"balance-hash-{hashlib.sha1(spec.encode()).hexdigest()[:8]}.png"


def run_hash(specs: list[str], out: str, chart: bool = False, slots: int = 512,
             virtual: int = 9, probing: str = "linear", count: int = 10_000, seed: int = 1,
             n_min: int = 2, n_max: int = 10, repeats: int = 20,
             echo: bool = True) -> list[HashReport]:
    reports = []
    for spec in specs:
        try:
            report = hash_report(spec, slots, virtual, probing, count, seed, n_min, n_max,
                                 repeats)
        except ValueError as exc:
            raise AnalysisError(f"--hash: {exc}") from None
        reports.append(report)
        if echo:
            print(render_hash_report(report, count, repeats))
        if chart:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, chart_name(report.spec))
            hash_chart(report, path)
            if echo:
                print(f"chart: {path}")
    return reports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="analysis/results", help="results folder")
    parser.add_argument("--requests", type=int, default=10_000, help="request ids (10000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the request ids")
    parser.add_argument("--repeats", type=int, default=20,
                        help="further samples for the median max/mean (20)")
    parser.add_argument("--n-min", type=int, help="fewest replicas (2)")
    parser.add_argument("--n-max", type=int, help="most replicas (10)")
    parser.add_argument("--only", action="append", metavar="STRATEGY",
                        help="measure only this strategy (repeatable)")
    add_weights_argument(parser)
    add_hash_arguments(parser)


def add_weights_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--weights", metavar="W1,W2,...",
                        help="one weight (1..256) per replica: every strategy's share per "
                             "replica against its target w / W, for N = the weights' count")


def add_hash_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--hash", action="append", metavar="SPEC",
                        help="judge these hash functions on the ring instead: a preset, "
                             "formulas 'H=...; Phi=...' or a plug-in module:name (repeatable)")
    parser.add_argument("--slots", type=int, default=512, help="--hash: slots M (512)")
    parser.add_argument("--virtual", type=int, default=9,
                        help="--hash: virtual servers per replica K (9)")
    parser.add_argument("--probing", default="linear", help="--hash: linear or quadratic")
    parser.add_argument("--chart", action="store_true", help="--hash: also write a PNG")
