"""MoNuSeg, 2 labelled tiles (``bench histology``'s protocol): one network, its scored tiles
predicted three ways: as the product predicts by default (``standard``); with the product's
``predict.adapt_batch_norm`` (``adabn``: AdaBN, Li et al. 2016, arXiv:1603.04779, every batch-norm
layer's statistics re-estimated on the tile's own inference windows,
:func:`napari_semicl.engine.inference.adapt_batch_norm`); and with the first experiment's
variant (``adabn_crops256``: 16 crops of 256 covering the tile, the layers' running averages
over the crops), kept to reproduce the archived ``mt600_seed1_adabn.json``.
``napari-semicl bench histology --adapt-batch-norm both`` is the product benchmark of the same
comparison (standard and adapted, paired, from one training).

    cd <repo> && PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/monuseg_adabn.py \\
        mean_teacher 600 out.json 1 [--data ../shared/data/monuseg/train]

Arguments: method spec, CPU-seconds of training (calibrated as ``--budget-cpu-s``), results
JSON (the bench's row format), seed. ``NTEST=k`` scores only the first k scored tiles (a smoke run).
"""
import argparse
import copy
import json
import os
import time

import numpy as np
import torch

from napari_semicl.bench.common import score
from napari_semicl.bench.histology import _network_config, _train, calibrate_steps, find_tiles, nuclei_counts
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.dataset import normalise_image
from napari_semicl.engine.inference import predict_volume

ap = argparse.ArgumentParser()
ap.add_argument("method")
ap.add_argument("cpu_s", type=float)
ap.add_argument("out")
ap.add_argument("seed", type=int, nargs="?", default=0)
ap.add_argument("--data", default="../shared/data/monuseg/train")
args = ap.parse_args()
torch.set_num_threads(1)
cpu = torch.device("cpu")
cases = find_tiles(args.data)
train, test = cases[:2], cases[2:2 + int(os.environ.get("NTEST", 14))]
pairs = [AnnotatedPair(c.image.data, c.reference.data, rgb=True, name=c.name) for c in train]
pairs += [AnnotatedPair(c.image.data, None, rgb=True, name=c.name) for c in test]
steps, per = calibrate_steps(args.method, pairs, cpu, budget_cpu_s=args.cpu_s, seed=args.seed)
c0 = time.process_time()
trainer, fin, _ = _train(_network_config(args.method, args.seed, 128, steps), pairs, cpu, cpu_s=args.cpu_s)
train_cpu = time.process_time() - c0
print("trained", fin.step, "of", steps, train_cpu, flush=True)
model = trainer.method.inference_model()


def adapted(image):
    m = copy.deepcopy(model).float()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # a plain average over the crops below
    m.train()
    for mod in m.modules():
        if "Dropout" in type(mod).__name__:
            mod.eval()
    norm = normalise_image(image, "percentile", rgb=True)[..., :3].transpose(2, 0, 1)
    x = torch.from_numpy(np.ascontiguousarray(norm))[None]
    h, w = x.shape[-2:]
    with torch.no_grad():
        for i in np.linspace(0, h - 256, 4).astype(int):
            for j in np.linspace(0, w - 256, 4).astype(int):
                m(x[..., i:i + 256, j:j + 256])
    return m.eval()


res = {"method": args.method, "budget_cpu_s": args.cpu_s, "seed": args.seed, "methods": {}}
for label, make, adapt in (("standard", lambda im: model, False), ("adabn", lambda im: model, True),
                           ("adabn_crops256", adapted, False)):
    rows = []
    for c in test:
        p = predict_volume(make(c.image.data), c.image.data, class_values=trainer.dataset.class_values, axis=0,
                           rgb=True, normalise="percentile", device=cpu, adapt_batch_norm=adapt).labels
        rows.append({"name": c.name, "steps": fin.step, "planned_steps": steps, "train_cpu_s": train_cpu,
                     "probe_cpu_s_per_step": per, **score(p, c.reference.data), **nuclei_counts(p, c.reference.data)})
    res["methods"][f"{args.method} {label}"] = {"per_volume": rows, "dice": float(np.mean([r["dice"] for r in rows]))}
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(label, res["methods"][f"{args.method} {label}"]["dice"], flush=True)
