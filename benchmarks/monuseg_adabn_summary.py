"""Summary of ``bench histology --adapt-batch-norm both`` runs (issue 26): per run and per
method (seeds averaged per tile), the mean Dice without and with ``predict.adapt_batch_norm``,
the paired difference adapted minus not over the scored tiles (mean ± standard error, tiles
better), and each minus the forest (the kept ``monuseg_2tiles_rf.json`` of
docs/results/archive_monuseg.json unless a results file holds an ``rf`` row).

    python benchmarks/monuseg_adabn_summary.py mean_teacher_s0.json mean_teacher_s1.json ...
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ARCHIVE = Path(__file__).resolve().parents[1] / "docs" / "results" / "archive_monuseg.json"


def per_tile(entry) -> dict[str, float]:
    return {r["name"]: r["dice"] for r in entry["per_volume"]}


def paired(a: dict, b: dict) -> str:
    names = sorted(set(a) & set(b))
    d = np.array([a[n] - b[n] for n in names])
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{d.mean():+.3f} ± {se:.3f}, {int((d > 0).sum())}/{len(d)}"


def main(paths):
    rf = None
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "rf" in data["methods"]:
            rf = per_tile(data["methods"]["rf"])
        for name, entry in data["methods"].items():
            if name != "rf" and not name.endswith(" +adabn"):
                runs.append((name, data["seed"], per_tile(entry), per_tile(data["methods"][f"{name} +adabn"]),
                             entry["per_volume"][0]))
    if rf is None:
        rf = per_tile(json.loads(ARCHIVE.read_text())["files"]["monuseg_2tiles_rf.json"]["methods"]["rf"])
    print(f"rf: {np.mean(list(rf.values())):.3f} over {len(rf)} tiles")
    print("| method | seed | steps | train CPU-s | Dice | Dice adapted | adapted minus not | minus rf "
          "| adapted minus rf |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_method = defaultdict(list)
    for name, seed, off, on, row in runs:
        by_method[name].append((off, on))
        print(f"| {name} | {seed} | {row['steps']} / {row.get('planned_steps')} | {row['train_cpu_s']:.0f} | "
              f"{np.mean(list(off.values())):.3f} | {np.mean(list(on.values())):.3f} | {paired(on, off)} | "
              f"{paired(off, rf)} | {paired(on, rf)} |")
    for name, pairs in by_method.items():
        if len(pairs) < 2:
            continue
        names = sorted(set.intersection(*(set(o) for o, _ in pairs)))
        off = {n: float(np.mean([o[n] for o, _ in pairs])) for n in names}
        on = {n: float(np.mean([a[n] for _, a in pairs])) for n in names}
        print(f"| {name}, mean of {len(pairs)} seeds (per tile) | | | | {np.mean(list(off.values())):.3f} | "
              f"{np.mean(list(on.values())):.3f} | {paired(on, off)} | {paired(off, rf)} | {paired(on, rf)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
