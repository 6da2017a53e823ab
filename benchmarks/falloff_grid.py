"""The fill's fall-off past the outermost painted slice (docs/benchmarks.md#fall-off-past-the-outermost-painted-slice).

    python benchmarks/falloff_grid.py --data ../shared/data/la/train --placement inside --method flow \
        --k 2,3,5,10 --px 1,1.5,2,3 --out docs/results/falloff/la_inside_flow.json

    python benchmarks/falloff_grid.py --report docs/results/archive_falloff.json   # the markdown table of every file

For each volume and K (slices revealed as in ``bench within-volume``), the fill with a fall-off
of each ``px`` (in-plane pixels a slice, scaled by the slice spacing as the plugin does), scored
on the unrevealed slices: mean Dice over the foreground classes. No training; seconds a volume.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_semicl.bench.common import find_cases, thinnest_axis
from napari_semicl.data.interpolation import default_shrink, interpolate_labels
from napari_semicl.data.reveal import PLACEMENTS, choose_reveal_slices, reveal_slices
from napari_semicl.engine.metrics import dice_per_class
from results_archive import entries


def mean_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean Dice over the reference's foreground classes (nan without any)."""
    dices = list(dice_per_class(pred, ref, np.unique(ref)).values())
    return float(np.mean(dices)) if dices else float("nan")


def report(folder: Path) -> str:  # a folder of grid files or an archive of them (results_archive.py)
    """One markdown row per file and K: mean Dice (sd) at each fall-off, and each fall-off
    minus 3 px (issue 16's baseline) where the file has 3 px: mean ± sd, volumes better / worse."""
    rows = ["| data | placement | fill | K | volumes | " + "Dice at px a slice: mean (sd) | 1.5 px - 3 px: mean ± sd, better / worse |",
            "|---|---|---|---|---|---|---|"]
    for _, d in entries(folder):
        pxs = d["px"]
        for k, v in d["k"].items():
            table = np.array(list(v["per_volume"].values()))
            table = table[~np.isnan(table).any(axis=1)]  # K revealed every slice with foreground: nothing scored
            if not len(table):
                continue
            cells = ", ".join(f"{px:g}: {m:.3f} ({sd:.3f})" for px, m, sd in zip(pxs, table.mean(0), table.std(0)))
            diff = ""
            if 1.5 in pxs and 3.0 in pxs:
                delta = table[:, pxs.index(1.5)] - table[:, pxs.index(3.0)]
                diff = (f"{delta.mean():+.3f} ± {delta.std():.3f}, {int(np.sum(delta > 0.0005))} / "
                        f"{int(np.sum(delta < -0.0005))}")
            name = d["data"].split("data/")[-1]
            rows.append(f"| {name} | {d['placement']} | {d['method']} | {k} | {len(table)} | {cells} | {diff} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, help="print the table of the JSON files in this folder (or archive) and stop")
    ap.add_argument("--data")
    ap.add_argument("--placement", choices=PLACEMENTS, default="ends")
    ap.add_argument("--method", choices=("sdf", "flow"), default="flow")
    ap.add_argument("--k", default="2,3,5,10")
    ap.add_argument("--px", default="1,1.5,2,3")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if not args.data or not args.out:
        ap.error("--data and --out are required (or --report)")
    ks = [int(k) for k in args.k.split(",")]
    pxs = [float(p) for p in args.px.split(",")]
    out = {"data": args.data, "placement": args.placement, "method": args.method, "px": pxs, "k": {}}
    cases = find_cases(args.data, limit=args.limit)
    for k in ks:
        rows = {}
        for case in cases:
            ref = case.reference.data
            axis = thinnest_axis(ref.shape)
            revealed = choose_reveal_slices(ref, k, axis, args.placement)
            painted = reveal_slices(ref, revealed, axis)
            keep = np.setdiff1d(np.arange(ref.shape[axis]), revealed)
            image = case.image.data if args.method == "flow" else None
            rows[case.name] = [
                mean_dice(np.take(interpolate_labels(painted, axis=axis, spacing=case.image.scale, image=image,
                                                     method=args.method, unpainted="background",
                                                     shrink=default_shrink(case.image.scale, ref.ndim, axis, px)).labels,
                                  keep, axis), np.take(ref, keep, axis))
                for px in pxs]
        table = np.array(list(rows.values()))
        out["k"][str(k)] = {"per_volume": rows, "mean": table.mean(0).round(4).tolist(), "sd": table.std(0).round(4).tolist()}
        print(f"{args.data} {args.placement} {args.method} K={k} n={len(rows)}: "
              + "  ".join(f"{px:g} px {m:.3f}" for px, m in zip(pxs, table.mean(0))), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
