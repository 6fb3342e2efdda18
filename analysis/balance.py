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

``python -m analysis.balance`` or ``lb-analyze balance`` prints the tables and writes
``balance.md``, ``balance.json`` and ``balance.png`` into the results folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from lb.hashring import HashRing
from lb.strategies import Lookup, Maglev, well_mixed_ring

Ids = Sequence[int]


@dataclass(frozen=True)
class Variant:
    """One strategy as the balance report drives it."""

    name: str
    description: str
    build: Callable[[Ids], Lookup]
    grow: Callable[[Lookup, Ids, int], Lookup]  # (lookup over ids, ids, new id) -> lookup
    shrink: Callable[[Lookup, Ids, int], Lookup]  # (lookup over ids, ids, leaving id) -> lookup
    bounded: float = 0.0
    share: Callable[[Lookup], dict[int, float]] | None = None
    entries: Callable[[Lookup], Sequence[int | None]] | None = None  # owner of each slot/entry


def _ring_variant(name: str, preset: str, slots: int = 512, virtual: int = 9,
                  bounded: float = 0.0, note: str = "") -> Variant:
    params = {"slots": slots, "virtual_per_server": virtual, "preset": preset}

    def build(ids: Ids) -> Lookup:
        ring = HashRing(**params)  # type: ignore[arg-type]
        for i in ids:
            ring.add(i)
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

    desc = f"ring, hash preset {preset}, M={slots}, K={virtual}" + (f"; {note}" if note else "")
    return Variant(name, desc, build, grow, shrink, bounded,
                   share=lambda lk: lk.shares(),  # type: ignore[attr-defined]
                   entries=None if bounded else slot_owners)  # type: ignore[arg-type]


def slot_owners(ring: HashRing) -> list[int | None]:
    """The server each slot's requests go to: the first virtual server at or after it."""
    owners = [ring.owner_of_slot(s) for s in range(ring.slots)]
    if not any(o is not None for o in owners):
        return owners
    table: list[int | None] = [None] * ring.slots
    nxt: int | None = next(o for o in owners if o is not None)
    for slot in range(ring.slots - 1, -1, -1):
        if owners[slot] is not None:
            nxt = owners[slot]
        table[slot] = nxt
    return table


def _set_variant(name: str, description: str, make: Callable[[Ids], Lookup],
                 bounded: float = 0.0) -> Variant:
    def entries(lookup: Lookup) -> Sequence[int | None]:
        if isinstance(lookup, Maglev):
            return lookup.table
        assert isinstance(lookup, HashRing)
        return slot_owners(lookup)

    return Variant(
        name, description, make,
        grow=lambda lk, ids, new: make([*ids, new]),
        shrink=lambda lk, ids, leaving: make([i for i in ids if i != leaving]),
        bounded=bounded,
        share=lambda lk: lk.shares(),  # type: ignore[attr-defined]
        entries=None if bounded else entries,
    )


def variants() -> list[Variant]:
    return [
        _ring_variant("ring seed", "seed", note="the specification's default"),
        _ring_variant("ring cs60002", "cs60002", note="the course handout's formulas"),
        _ring_variant("ring xxhash", "xxhash", note="well-mixed hashes, spec's M and K"),
        _set_variant("ring160", "ring, xxhash, M=65536, K=160 (LB_STRATEGY=ring160)",
                     well_mixed_ring),
        _set_variant("maglev", "Maglev, table 65537 (LB_STRATEGY=maglev)", Maglev),
        _ring_variant("ring seed + bounded 1.25", "seed", bounded=1.25,
                      note="bounded loads c=1.25 (LB_BOUNDED_LOAD=1.25)"),
        _set_variant("maglev + bounded 1.05",
                     "Maglev with bounded loads c=1.05 (LB_STRATEGY=maglev LB_BOUNDED_LOAD=1.05)",
                     Maglev, bounded=1.05),
    ]


def request_ids(count: int, seed: int) -> list[int]:
    """``count`` random 6-digit request ids, as the balancer draws them."""
    rng = random.Random(seed)
    return [rng.randint(100000, 999999) for _ in range(count)]


def assign(lookup: Lookup, ids: Ids, keys: Iterable[int], bounded: float = 0.0) -> list[int]:
    """The replica of each key, in order; with ``bounded`` = c, no replica takes more than
    ceil(c x (requests so far) / N): a request walks on past full replicas."""
    if not bounded:
        return [lookup.lookup(k) or 0 for k in keys]
    load = dict.fromkeys(ids, 0)
    out: list[int] = []
    n = len(ids)
    for m, key in enumerate(keys):
        cap = math.ceil(bounded * (m + 1) / n)
        chosen = None
        for server_id in lookup.walk(key):
            chosen = chosen or server_id  # everyone full cannot happen, but never drop a key
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
        if variant.share is not None and not variant.bounded:
            share = max(variant.share(base).values()) * n
        entries = variant.entries
        add, needless_add, exact_add = 1.0, 0.0, None
        if n > 1:
            smaller = variant.build(ids[:-1])
            grown = variant.grow(smaller, ids[:-1], n)
            before = assign(smaller, ids[:-1], keys, variant.bounded)
            after = assign(grown, ids, keys, variant.bounded)
            add = moved(before, after)
            needless_add = sum(a != b and b != n for a, b in zip(before, after)) / len(keys)
            if entries is not None:
                exact_add = moved(entries(smaller), entries(grown))
        removes, needless, exact_removes = [], [], []
        for i in ids:
            rest = [x for x in ids if x != i]
            shrunk = variant.shrink(base, ids, i)
            after = assign(shrunk, rest, keys, variant.bounded)
            removes.append(moved(placed, after))
            needless.append(sum(a != b and a != i for a, b in zip(placed, after)) / len(keys))
            if entries is not None:
                exact_removes.append(moved(entries(base), entries(shrunk)))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="analysis/results", help="results folder")
    parser.add_argument("--requests", type=int, default=10_000, help="request ids (10000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the request ids")
    parser.add_argument("--repeats", type=int, default=20,
                        help="further samples for the median max/mean (20)")
    parser.add_argument("--n-min", type=int, default=2)
    parser.add_argument("--n-max", type=int, default=10)
    parser.add_argument("--only", action="append", metavar="STRATEGY",
                        help="measure only this strategy (repeatable)")


def run_args(args: argparse.Namespace) -> None:
    run(args.out, args.requests, args.seed, args.n_min, args.n_max, args.only, args.repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.balance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
