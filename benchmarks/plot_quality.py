"""Held-out perplexity against expert megabytes read per token, from quality.py's --json (issue 13's plot).

    python benchmarks/plot_quality.py --json /data/q/quality.json --png docs/quality.png

One line per stored format (unquantized, 8-bit, 4-bit by group, 2-bit), a point per K (labelled): what a token
costs to read from disk when nothing is cached, and what it buys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    formats = sorted({(r["bits"] or 16, r["group"] or 0) for r in rows}, reverse=True)
    for bits, group in formats:
        line = sorted((r for r in rows if (r["bits"] or 16, r["group"] or 0) == (bits, group)),
                      key=lambda r: r["expert_mb"])
        label = "unquantized (bf16)" if bits == 16 else f"{bits}-bit, group {group}"
        ax.plot([r["expert_mb"] for r in line], [r["perplexity"] for r in line], marker="o", label=label)
        for r in line:
            ax.annotate(f"K={r['k']}", (r["expert_mb"], r["perplexity"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlabel("expert MB read per token (nothing cached)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--title", default="flashmoe small-moe: quality vs bytes read, by bits and K")
    args = ap.parse_args(argv)
    plot(json.loads(args.json.read_text()), args.png, args.title)


if __name__ == "__main__":
    main()
