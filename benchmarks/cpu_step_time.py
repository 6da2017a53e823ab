"""CPU time per training step (``time.process_time``), for a machine too busy for wall-clock timing.

One thread, patch 128, batch 4 + 4, on the first ACDC training volume with 3 revealed slices
(or ``--image``/``--reference``, K = ``--reveal`` slices); contrastive terms on from step 0
(warm-up 0). Reports each step's CPU seconds and the median of the steps after the first two
(which include one-off allocations). ``--spatial-dims 3`` times the 3D network on
(patch_depth, patch_size, patch_size) patches.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/cpu_step_time.py \
        --methods mean_teacher,plgcl,agcl --out docs/results/cpu_step_time.json
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/cpu_step_time.py --spatial-dims 3 --patch-size 64 \
        --batch 2+2 --steps 4 --methods supervised,mean_teacher --image LA.nii.gz --reference LA_gt.nii.gz \
        --reveal 5 --out docs/results/cpu_step_time_3d_64.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
from napari_semicl.engine import StepDone, TrainConfig, Trainer
from napari_semicl.io import read_image, read_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="mean_teacher,plgcl,agcl")
    parser.add_argument("--data", default="/work/shared/data/acdc/train", help="ACDC training folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--image", help="a volume instead of the ACDC one")
    parser.add_argument("--reference", help="its labels")
    parser.add_argument("--reveal", type=int, default=3, help="slices revealed as painted")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--patch-depth", type=int, default=0, help="3D: patch depth (0: --patch-size)")
    parser.add_argument("--batch", default="4+4", help="labelled+unlabelled crops a step")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.data)
    image = read_image(args.image or folder / "patient003_frame01.nii.gz")
    ref = read_labels(args.reference or folder / "patient003_frame01_gt.nii.gz", like=image)
    axis = int(np.argmin(image.data.shape))
    painted = reveal_slices(ref.data, choose_reveal_slices(ref.data, args.reveal, axis), axis)
    n_l, n_u = (int(n) for n in args.batch.split("+"))
    out = {"protocol": "cpu_step_time", "patch_size": args.patch_size, "batch": args.batch, "threads": 1,
           "steps": args.steps, "spatial_dims": args.spatial_dims, "patch_depth": args.patch_depth,
           "image": str(args.image or "acdc patient003_frame01"), "methods": {}}
    for method in args.methods.split(","):
        cfg = TrainConfig(method=method, iterations=args.steps, refresh_every=10**9, seed=0)
        cfg.data.patch_size, cfg.data.unpainted, cfg.data.axis = args.patch_size, "background", axis
        cfg.model.spatial_dims, cfg.data.patch_depth = args.spatial_dims, args.patch_depth
        cfg.data.batch_labelled, cfg.data.batch_unlabelled = n_l, n_u
        for section in ("plgcl", "agcl"):
            if hasattr(cfg, section):
                getattr(cfg, section).warmup_steps = 0
        trainer = Trainer(cfg, [AnnotatedPair(image.data, painted)], device=torch.device("cpu"))
        times, t0 = [], time.process_time()
        for event in trainer.run(previews=False):
            if isinstance(event, StepDone):
                t1 = time.process_time()
                times.append(t1 - t0)
                t0 = t1
        out["methods"][method] = {"cpu_s_median": float(np.median(times[2:])), "cpu_s_all": times}
        print(method, round(out["methods"][method]["cpu_s_median"], 3), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
