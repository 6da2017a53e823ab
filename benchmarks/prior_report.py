"""Tables and a Dice-vs-K plot for the painted-slice prior (docs/benchmarks.md#painted-slice-prior).

    python benchmarks/prior_report.py [--results docs/results] [--plot docs/images/dice_vs_k_prior.png]

Reads the interpolation baselines (``{la,acdc}_interp_k*.json``, every volume) and the runs of
``benchmarks/prior_protocol.sh`` (``prior/*.json``, a few volumes each). Every comparison is
paired: a method's Dice next to the fill's on the same volumes, mean ± sd of the difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _per_volume(path: Path) -> tuple[int, dict[str, dict[str, float]], dict]:
    data = json.loads(path.read_text())
    rows = {m: {r["name"]: r["dice"] for r in d.get("per_volume", []) if r.get("dice") is not None}
            for m, d in data["methods"].items()}
    return int(data["k"]), rows, data


def paired_rows(results: Path, dataset: str) -> list[str]:
    """Markdown rows: for each prior run of ``dataset``, each method against the fill."""
    baselines: dict[int, dict[str, dict[str, float]]] = {}
    for f in sorted(results.glob(f"{dataset}_interp_k*.json")):
        k, rows, _ = _per_volume(f)
        baselines[k] = rows
    out = []
    files = sorted((results / "prior").glob(f"{dataset}_k*.json"), key=lambda f: (_per_volume(f)[0], f.name))
    for f in files:
        k, rows, data = _per_volume(f)
        flow = baselines.get(k, {}).get("interp_flow", {})
        sdf = baselines.get(k, {}).get("interp", {})
        steps = data.get("budget_steps")
        for method, by_name in rows.items():
            names = [n for n in by_name if n in flow]
            if not names:
                continue
            ours = np.array([by_name[n] for n in names])
            ref = np.array([flow[n] for n in names])
            plain = np.array([sdf.get(n, np.nan) for n in names])
            diff = ours - ref
            wins = int(np.sum(diff > 0.0005))
            losses = int(np.sum(diff < -0.0005))
            out.append(
                f"| {k} | {method} | {steps} | {len(names)} | {ours.mean():.3f} ± {ours.std():.3f} | "
                f"{ref.mean():.3f} | {np.nanmean(plain):.3f} | {diff.mean():+.3f} ± {diff.std():.3f} "
                f"[{diff.min():+.3f}, {diff.max():+.3f}] | {wins} / {losses} | `{f.name}` |"
            )
    return out


def table(results: Path, dataset: str) -> str:
    head = ("| K | method | steps | volumes | Dice | fill (flow) | fill (sdf) | method - flow fill: mean ± sd [min, max] "
            "| better / worse | file |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = paired_rows(results, dataset)
    return head + "\n".join(rows) + "\n" if rows else ""


def plot(results: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for ax, dataset, title in zip(axes, ("la", "acdc"), ("left atrium (la/train)", "ACDC (acdc/val)")):
        series: dict[str, dict[int, list[float]]] = {}
        for f in sorted(results.glob(f"{dataset}_interp_k*.json")):
            k, rows, _ = _per_volume(f)
            for m, by_name in rows.items():
                series.setdefault(f"{m} (all volumes)", {})[k] = list(by_name.values())
        counts: dict[str, set] = {}
        for f in sorted((results / "prior").glob(f"{dataset}_k*.json")):
            k, rows, data = _per_volume(f)
            if "60s" in f.name:
                continue
            for m, by_name in rows.items():
                series.setdefault(m, {})[k] = list(by_name.values())
                counts.setdefault(m, set()).add(len(by_name))
        for m, n in counts.items():  # the label says on how many volumes
            low, high = min(n), max(n)
            series[f"{m} ({low}{'' if low == high else f'-{high}'} volumes)"] = series.pop(m)
        for name, by_k in sorted(series.items()):
            ks = sorted(by_k)
            ax.errorbar(ks, [np.mean(by_k[k]) for k in ks], yerr=[np.std(by_k[k]) for k in ks], marker="o",
                        capsize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("painted slices K")
        ax.set_ylabel("Dice on the other slices")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    for dataset in ("la", "acdc"):
        print(f"**{dataset}**\n\n{table(args.results, dataset)}")
    if args.plot:
        print(f"plot: {plot(args.results, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
