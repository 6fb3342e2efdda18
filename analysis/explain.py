"""Why the specification's hash functions are so lopsided: where the virtual servers of ids
1..3 land, which slots the request hash can reach at all, and who owns the arcs. Pure.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

from lb.hashring import PRESETS, HashRing

ALL_IDS = range(100000, 1000000)  # every 6-digit request id


def explain_preset(preset: str, server_ids: tuple[int, ...] = (1, 2, 3), slots: int = 512,
                   virtual: int = 9, sample: int = 10_000, seed: int = 1) -> dict[str, Any]:
    ring = HashRing(slots, virtual, preset)
    for i in server_ids:
        ring.add(i)
    placement = ring.placement()
    occupied = sorted(s for v in placement.values() for s in v)
    reach = Counter(ring.slot_of(i) for i in ALL_IDS)
    rng = random.Random(seed)
    requests = Counter(ring.lookup(rng.randint(100000, 999999)) for _ in range(sample))
    # The arc in front of the lowest occupied slot wraps around the circle: the largest gap.
    gaps = [(occupied[(k + 1) % len(occupied)] - occupied[k]) % slots
            for k in range(len(occupied))]
    widest = max(range(len(gaps)), key=gaps.__getitem__)
    widest_owner = ring.owner_of_slot(occupied[(widest + 1) % len(occupied)])
    arcs: dict[str, list[int]] = {str(i): [] for i in server_ids}
    for k, gap in enumerate(gaps):  # the arc ending at a virtual server is its owner's
        arcs[str(ring.owner_of_slot(occupied[(k + 1) % len(occupied)]))].append(gap)
    return {
        "preset": preset,
        "formulas": PRESETS[preset].description,
        "virtual_slots": {str(i): list(v) for i, v in placement.items()},
        "band": [occupied[0], occupied[-1]],
        "slots_reached_by_H": len(reach),
        "slot_share": {str(i): round(s, 4) for i, s in ring.shares().items()},
        "request_share": {str(i): round(requests[i] / sample, 4) for i in server_ids},
        "arcs": {i: sorted(a, reverse=True) for i, a in arcs.items()},
        "widest_gap": gaps[widest],
        "widest_gap_owner": widest_owner,
        "requests_in_widest_gap": round(sum(
            c for s, c in reach.items()
            if 0 < (s - occupied[widest]) % slots <= gaps[widest]) / len(ALL_IDS), 4),
    }


def explain(out: str | None = None, echo: bool = True) -> list[dict[str, Any]]:
    facts = [explain_preset(p) for p in ("seed", "cs60002", "xxhash")]
    lines = []
    for f in facts:
        lines += [
            f"## {f['preset']}: {f['formulas']}",
            f"- virtual servers of ids 1..3 (slots): {f['virtual_slots']}",
            (f"- all 27 lie in slots {f['band'][0]}..{f['band'][1]} of 0..511; "
            f"the widest empty arc is {f['widest_gap']} slots, in front of server "
            f"{f['widest_gap_owner']}, and takes {100 * f['requests_in_widest_gap']:.1f}% of all "
            f"6-digit request ids"),
            f"- arc lengths (slots) each server answers for: {f['arcs']}",
            f"- distinct slots H reaches over all 900,000 6-digit ids: {f['slots_reached_by_H']}",
            (f"- share of slots: {f['slot_share']}; share of 10,000 random requests: "
            f"{f['request_share']}"),
            "",
        ]
    text = "\n".join(lines)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "explain.md"), "w", encoding="utf-8") as fh:
            fh.write("# Why the specification's hash map is lopsided\n\n" + text)
        _chart(facts, os.path.join(out, "explain.png"))
    if echo:
        print(text)
    return facts


def _chart(facts: list[dict[str, Any]], path: str) -> None:
    from analysis import charts

    plt = charts.plt
    fig, axes = plt.subplots(len(facts), 1, figsize=(11, 2.1 * len(facts)), sharex=True)
    for ax, f in zip(axes, facts):
        ring = HashRing(512, 9, f["preset"])
        reach = Counter(ring.slot_of(i) for i in ALL_IDS)
        ax.bar(list(reach), [100 * c / len(ALL_IDS) for c in reach.values()], width=1.0,
               color="lightgrey", label="% of request ids hashed to the slot")
        top = max(100 * c / len(ALL_IDS) for c in reach.values())
        for k, (sid, slots) in enumerate(f["virtual_slots"].items()):
            ax.vlines(slots, 0, top, colors=f"C{k}", lw=1.2, label=f"virtual servers of id {sid}")
        ax.set_title(f"{f['preset']}: H reaches {f['slots_reached_by_H']} of 512 slots; "
                     f"request share {f['request_share']}", fontsize=9)
        ax.set_ylabel("% of ids", fontsize=8)
        ax.legend(fontsize=6, loc="upper right", ncol=4)
    axes[-1].set_xlabel("slot (0..511)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
