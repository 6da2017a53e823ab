"""Issue 26: where the cohort network alone is wrong on new volumes, from a saved run.

Reads what ``benchmarks/cohort_transfer.py --save DIR`` kept (the cohort checkpoint and each
test volume's network-alone prediction, ``NAME.npy``) and the references, and splits each
volume's errors along the slicing axis (foreground = any label value > 0):

- ``fp_beyond``: false-positive voxels on slices past the structure's ends (the reference
  has no foreground there), split into ``fp_before`` / ``fp_after``;
- ``fp_blobs``: false positives inside the structure's slice range that lie in a predicted
  3D component other than the largest one (another chamber, a vessel);
- ``fp_edge``: the other false positives (the main component too wide);
- ``fn``: missed voxels, and the share of them on the outer fifth of the slice range at each
  end (``fn_ends``) and on slices the network left empty (``fn_empty_slices``).

Each is also given as the whole-volume Dice if that error alone were removed (an oracle, to
rank the errors). Per-slice Dice is averaged over volumes at ten positions along the
structure's slice range (``profile``). ``--tta`` predicts again from the checkpoint with
flip averaging (and times it against the plain prediction); ``--lcc`` scores keeping the
largest component. Nothing trains here.

    python benchmarks/cohort_diagnose.py --run docs/results/x.json --saved /tmp/run --out diag.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_semicl.bench.common import find_cases, thinnest_axis
from napari_semicl.engine.device import set_threads
from napari_semicl.engine.inference import predict_volume
from napari_semicl.engine.persistence import load_predictor
from napari_semicl.engine.postprocess import keep_largest_component
from napari_semicl.io import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cohort_transfer import FlipAveraged  # noqa: E402


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return float(2 * (pred & ref).sum() / total) if total else 1.0


def diagnose(pred_labels: np.ndarray, ref_labels: np.ndarray, axis: int) -> dict:
    pred = np.moveaxis(pred_labels > 0, axis, 0)
    ref = np.moveaxis(ref_labels > 0, axis, 0)
    n = ref.shape[0]
    ref_slices = np.flatnonzero(ref.reshape(n, -1).any(1))
    first, last = int(ref_slices[0]), int(ref_slices[-1])
    fp, fn = pred & ~ref, ref & ~pred
    components, count = ndimage.label(pred)
    largest = np.zeros_like(pred)
    if count:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        largest = components == int(np.argmax(sizes))
    inside = np.zeros(n, dtype=bool)
    inside[first:last + 1] = True
    fp_before = fp[:first].sum()
    fp_after = fp[last + 1:].sum()
    fp_blobs = (fp & ~largest)[inside].sum()
    fp_edge = (fp & largest)[inside].sum()
    span = last - first + 1
    end = max(1, span // 5)
    end_mask = np.zeros(n, dtype=bool)
    end_mask[first:first + end] = True
    end_mask[last + 1 - end:last + 1] = True
    empty = ~pred.reshape(n, -1).any(1) & inside
    per_slice = []
    for i in range(first, last + 1):
        per_slice.append(_dice(pred[i], ref[i]))
    pos = (np.arange(first, last + 1) - first) / max(1, span - 1)
    profile = [float(np.mean([d for d, p in zip(per_slice, pos) if min(int(p * 10), 9) == b] or [np.nan]))
               for b in range(10)]
    beyond_mask = np.zeros_like(pred)
    beyond_mask[:first] = True
    beyond_mask[last + 1:] = True
    blob_mask = ~largest & inside[:, None, None]
    pred_slices = np.flatnonzero(pred.reshape(n, -1).any(1))
    return {
        "slices": n, "ref_first": first, "ref_last": last,
        "pred_first": int(pred_slices[0]) if pred_slices.size else None,
        "pred_last": int(pred_slices[-1]) if pred_slices.size else None,
        "ref_voxels": int(ref.sum()), "pred_voxels": int(pred.sum()), "components": int(count),
        "fp": int(fp.sum()), "fp_before": int(fp_before), "fp_after": int(fp_after),
        "fp_blobs": int(fp_blobs), "fp_edge": int(fp_edge),
        "fn": int(fn.sum()), "fn_ends": int(fn[end_mask].sum()), "fn_empty_slices": int(fn[empty].sum()),
        "empty_slices_in_range": int(empty.sum()),
        "dice": _dice(pred, ref),
        "dice_without_fp_beyond": _dice(pred & ~beyond_mask, ref),
        "dice_without_fp_blobs": _dice(pred & ~(blob_mask & ~ref), ref),
        "dice_without_fp": _dice(pred & ref, ref),
        "dice_without_fn": _dice(pred | ref, ref),
        "dice_largest_component": _dice(largest, ref),
        "profile": profile,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the cohort_transfer result JSON (its data and test volumes)")
    ap.add_argument("--saved", required=True, help="the folder given to cohort_transfer --save")
    ap.add_argument("--tta", action="store_true", help="also predict from the checkpoint with flip averaging")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    run = json.loads(Path(args.run).read_text())
    saved = Path(args.saved)
    cases = {c.name: c for c in find_cases(run["data"])}
    test = [cases[name] for name in run["test"]]
    axis = thinnest_axis(cases[run["train"][0]].reference.data.shape)
    result = {"run": args.run, "saved": str(saved), "axis": axis, "volumes": []}
    model = config = None
    if args.tta:
        import torch

        model, config = load_predictor(saved / "checkpoint.pt", device=torch.device("cpu"))
    for c in test:
        pred = np.load(saved / f"{c.name}.npy")
        ref = c.reference.data
        row = {"name": c.name, "plain": diagnose(pred, ref, axis)}
        row["plain_lcc"] = diagnose(keep_largest_component(pred), ref, axis)
        if model is not None:
            kwargs = dict(class_values=config.data.class_values or [0, 1], axis=config.data.axis,
                          normalise=config.data.normalise, device=torch.device("cpu"),
                          context_slices=config.data.context_slices)
            t0 = time.process_time()
            again = predict_volume(model, c.image.data, **kwargs).labels
            row["plain_cpu_s"] = time.process_time() - t0
            row["plain_again_agrees"] = float((again == pred).mean())
            t0 = time.process_time()
            tta = predict_volume(FlipAveraged(model), c.image.data, **kwargs).labels
            row["tta_cpu_s"] = time.process_time() - t0
            row["tta"] = diagnose(tta, ref, axis)
            row["tta_lcc"] = diagnose(keep_largest_component(tta), ref, axis)
        result["volumes"].append(row)
        print(c.name, {k: round(row[k]["dice"], 4) for k in ("plain", "plain_lcc", "tta", "tta_lcc") if k in row},
              flush=True)
    for key in ("plain", "plain_lcc", "tta", "tta_lcc"):
        values = [r[key]["dice"] for r in result["volumes"] if key in r]
        if values:
            result[f"{key}_mean"], result[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("_mean", "_std"))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
