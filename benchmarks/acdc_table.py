"""Markdown table of the ACDC cohort runs (docs/results/acdc_1000_<method>.json), with the
median Dice and per-volume wins against supervised, for docs/methods/*.md and benchmarks.md.

    python benchmarks/acdc_table.py supervised mean_teacher plgcl agcl aua
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main(methods: list[str]) -> str:
    rows = ["| method | mean Dice | median Dice | HD95 (px) | ASD (px) | volumes above supervised | file |",
            "|---|---|---|---|---|---|---|"]
    ref = None
    for name in methods:
        path = RESULTS / f"acdc_1000_{name}.json"
        if not path.exists():
            rows.append(f"| {name} | not measured | | | | | |")
            continue
        data = json.loads(path.read_text())
        m = data["methods"][name]
        dice = {r["name"]: r["dice"] for r in m["per_volume"]}
        if name == "supervised":
            ref = dice
        wins = "–" if ref is None or name == "supervised" else f"{sum(dice[k] > ref[k] for k in ref)} of {len(ref)}"
        rows.append(f"| {name} | {m['dice']:.3f} | {np.median(list(dice.values())):.3f} | {m['hd95']:.1f} | "
                    f"{m['asd']:.1f} | {wins} | `docs/results/{path.name}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(main(sys.argv[1:] or ["supervised", "mean_teacher", "plgcl", "agcl", "aua"]))
