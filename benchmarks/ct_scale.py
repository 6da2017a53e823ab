"""The fill between painted slices at CT size (issue 27; docs/prior.md, "CT-sized volumes").

    python benchmarks/ct_scale.py --data ../shared/data/la/train --out docs/results/ct_scale.json
    python benchmarks/ct_scale.py ... --itk          # also ITK's MorphologicalContourInterpolator
    python benchmarks/ct_scale.py ... --code ../main # another checkout's fill, for a before/after

A dev left-atrium volume (the first of ``--data`` unless ``--case``) and the same volume
resampled to ``--size`` (512 x 512 x 256, the thinnest axis getting 256: about 29x the voxels;
``scipy.ndimage.zoom``, linear for the image, nearest for the reference). ``--k`` slices revealed along the thinnest axis
(``data.reveal``, placement 'inside'), then the fill (``interpolate_labels``, optical flow) on
each, each run in a fresh subprocess: wall time and CPU time of the fill alone, the process's
peak resident memory (``resource.getrusage``, loading included) and the peak growth during the
fill, and Dice against the reference on the unpainted slices. Writes JSON to ``--out``.

``--train`` instead: what a user waits for in ``napari-semicl train`` at that size (issue 27): the
CT-like volume and its painted slices written as NIfTI (so the CLI reads 256 slices of 512 x 512,
as a CT's axial slices), then ``train --prior targets --unpainted background --iterations
--steps`` run as a user runs it, in a subprocess, its log lines stamped as they arrive: seconds
from the command's start to the trainer's start (reading, imports), to the prior's notice, to
the first step, to the end of training, to the prediction written; the whole command's peak
resident memory (``resource.getrusage(RUSAGE_CHILDREN)``) and CPU seconds; and the prediction's
Dice against the reference on the unpainted slices.

``--dice OLD_CHECKOUT`` instead: the fill's Dice on the unpainted slices of ``--cases`` original
volumes at K = 2, 3, 5 (placements 'ends' and 'inside'), this checkout's against another's, with
the CPU time of each fill (in a subprocess per checkout).

The optional ITK baseline needs ``pip install itk itk-morphologicalcontourinterpolation``
(large wheels; not a dependency of the plugin): its time includes loading the library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: runs in the subprocess: argv = code dir, npz path, method, axis, result path
_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
data = np.load(sys.argv[2])
image, painted = data["image"], data["painted"]
spacing = tuple(float(s) for s in data["spacing"])
axis = int(sys.argv[4])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "itk":
    t0, c0 = time.perf_counter(), time.process_time()
    import itk
    moved = np.ascontiguousarray(painted.astype(np.uint8))
    img = itk.image_view_from_array(moved)
    f = itk.MorphologicalContourInterpolator.New(img)
    f.SetAxis(2 - axis)  # itk indexes axes x, y, z: numpy's last first
    f.Update()
    labels = itk.array_from_image(f.GetOutput())
else:
    from napari_semicl.data.interpolation import interpolate_labels
    t0, c0 = time.perf_counter(), time.process_time()
    labels = interpolate_labels(painted, axis=axis, spacing=spacing, image=image, method=sys.argv[3]).labels
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
np.save(sys.argv[5] + ".npy", np.asarray(labels, np.uint8))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
json.dump({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak / 1024, "fill_growth_mb": (peak - rss0) / 1024},
          open(sys.argv[5], "w"))
"""


#: runs in the subprocess: argv = code dir, data folder, cases, result path
_DICE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from napari_semicl.bench.common import find_cases, thinnest_axis
from napari_semicl.data.interpolation import interpolate_labels
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
res = {}
for case in find_cases(sys.argv[2], limit=int(sys.argv[3])):
    img, ref = np.asarray(case.image.data, np.float32), np.asarray(case.reference.data)
    ax = thinnest_axis(ref.shape)
    for k in (2, 3, 5):
        for pl in ("ends", "inside"):
            sl = choose_reveal_slices(ref, k, ax, pl)
            c = time.process_time()
            out = interpolate_labels(reveal_slices(ref, sl, ax), axis=ax, image=img, spacing=case.image.scale).labels
            c = time.process_time() - c
            keep = np.ones(ref.shape[ax], bool); keep[sl] = False
            a, b = np.compress(keep, out, axis=ax) != 0, np.compress(keep, ref, axis=ax) != 0
            res[f"{case.name}|{k}|{pl}"] = {"dice": float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), "cpu_seconds": c}
json.dump(res, open(sys.argv[4], "w"), indent=1)
"""


def compare_dice(old: Path, data: str, cases: int, out: Path) -> None:
    """This checkout's fill against ``old``'s on the original volumes (see the module doc)."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in (("old", old), ("new", ROOT)):
            path = Path(tmp) / f"{name}.json"
            subprocess.run([sys.executable, "-c", _DICE_CHILD, str(code), data, str(cases), str(path)], check=True)
            runs[name] = json.loads(path.read_text())
    rows = {}
    for key in runs["old"]:
        _, k, placement = key.split("|")
        rows.setdefault(f"K={k} {placement}", []).append(key)
    summary = {}
    for label, keys in rows.items():
        o = np.array([runs["old"][x]["dice"] for x in keys])
        n = np.array([runs["new"][x]["dice"] for x in keys])
        summary[label] = {"old": float(o.mean()), "new": float(n.mean()), "diff_min": float((n - o).min()),
                          "diff_max": float((n - o).max()),
                          "cpu_old": float(sum(runs["old"][x]["cpu_seconds"] for x in keys)),
                          "cpu_new": float(sum(runs["new"][x]["cpu_seconds"] for x in keys))}
        r = summary[label]
        print(f"{label:10s} Dice old {r['old']:.4f} new {r['new']:.4f} (new - old {r['diff_min']:+.4f} .. "
              f"{r['diff_max']:+.4f}); cpu {r['cpu_old']:.1f} s -> {r['cpu_new']:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"old": str(old.resolve()), "data": data, "cases": cases, "summary": summary,
                               "per_fill": runs}, indent=1))
    print(f"written to {out}")


def build(image: np.ndarray, reference: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """The volume resampled to ``size`` voxels (the smallest size to the thinnest axis, and so
    on: the slices stay the same anatomy): linear image, nearest-neighbour reference."""
    from scipy import ndimage

    target = np.empty(3, int)
    target[np.argsort(image.shape, kind="stable")] = sorted(size)
    zoom = [n / s for n, s in zip(target, image.shape)]
    return (ndimage.zoom(image.astype(np.float32), zoom, order=1),
            ndimage.zoom(reference.astype(np.uint8), zoom, order=0))


def dice_unpainted(pred: np.ndarray, ref: np.ndarray, slices, axis: int) -> float:
    keep = np.ones(ref.shape[axis], bool)
    keep[list(slices)] = False
    p, r = np.compress(keep, pred, axis=axis) != 0, np.compress(keep, ref, axis=axis) != 0
    return float(2 * np.count_nonzero(p & r) / max(np.count_nonzero(p) + np.count_nonzero(r), 1))


def run_fill(code: Path, image, painted, spacing, axis: int, method: str, ref, slices, tmp: Path, tag: str) -> dict:
    npz = tmp / f"{tag}.npz"
    np.savez(npz, image=image, painted=painted, spacing=np.asarray(spacing, float))
    result = tmp / f"{tag}.json"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(code), str(npz), method, str(axis), str(result)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    npz.unlink()
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    out = json.loads(result.read_text())
    labels = np.load(str(result) + ".npy")
    out["dice_unpainted"] = dice_unpainted(labels, ref, slices, axis)
    return out


#: the log lines that end each phase of a train run (matched in order of arrival)
_PHASES = (("trainer_started", " training "), ("prior_ready", "painted-slice prior"),
           ("first_step", " step "), ("trained", "(100%)"), ("prediction_written", "prediction written"))


def run_train(image, reference, painted, spacing, slices, axis: int, steps: int, tmp: Path, extra) -> dict:
    """``napari-semicl train`` on the volume as a user runs it (see the module doc)."""
    import resource

    from napari_semicl.io import read_image, write_image, write_labels

    # napari's axis order, as the plugin's reader gives it back (it reverses NIfTI's x, y, z)
    geometry = {"spacing": tuple(float(s) for s in spacing), "axes_reversed": True}
    write_image(tmp / "image.nii.gz", image, metadata=geometry, overwrite=True)
    write_labels(tmp / "painted.nii.gz", painted.astype(np.uint8), metadata=geometry, overwrite=True)
    cmd = [sys.executable, "-m", "napari_semicl", "train", "--image", str(tmp / "image.nii.gz"), "--labels",
           str(tmp / "painted.nii.gz"), "--unpainted", "background", "--prior", "targets", "--axis", str(axis),
           "--iterations", str(steps), "--out", str(tmp / "run"), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    marks: dict = {}
    lines = []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(line.rstrip())
        for name, text in _PHASES:
            if name not in marks and text in line:
                marks[name] = now
    proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"command": " ".join(cmd[1:]), "exit": proc.returncode, "seconds_from_start": marks,
           "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
           "peak_rss_mb": after.ru_maxrss / 1024, "log_tail": lines[-5:] if proc.returncode else []}
    if "trainer_started" in marks:
        start = marks["trainer_started"]
        out["after_train_start"] = {k: v - start for k, v in marks.items() if k != "trainer_started"}
        if "trained" in marks and "prediction_written" in marks:
            out["prediction_seconds"] = marks["prediction_written"] - marks["trained"]
    pred_path = tmp / "run" / "prediction.nii.gz"
    if proc.returncode == 0 and pred_path.exists():
        pred = np.asarray(read_image(pred_path).data)
        out["dice_unpainted"] = dice_unpainted(pred, reference, slices, axis)
    return out


def main() -> None:
    from napari_semicl.bench.common import find_cases, thinnest_axis
    from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of NAME.nii.gz + NAME_gt.nii.gz (left atrium)")
    ap.add_argument("--case", help="the volume's NAME (default: the first)")
    ap.add_argument("--size", default="512,512,256", help="the CT-like size, voxels per axis")
    ap.add_argument("--k", type=int, default=5, help="painted slices")
    ap.add_argument("--method", default="flow", choices=("flow", "sdf"))
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose fill runs (default: this one)")
    ap.add_argument("--itk", action="store_true", help="also ITK's MorphologicalContourInterpolator (if installed)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each fill (the figures are per run)")
    ap.add_argument("--train", action="store_true",
                    help="time `napari-semicl train --prior targets` at the CT size instead (see the module doc)")
    ap.add_argument("--steps", type=int, default=5, help="--train: training steps")
    ap.add_argument("--train-args", default="", help="--train: more arguments for the train command")
    ap.add_argument("--dice", type=Path, metavar="OLD_CHECKOUT",
                    help="compare the fill's Dice with this checkout's on the original volumes, and stop")
    ap.add_argument("--cases", type=int, default=4, help="--dice: how many volumes")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.dice is not None:
        compare_dice(args.dice, args.data, args.cases, args.out)
        return

    cases = find_cases(args.data)
    case = next(c for c in cases if args.case in (None, c.name))
    image, ref = np.asarray(case.image.data, np.float32), np.asarray(case.reference.data)
    size = tuple(int(s) for s in args.size.split(","))
    t0 = time.perf_counter()
    big_image, big_ref = build(image, ref, size)
    build_s = time.perf_counter() - t0
    spacing0 = tuple(float(s) for s in case.image.scale)
    big_spacing = tuple(s * n / m for s, n, m in zip(spacing0, image.shape, big_image.shape))
    volumes = {"original": (image, ref, spacing0), "ct": (big_image, big_ref, big_spacing)}
    if args.train:
        results = {"case": case.name, "k": args.k, "steps": args.steps, "build_seconds": build_s,
                   "machine_load": os.getloadavg(), "runs": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for name, (img, reference, spacing) in volumes.items():
                axis = thinnest_axis(reference.shape)
                slices = choose_reveal_slices(reference, args.k, axis, "inside")
                r = run_train(img, reference, reveal_slices(reference, slices, axis), spacing, slices, axis,
                              args.steps, Path(tmp), args.train_args.split())
                r.update(shape=list(reference.shape), axis=axis, painted=slices)
                results["runs"][name] = r
                phases = ", ".join(f"{k} {v:.1f} s" for k, v in r.get("after_train_start", {}).items())
                print(f"{name:8s} {str(reference.shape):16s} exit {r['exit']}; after the trainer's start: {phases}; "
                      f"peak {r['peak_rss_mb']:.0f} MB; cpu {r['cpu_seconds']:.1f} s; "
                      f"Dice {r.get('dice_unpainted', float('nan')):.3f}", flush=True)
        results["machine_load_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"written to {args.out}")
        return
    methods = [args.method] + (["itk"] if args.itk else [])
    results: dict = {"case": case.name, "k": args.k, "code": str(args.code.resolve()), "build_seconds": build_s,
                     "volumes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (img, reference, spacing) in volumes.items():
            axis = thinnest_axis(reference.shape)
            slices = choose_reveal_slices(reference, args.k, axis, "inside")
            painted = reveal_slices(reference, slices, axis)
            entry = {"shape": list(reference.shape), "voxels": int(reference.size), "axis": axis,
                     "painted": slices, "spacing": list(spacing), "runs": {}}
            for method in methods:
                runs = [run_fill(args.code, img, painted, spacing, axis, method, reference, slices, Path(tmp),
                                 f"{name}_{method}_{r}") for r in range(args.repeat)]
                entry["runs"][method] = runs
                for r in runs:
                    print(f"{name:8s} {str(reference.shape):16s} {method:4s} " + (
                        r["error"] if "error" in r else
                        f"{r['seconds']:7.1f} s (cpu {r['cpu_seconds']:.1f} s)  peak {r['peak_rss_mb']:6.0f} MB "
                        f"(fill +{r['fill_growth_mb']:.0f} MB)  Dice {r['dice_unpainted']:.3f}"), flush=True)
            results["volumes"][name] = entry
    ok = [m for m in methods if all("error" not in r for v in results["volumes"].values() for r in v["runs"][m])]
    results["ratios"] = {
        m: {"voxels": volumes["ct"][1].size / volumes["original"][1].size,
            "seconds": float(np.median([r["seconds"] for r in results["volumes"]["ct"]["runs"][m]])
                             / np.median([r["seconds"] for r in results["volumes"]["original"]["runs"][m]])),
            "cpu_seconds": float(np.median([r["cpu_seconds"] for r in results["volumes"]["ct"]["runs"][m]])
                                 / np.median([r["cpu_seconds"] for r in results["volumes"]["original"]["runs"][m]]))}
        for m in ok}
    for m, r in results["ratios"].items():
        print(f"{m}: {r['voxels']:.1f}x the voxels, {r['seconds']:.2f}x the time ({r['cpu_seconds']:.2f}x the CPU time)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
