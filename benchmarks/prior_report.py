"""Tables and a Dice-vs-K plot for the painted-slice prior (docs/benchmarks.md#painted-slice-prior).

    python benchmarks/prior_report.py [--results docs/results] [--plot docs/images/dice_vs_k_prior.png]

Reads the interpolation baselines (``{la,acdc}_interp_k*.json``, every volume) and the runs of
``benchmarks/prior_protocol.sh`` (``prior/*.json``, a few volumes each), loose files or members
of the ``archive_*.json`` files in ``--results`` alike (``benchmarks/results_archive.py``). Every
comparison is paired: a method's Dice next to the fill's on the same volumes, mean ± sd of the
difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from results_archive import find, load


def _per_volume(data: dict) -> tuple[int, dict[str, dict[str, float]], dict]:
    rows = {m: {r["name"]: r["dice"] for r in d.get("per_volume", []) if r.get("dice") is not None}
            for m, d in data["methods"].items()}
    return int(data["k"]), rows, data


#: dataset -> (baselines over every volume, the prior runs, title, rf runs with ``{k}``), globs
#: under ``--results`` (loose files or archive members). The current figures (the fill's fall-off 1.5 px a slice) are
#: ``la_inside`` (the K slices strictly inside the structure, ``bench within-volume --placement
#: inside``, the reading that reproduces issue 16's table) and ``acdc`` (first and last
#: foreground slice among the K); the ``*_3px`` sets are the earlier runs with a 3 px fall-off.
SETS = {
    "la_inside": ("fill15/la_interp_inside_k*.json", "prior15/la_inside_k*.json",
                  "left atrium (la/train), K inside", ("fill15/la_rf_inside_k{k}.json",)),
    "acdc": ("fill15/acdc_interp_k*.json", "prior15/acdc_k*.json", "ACDC (acdc/val)",
             ("acdc_rf_k{k}.json", "prior/acdc_rf_k{k}_rest.json", "fill15/acdc_rf_k{k}.json")),
    "la_ends": ("fill15/la_interp_k*.json", "prior15/la_k*.json", "left atrium, tips painted", ()),
    "la_3px": ("la_interp_k*.json", "prior/la_k*.json", "left atrium, tips painted (fall-off 3 px)", ()),
    "la_inside_3px": ("la_interp_inside_k*.json", "prior/la_inside_k*.json", "left atrium, K inside (fall-off 3 px)", ()),
    "acdc_3px": ("acdc_interp_k*.json", "prior/acdc_k*.json", "ACDC (fall-off 3 px)", ()),
}
#: the sets of the plot and of the summary lines
CURRENT = ("la_inside", "acdc")


def _baselines(results: Path, dataset: str) -> dict[int, dict[str, dict[str, float]]]:
    out: dict[int, dict[str, dict[str, float]]] = {}
    for _, data in find(results, SETS[dataset][0]):
        k, rows, _ = _per_volume(data)
        out[k] = rows
    return out


def _prior_files(results: Path, dataset: str) -> list[tuple[str, dict]]:
    """``(name, data)`` of the set's prior runs, by K and file name."""
    return sorted(find(results, SETS[dataset][1]), key=lambda nd: (_per_volume(nd[1])[0], Path(nd[0]).name))


def rf_runs(results: Path, dataset: str, k: int) -> dict[str, float]:
    """The random forest's Dice by volume at ``k`` over the set's rf files."""
    out: dict[str, float] = {}
    for pattern in SETS[dataset][3]:
        data = load(results, pattern.format(k=k))
        if data is not None:
            out.update(_per_volume(data)[1].get("rf", {}))
    return out


def merged(results: Path, dataset: str, k: int, method: str, steps: int | None = None) -> dict[str, float]:
    """``method``'s Dice by volume at ``k`` over every prior file of ``dataset``, runs at
    other step budgets left out."""
    out: dict[str, float] = {}
    for _, data in _prior_files(results, dataset):
        fk, rows, data = _per_volume(data)
        if fk != k or method not in rows or (steps is not None and data.get("budget_steps") not in (None, steps)):
            continue
        out.update(rows[method])
    return out


#: (set, K) -> the rows that are the dock's default: at K = 2 the runs named ``recommended`` had
#: ``network_min_painted`` = 3 (the default then); the default became 2 after them.
DEFAULT_AS_RUN = {("la_inside", 2): "recommended:prior.network_min_painted=2"}


def summary(results: Path, dataset: str, k: int, steps: int) -> str:
    """One line: the dock's default (``recommended``, :data:`DEFAULT_AS_RUN`) against the fills
    and rf on every volume it ran on."""
    ours = merged(results, dataset, k, DEFAULT_AS_RUN.get((dataset, k), "recommended"), steps)
    base = _baselines(results, dataset).get(k, {})
    for fill in ("interp", "interp_flow"):  # the runs' own fills first, as in paired_rows
        base[fill] = {**base.get(fill, {}), **merged(results, dataset, k, fill)}
    rf = rf_runs(results, dataset, k)
    names = [n for n in ours if n in base["interp"]]
    if not names:
        return ""
    line = f"{dataset} K = {k}, {len(names)} volumes: recommended {np.mean([ours[n] for n in names]):.3f}"
    for label, table_ in (("sdf fill", base.get("interp", {})), ("flow fill", base.get("interp_flow", {})), ("rf", rf)):
        common = [n for n in names if n in table_]
        if common:
            diff = np.array([ours[n] - table_[n] for n in common])
            line += (f"; vs {label} ({len(common)} volumes) {np.mean([table_[n] for n in common]):.3f}, "
                     f"difference {diff.mean():+.3f} ± {diff.std():.3f}")
    return line


def paired_rows(results: Path, dataset: str) -> list[str]:
    """Markdown rows: for each prior run of ``dataset``, each method against the fill."""
    baselines = _baselines(results, dataset)
    out = []
    files = _prior_files(results, dataset)
    for name, data in files:
        k, rows, data = _per_volume(data)
        # the fills the run computed itself where it has them, else the baselines' on those volumes
        flow = {**baselines.get(k, {}).get("interp_flow", {}), **rows.get("interp_flow", {})}
        sdf = {**baselines.get(k, {}).get("interp", {}), **rows.get("interp", {})}
        steps = data.get("budget_steps")
        for method, by_name in rows.items():
            if method in ("interp", "interp_flow"):  # the baselines a run carries for pairing
                continue
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
                f"[{diff.min():+.3f}, {diff.max():+.3f}] | {wins} / {losses} | `{Path(name).name}` |"
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

    fig, axes = plt.subplots(1, len(CURRENT), figsize=(5.5 * len(CURRENT), 4.0), dpi=120)
    for ax, dataset in zip(axes, CURRENT):
        title = SETS[dataset][2]
        series: dict[str, dict[int, list[float]]] = {}
        baselines = _baselines(results, dataset)
        for k, rows in baselines.items():
            for m, by_name in rows.items():
                label = {"interp": "interp: 3D Slicer's fill", "interp_flow": "interp_flow: the plugin's fill"}.get(m, m)
                series.setdefault(f"{label} (all volumes)", {})[k] = list(by_name.values())
            rf = rf_runs(results, dataset, k)
            if rf:
                series.setdefault("rf (all volumes)", {})[k] = list(rf.values())
        trained: dict[str, dict[int, dict[str, float]]] = {}  # method -> K -> volume -> Dice, over files
        for name, data in _prior_files(results, dataset):
            k, rows, data = _per_volume(data)
            if "60s" in name:
                continue
            for m, by_name in rows.items():
                if m not in ("interp", "interp_flow"):
                    trained.setdefault(m, {}).setdefault(k, {}).update(by_name)
        for m, by_k in trained.items():  # the label says on how many volumes
            n = [len(v) for v in by_k.values()]
            low, high = min(n), max(n)
            series[f"{m} ({low}{'' if low == high else f'-{high}'} volumes)"] = {k: list(v.values()) for k, v in by_k.items()}
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
    for dataset in SETS:
        print(f"**{SETS[dataset][2]}**\n\n{table(args.results, dataset)}")
    for dataset, k, steps in (("la_inside", 2, 900), ("la_inside", 3, 900), ("la_inside", 5, 900),
                              ("la_inside", 10, 900), ("acdc", 2, 360), ("acdc", 3, 360), ("acdc", 5, 360)):
        line = summary(args.results, dataset, k, steps)
        if line:
            print(f"- {line}")
    if args.plot:
        print(f"plot: {plot(args.results, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
