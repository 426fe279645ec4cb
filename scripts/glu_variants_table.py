#!/usr/bin/env python3
"""The results table of docs/glu-variants.md from `glu_variants --json`'s output.

    python3 scripts/glu_variants_table.py docs/glu-variants/results.json

Per variant: the held-out loss (nats per byte) as mean ± sample standard deviation over the
seeds, bits per byte, the difference from FFN-ReLU paired by seed (the same seed starts every
variant from the same non-FFN parameters and feeds the same batches, so the paired difference
has less noise than the two means), its rank, and the paper's Table 1 (65,536 steps) with its
rank. Standard library only.
"""

import json
import math
import sys

PAPER = {
    "relu": 1.997, "gelu": 1.983, "swish": 1.994, "glu": 1.982,
    "bilinear": 1.960, "geglu": 1.942, "swiglu": 1.944, "reglu": 1.953,
}


def mean_std(values):
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def main(path):
    data = json.load(open(path))
    runs = data["runs"]
    variants = data["config"].get("variants") or [s["variant"] for s in data["summary"]]
    by = {v: {r["seed"]: r for r in runs if r["variant"] == v} for v in variants}
    rows = []
    for v in variants:
        losses = [r["held_out_loss"] for r in by[v].values()]
        m, s = mean_std(losses)
        base = by.get("relu", {})
        deltas = [r["held_out_loss"] - base[seed]["held_out_loss"]
                  for seed, r in by[v].items() if seed in base]
        dm, ds = mean_std(deltas) if deltas else (float("nan"), 0.0)
        first = next(iter(by[v].values()))
        wall = sum(r["wall_s"] for r in by[v].values()) / len(by[v])
        rows.append((v, first["d_ff"], first["parameters"], m, s, m / math.log(2), dm, ds, wall))
    names = {s["variant"]: s["paper_name"] for s in data["summary"]}
    ours_rank = {r[0]: k + 1 for k, r in enumerate(sorted(rows, key=lambda r: r[3]))}
    paper_rank = {v: k + 1 for k, v in enumerate(sorted(PAPER, key=PAPER.get))}
    print("| FFN | d_ff | parameters | held-out loss, nats/byte | bits/byte "
          "| − FFN-ReLU, paired | rank | paper (65,536 steps) | paper's rank | s/run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, d_ff, params, m, s, bpb, dm, ds, wall in rows:
        delta = "0" if v == "relu" else f"{dm:+.4f} ± {ds:.4f}"
        print(f"| {names.get(v, v)} | {d_ff} | {params:,} | {m:.4f} ± {s:.4f} | {bpb:.4f} "
              f"| {delta} | {ours_rank[v]} | {PAPER[v]:.3f} | {paper_rank[v]} | {wall:.0f} |")
    seeds = sorted({r["seed"] for r in runs})
    print(f"\n(mean ± sample standard deviation over seeds {', '.join(map(str, seeds))})")


if __name__ == "__main__":
    main(sys.argv[1])
