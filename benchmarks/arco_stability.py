"""ARCO's stability claim: the spread of loss curves across seeds, NS vs SG (and SAG).

For each sampler and seed, trains ARCO on the same real data (the bundled sample volume,
three revealed slices) and records the per-step 'contrast' and total losses. Reports, per
sampler, the across-seed standard deviation of each loss averaged over the steps after the
warm-up, and the mean within-run step-to-step variability. Usage:

    python benchmarks/arco_stability.py --steps 150 --seeds 0 1 2 --out arco_stability.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.io.sample import load_sample_volume


def curves(sampler: str, seed: int, steps: int, patch: int, warmup: int) -> dict:
    image, reference = load_sample_volume()
    revealed = choose_reveal_slices(reference.data, 3, 0)
    cfg = TrainConfig(method="arco", iterations=steps, refresh_every=10**9, seed=seed)
    cfg.data.unpainted, cfg.data.patch_size = "background", patch
    cfg.arco.sampler, cfg.arco.warmup_steps = sampler, warmup
    trainer = Trainer(cfg, [AnnotatedPair(image.data, reveal_slices(reference.data, revealed, 0))],
                      device=torch.device("cpu"))
    run_sync(trainer.run(previews=False))
    hist = trainer.history
    return {k: [h.get(k, float("nan")) for h in hist] for k in ("contrast", "total")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=["ns", "sg", "sag"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"steps": args.steps, "warmup": args.warmup, "patch": args.patch, "seeds": args.seeds, "samplers": {}}
    for sampler in args.samplers:
        runs = [curves(sampler, s, args.steps, args.patch, args.warmup) for s in args.seeds]
        row = {}
        for key in ("contrast", "total"):
            arr = np.array([r[key] for r in runs])[:, args.warmup:]  # seeds x steps
            row[f"{key}_across_seed_std"] = float(np.nanmean(np.nanstd(arr, axis=0)))
            row[f"{key}_step_to_step_std"] = float(np.nanmean(np.nanstd(np.diff(arr, axis=1), axis=1)))
            row[f"{key}_final_mean"] = float(np.nanmean(arr[:, -10:]))
        row["curves"] = runs
        result["samplers"][sampler] = row
        print(sampler, {k: round(v, 4) for k, v in row.items() if k != "curves"}, flush=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
