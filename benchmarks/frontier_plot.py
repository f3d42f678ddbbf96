"""Table and plot of a KV-fraction frontier measured by variants.py (held-out perplexity ratio vs KV fraction).

    python benchmarks/variants.py --ratio 0.125,0.25,0.5 --variants '{...}' --json frontier.json
    python benchmarks/frontier_plot.py frontier.json docs/frontier.png     # prints the markdown table
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=Path, help="JSON written by variants.py --json")
    ap.add_argument("png", type=Path, nargs="?", help="where to draw the plot (optional)")
    args = ap.parse_args()
    rows = json.loads(args.rows.read_text())
    by = defaultdict(dict)
    for r in rows:
        by[r["variant"]][r["target_ratio"]] = r
    ratios = sorted({r["target_ratio"] for r in rows})
    print("| variant | " + " | ".join(f"{x:g} KV" for x in ratios) + " |")
    print("| --- |" + " --- |" * len(ratios))
    for name, cells in by.items():
        out = []
        for x in ratios:
            r = cells.get(x)
            out.append(f"{r['ppl_ratio']:.3f}x (KL {r['kl']:.3f}, top-1 {100 * r['top1_agreement']:.1f}%)" if r else "-")
        print(f"| {name} | " + " | ".join(out) + " |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, cells in by.items():
            xs = sorted(cells)
            ax.plot([cells[x]["kv_ratio"] for x in xs], [cells[x]["ppl_ratio"] for x in xs], marker="o", label=name)
        ax.set_xlabel("KV cache, fraction of the original")
        ax.set_ylabel("perplexity / original's (held-out)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title(f"{rows[0].get('text', '')}: one-shot conversion frontier")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
