"""Issue 26: which slices of a cohort's painted volumes training samples, and with which targets.

Builds the cohort run's data exactly as ``benchmarks/cohort_transfer.py`` does (``--k-train``
slices painted strictly inside the structure, the recommended configuration: the fill's dense
targets, unpainted pixels background) and, without training, reports for each training volume
and slice: its role (painted, dense target, none), the share of the slice's pixels that are
background, foreground and left out (IGNORE) in its target, and the expected share of the
labelled crops drawn from it at the start and the end of the budget (``prior.dense_start`` /
``dense_end``). Slices are grouped by where they lie against the reference's structure
(before its first slice, inside its range, past its last) and against the painted range.

    python benchmarks/cohort_sampling.py --data ../shared/data/la/train --out out/sampling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from napari_semicl.bench.common import find_cases, thinnest_axis
from napari_semicl.bench.label_efficiency import apply_overrides
from napari_semicl.cli.common import set_items
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.dataset import SliceDataset
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
from napari_semicl.engine import recommended_config
from napari_semicl.engine.fusion import build_prior
from napari_semicl.engine.prior import dense_share
from napari_semicl.io import atomic_path


def describe(dataset: SliceDataset, references: list[np.ndarray], painted: list[list[int]], share: float) -> list[dict]:
    """Per volume, per slice: role, target composition and expected crop share at dense share ``share``."""
    n_lab, n_dense = len(dataset.labelled), len(dataset.dense_targets)
    out = []
    for p, ref in enumerate(references):
        n = ref.shape[0]
        on = np.flatnonzero(ref.reshape(n, -1).any(1))
        first, last = int(on[0]), int(on[-1])
        rows = []
        for s in range(n):
            if (p, s) in dataset.labelled:
                role, tgt = "painted", dataset.target(p, s)
                crop = (1 - share) / n_lab if n_dense else 1 / n_lab
            elif (p, s) in dataset.dense_targets:
                role, tgt = "dense", dataset.dense_targets[(p, s)]
                crop = share / n_dense
            else:
                role, tgt, crop = "none", None, 0.0
            row = {"slice": s, "role": role, "crop_share": crop,
                   "where": "before" if s < first else "after" if s > last else "inside",
                   "ref_fg": float((ref[s] > 0).mean())}
            if tgt is not None:
                row.update(bg=float((tgt == 0).mean()), fg=float(((tgt != 0) & (tgt != IGNORE_INDEX)).mean()),
                           ignore=float((tgt == IGNORE_INDEX).mean()))
                # foreground in the target where the reference has none (a wrong target)
                row["fg_wrong"] = float((((tgt != 0) & (tgt != IGNORE_INDEX)) & (ref[s] == 0)).mean())
                # background in the target where the reference has foreground (a missed target)
                row["bg_wrong"] = float(((tgt == 0) & (ref[s] > 0)).mean())
                fg, known = (tgt != 0) & (tgt != IGNORE_INDEX), tgt != IGNORE_INDEX
                total = int((fg & known).sum() + ((ref[s] > 0) & known).sum())
                row["dice"] = float(2 * (fg & (ref[s] > 0)).sum() / total) if total else None
            rows.append(row)
        out.append({"first": first, "last": last, "painted": painted[p], "slices": rows})
    return out


def summarise(volumes: list[dict]) -> dict:
    """Crop shares and background pixels by position (before / inside / after the structure)."""
    summary = {}
    for where in ("before", "inside", "after"):
        rows = [r for v in volumes for r in v["slices"] if r["where"] == where]
        with_target = [r for r in rows if r["role"] != "none"]
        summary[where] = {
            "slices": len(rows), "with_target": len(with_target),
            "crop_share": float(sum(r["crop_share"] for r in rows)),
            # expected share of each crop's pixels that are background targets there (sum over slices)
            "bg_pixel_share": float(sum(r["crop_share"] * r.get("bg", 0) for r in rows)),
            "ignore_mean": float(np.mean([r["ignore"] for r in with_target])) if with_target else None,
            "bg_mean": float(np.mean([r["bg"] for r in with_target])) if with_target else None,
            "fg_wrong_mean": float(np.mean([r["fg_wrong"] for r in with_target])) if with_target else None,
            "bg_wrong_mean": float(np.mean([r["bg_wrong"] for r in with_target])) if with_target else None,
        }
    # the targets' Dice against the reference at ten positions along the structure's range
    profile = [[] for _ in range(10)]
    for v in volumes:
        for r in v["slices"]:
            if r["where"] == "inside" and r.get("dice") is not None and r["role"] == "dense":
                t = (r["slice"] - v["first"]) / max(v["last"] - v["first"], 1)
                profile[min(int(t * 10), 9)].append(r["dice"])
    summary["dense_target_dice_profile"] = [float(np.mean(x)) if x else None for x in profile]
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-volumes", type=int, default=4)
    ap.add_argument("--k-train", type=int, default=5)
    ap.add_argument("--set", action="append", help="SECTION.KEY=VALUE")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cases = find_cases(args.data)[: args.train_volumes]
    axis = thinnest_axis(cases[0].reference.data.shape)
    cfg = recommended_config()
    cfg.data.axis = axis
    apply_overrides(cfg, cfg.method, dict(set_items(args, sections=True)))
    pairs, refs, painted = [], [], []
    for c in cases:
        slices = choose_reveal_slices(c.reference.data, args.k_train, axis, "inside")
        painted.append(slices)
        pairs.append(AnnotatedPair(c.image.data, reveal_slices(c.reference.data, slices, axis), name=c.name,
                                   spacing=c.image.scale))
        refs.append(np.moveaxis(np.asarray(c.reference.data), axis, 0))
    dataset = SliceDataset(pairs, cfg.data)
    notices = []
    build_prior(pairs, dataset, cfg.prior, notices)
    result = {"train": [c.name for c in cases], "k_train": args.k_train, "axis": axis,
              "notices": [str(getattr(n, "text", n)) for n in notices]}
    for when, fraction in (("start", 0.0), ("end", 1.0)):
        vols = describe(dataset, refs, painted, dense_share(cfg.prior, fraction))
        result[when] = {"summary": summarise(vols)}
        if when == "start":
            result["volumes"] = vols
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    print(json.dumps({w: result[w]["summary"] for w in ("start", "end")}, indent=1))
    for v in result["volumes"]:
        line = []
        for r in v["slices"]:
            if r["role"] == "none":
                line.append(".")
            elif r["role"] == "painted":
                line.append("P")
            else:
                line.append("b" if r["fg"] == 0 and r["ignore"] < 0.5 else "i" if r["ignore"] >= 0.5 else "f")
        print(f"ref {v['first']}-{v['last']} painted {v['painted']}: {''.join(line)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
